"""Checkpoints: one orbax `CheckpointManager` for the whole training state.

A checkpoint holds the train state (backbone params, optimizer state, MoE balancing biases,
Engram tables and their sparse-Adam moments, step) plus two JSON items: the data iterator's state
and the run's configuration. orbax writes each step to a temporary folder and renames it when
complete, so a half-written step is never listed; a step that is listed but unreadable (a
truncated or corrupted file) is skipped with a warning and the previous one restored.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores (state, data iterator state, config) by step.

  Args:
    directory: where the step folders live.
    max_to_keep: how many recent steps to keep (at least 2, so a fallback exists).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max(2, max_to_keep), create=True, enable_async_checkpointing=False
      ),
      item_names=("state", "data", "config"),
    )

  def steps(self) -> list[int]:
    """Steps with a finished checkpoint, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    """Writes one checkpoint and waits until it is on disk."""
    self._manager.save(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
      ),
      force=True,
    )
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest readable checkpoint.

    Args:
      abstract_state: the state's structure (e.g. from `jax.eval_shape`), giving shapes,
        dtypes and shardings.

    Returns:
      (step, state, data iterator state, config), or None when no checkpoint is readable.
    """
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
          ),
        )
        jax.block_until_ready(restored["state"])
      except Exception as e:  # orbax raises many types for unreadable or partial files.
        logging.warning(
          "checkpoint at step %d in %s is unreadable (%s: %s); trying an earlier one",
          step,
          self.directory,
          type(e).__name__,
          e,
        )
        continue
      return step, restored["state"], restored["data"], restored["config"]
    return None

  def close(self) -> None:
    self._manager.close()
