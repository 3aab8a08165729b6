"""Orbax checkpoints of one table, in a format every backend reads and writes.

A checkpoint directory holds `table_meta.json` ({"kind", "num_rows", "dim", "dtype",
"has_opt"}) and `arrays/`, an orbax PyTree checkpoint of {"table": [R', Dh], "mu": [R', Dh],
"nu": [R', Dh], "count": []} (moments only when the table was trainable). R' may exceed R:
the sharded backend pads R to a multiple of its shards. orbax writes a sharded array shard by
shard from the devices that hold it (nothing is gathered onto one device) and reads straight
into the target's sharding or memory kind, padding or truncating the row axis to the target's
R', which is how a checkpoint of one backend restores into another.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "table_meta.json"
ARRAYS_DIR = "arrays"


@dataclasses.dataclass(frozen=True)
class Target:
  """Where and how one array of a checkpoint is restored.

  Attributes:
    shape: the shape to restore into (the row axis is padded with zeros or truncated).
    dtype: the dtype to restore into.
    sharding: a `jax.sharding.Sharding` (its memory kind included), or None for NumPy.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  sharding: jax.sharding.Sharding | None = None


def save(directory, items: dict, meta: dict) -> None:
  """Writes `items` (jax or NumPy arrays) and `meta`; replaces an existing checkpoint.

  Args:
    directory: the checkpoint directory (created if missing).
    items: {"table", and optionally "mu", "nu", "count"} arrays.
    meta: JSON-serialisable description, written by process 0.
  """
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(directory / ARRAYS_DIR, items, force=True)
  if jax.process_index() == 0:
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(directory) -> dict:
  """The `meta` a checkpoint was saved with."""
  path = pathlib.Path(directory) / META_FILE
  if not path.exists():
    raise ValueError(f"{directory}: not a table checkpoint (no {META_FILE})")
  return json.loads(path.read_text())


def _fit_rows(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if x.shape == shape:
    return x
  out = np.zeros(shape, x.dtype)
  n = min(x.shape[0], shape[0])
  out[:n] = x[:n]
  return out


def restore(directory, targets: dict[str, Target]) -> dict:
  """Reads the named arrays of a checkpoint into their targets.

  Args:
    directory: a directory written by `save`.
    targets: {name: Target} for names present in the checkpoint.

  Returns:
    {name: jax.Array placed by its target's sharding, or NumPy array}.
  """
  path = pathlib.Path(directory).absolute() / ARRAYS_DIR
  args = {}
  for name, target in targets.items():
    if target.sharding is None:
      args[name] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=target.dtype)
    else:
      args[name] = ocp.ArrayRestoreArgs(
        sharding=target.sharding, global_shape=target.shape, dtype=target.dtype, strict=False
      )
  with ocp.PyTreeCheckpointer() as checkpointer:
    out = checkpointer.restore(
      path,
      args=ocp.args.PyTreeRestore(
        item={name: 0 for name in args}, restore_args=args, partial_restore=True
      ),
    )
  return {
    name: _fit_rows(np.asarray(x), targets[name].shape) if targets[name].sharding is None else x
    for name, x in out.items()
  }
