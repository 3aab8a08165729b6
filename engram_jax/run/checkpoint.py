"""Checkpoints: one orbax `CheckpointManager` for the whole training state, verified on restore.

A checkpoint holds the train state (backbone params, optimizer state, MoE balancing biases,
Engram tables and their sparse-Adam moments, step) plus three JSON items: the data iterator's
state, the run's configuration, and checksums (`checksums.record` of the state: every leaf's
shape, dtype and a checksum of its host bytes, and a checksum of the data state).

orbax writes each step to a temporary folder and renames it when complete, so a half-written
step is never listed. On restore the newest step is tried first:
- a step whose leaves do not match the requested state's structure, shapes or dtypes is another
  model: `CheckpointMismatch` is raised (never taken for corruption);
- a step that cannot be read or whose checksums disagree is corrupt: it is moved to
  `checkpoints/corrupt/<step>/` with a warning naming the step and the first bad leaf (unless the
  caller only reads, as serving does) and the previous step is tried;
- if steps exist but none is good, `NoGoodCheckpoint` is raised.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from engram_jax import errors
from engram_jax.errors import CheckpointMismatch, NoGoodCheckpoint
from engram_jax.run import checksums

CORRUPT = "corrupt"  # where failed steps are moved, inside the checkpoint folder
DIVERGED = "diverged"  # where steps saved at or after a divergence are moved
_ITEMS = ("state", "data", "config", "checksums")
_SETTLE_SECONDS = 0.5  # after a failed read, for the reads it abandoned to finish


class Checkpointer:
  """Saves and restores (state, data iterator state, config) by step.

  Args:
    directory: where the step folders live.
    max_to_keep: how many recent steps to keep (at least 2, so a fallback exists).
    read_only: never create, write or move anything (serving a run).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        # A read-only manager keeps and saves nothing (orbax warns unless told so).
        max_to_keep=None if read_only else max(2, max_to_keep),
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
      ),
      item_names=_ITEMS,
    )

  def steps(self) -> list[int]:
    """Steps with a finished checkpoint, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    """Writes one checkpoint with its checksums and waits until it is on disk."""
    sums = {
      "state": checksums.record(state),
      "data": checksums.json_checksum(data_state),
    }
    failure = None
    with _quiet_background_errors():
      try:
        self._manager.save(
          int(step),
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            checksums=ocp.args.JsonSave(sums),
          ),
          force=True,
        )
        self._manager.wait_until_finished()
      except Exception as e:  # e.g. a full disk: reported by the caller, once
        failure = SaveFailed(step, e)
      if failure is not None:
        _settle()  # orbax's abandoned writes are collected here, quietly
    if failure is not None:
      raise failure

  def _read_checksums(self, step: int) -> dict | None:
    """The step's checksum record; None for a checkpoint written before checksums existed."""
    if not (Path(self.directory) / str(step) / "checksums").is_dir():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))[
      "checksums"
    ]

  def _read(self, step: int, abstract_state: Any, partial: bool) -> dict:
    """orbax's restore of one step: the whole state with the data and config items, or (partial)
    only the leaves of `abstract_state`, e.g. a model without its optimizer state."""
    if partial:
      state = ocp.PyTreeCheckpointer().restore(
        Path(self.directory) / str(step) / "state",
        args=ocp.args.PyTreeRestore(
          item=abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
          partial_restore=True,
        ),
      )
      return {"state": state, "data": None, "config": None}
    return self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
      ),
    )

  def _restore_step(self, step: int, abstract_state: Any, partial: bool) -> tuple[Any, dict, dict]:
    """Restores and verifies one step.

    Raises:
      CheckpointMismatch: the step holds another model.
      _Corrupt: the step is unreadable or fails verification.
    """
    try:
      sums = self._read_checksums(step)
    except Exception as e:  # orbax raises many types for unreadable files.
      raise _Corrupt(f"its checksum record is unreadable ({type(e).__name__}: {e})") from e
    if sums is not None:
      problem = checksums.structure_mismatch(
        sums["state"], checksums.describe(abstract_state), subset=partial
      )
      if problem is not None:
        raise CheckpointMismatch(
          f"checkpoint at step {step} in {self.directory} holds another model: {problem}"
        )
    failure = None
    with _quiet_background_errors():
      try:
        restored = self._read(step, abstract_state, partial)
        jax.block_until_ready(restored["state"])
      except Exception as e:  # orbax raises many types for unreadable or partial files.
        failure = f"{_unreadable_leaf(e)}cannot be read ({type(e).__name__}: {_short(e)})"
      if failure is not None:
        _settle()
    if failure is not None:
      raise _Corrupt(failure)
    if sums is None:
      logging.warning(
        "checkpoint at step %d in %s has no checksums (written by an older version): not verified",
        step,
        self.directory,
      )
    else:
      got = checksums.record(restored["state"])
      bad = checksums.first_bad_leaf({k: sums["state"][k] for k in got}, got)
      if bad is not None:
        raise _Corrupt(f"leaf {bad} does not match its checksum")
      if not partial and checksums.json_checksum(restored["data"]) != sums["data"]:
        raise _Corrupt("the data iterator state does not match its checksum")
    return restored["state"], restored["data"], restored["config"]

  def restore_latest(
    self, abstract_state: Any, partial: bool = False
  ) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest good checkpoint; corrupt newer ones are moved to `corrupt/` (or
    skipped when read-only).

    Args:
      abstract_state: the state's structure (e.g. from `jax.eval_shape`), giving shapes,
        dtypes and shardings.
      partial: restore only the leaves of `abstract_state` (a subtree of the saved state, e.g.
        without the optimizer state); the data and config items are then None.

    Returns:
      (step, state, data iterator state, config), or None when there is no checkpoint.

    Raises:
      CheckpointMismatch: the newest step holds another model (nothing is moved).
      NoGoodCheckpoint: there are checkpoints, but none is good.
    """
    bad = []
    for step in reversed(self.steps()):
      try:
        state, data, config = self._restore_step(step, abstract_state, partial)
      except _Corrupt as e:
        where = "skipped" if self.read_only else f"moved to {self.quarantine(step, CORRUPT)}"
        logging.warning(
          "checkpoint at step %d in %s is corrupt: %s; %s, trying an earlier one",
          step,
          self.directory,
          e,
          where,
        )
        bad.insert(0, step)
        continue
      return step, state, data, config
    earlier = Path(self.directory) / CORRUPT
    if not bad and earlier.is_dir() and any(earlier.iterdir()):
      # A resume after an earlier refusal: the bad steps are already in corrupt/.
      bad = sorted({int(p.name.split("-")[0]) for p in earlier.iterdir()})
    if bad:
      raise NoGoodCheckpoint(
        f"no good checkpoint in {self.directory}: steps {bad} failed verification "
        f"({'left in place' if self.read_only else f'moved to {CORRUPT}/'}); nothing else was "
        "touched. Start a new run in another --workdir (or move this one aside with --overwrite)"
      )
    return None

  def quarantine(self, step: int, reason: str) -> Path:
    """Moves a step's folder to `<directory>/<reason>/<step>` (never deleting anything) and
    returns where it went."""
    target_dir = Path(self.directory) / reason
    target = target_dir / str(step)
    if target.exists():  # a step quarantined before: keep both
      target = target_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:  # multi-host: one process moves, the others wait for it
      target_dir.mkdir(exist_ok=True)
      os.replace(Path(self.directory) / str(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"quarantine {step}")
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()


def _settle() -> None:
  """After a failed read or write, lets the operations orbax abandoned finish (and complain)
  while `_quiet_background_errors` still holds their output."""
  time.sleep(_SETTLE_SECONDS)
  gc.collect()  # abandoned coroutines report now, while the hook is in place


@contextlib.contextmanager
def _quiet_background_errors():
  """While a read fails, orbax's abandoned reads report their own errors from background
  coroutines and tensorstore's threads, straight to the process's stderr; those go to the
  debug log instead of the terminal (the failure itself is raised and reported once). The
  same holds for a failed save."""
  old_unraisable = sys.unraisablehook
  sys.unraisablehook = lambda args: logging.debug("%s: %s", args.exc_type.__name__, args.exc_value)
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      sys.unraisablehook = old_unraisable
      sink.seek(0)
      noise = sink.read().decode(errors="replace")
      if noise.strip():
        logging.debug("output of the checkpoint reader: %s", noise)


class SaveFailed(Exception):
  """A checkpoint could not be written. It keeps the text of the original error (`details`)
  and a copy of its OSError as its cause, not the error itself, whose frames would keep
  orbax's abandoned writes alive (and complaining) until the process exits."""

  def __init__(self, step: int, error: Exception):
    super().__init__(f"saving the checkpoint of step {step} failed: {_short(error)}")
    self.step = step
    self.details = "".join(traceback.format_exception(error))
    os_error = errors.os_error_of(error)
    if os_error is not None:
      self.__cause__ = OSError(os_error.errno, os_error.strerror, os_error.filename)


class _Corrupt(Exception):
  """A checkpoint step that cannot be read or fails verification."""


def _unreadable_leaf(e: Exception) -> str:
  """'leaf NAME ' for the array a tensorstore read error names (its relative path), or ''."""
  names = [p for p in re.findall(r"'path': '([^']+?)/?'", str(e)) if not p.startswith("/")]
  return f"leaf {names[-1]} " if names else "it "


def _short(e: Exception) -> str:
  """The first sentence of an error (tensorstore appends its whole spec)."""
  text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
  return text[0][:300] if text else ""
