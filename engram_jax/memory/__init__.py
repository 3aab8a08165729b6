"""Where Engram rows live and how they are fetched.

`create(kind, num_rows=..., dim=...)` returns a table object with one interface for every
backend (`base.MemoryTable`: `fetch`, `apply_gradients`, `save`, `restore`, `stats`):

- 'device': one array in accelerator memory (`device.DeviceTable`);
- 'sharded': rows split over a mesh axis, fetched with all-to-all (`sharded.ShardedTable`);
- 'host': the table in pinned host memory, only fetched rows cross (`host.HostTable`);
- 'tiered': a device cache of hot rows over a host or disk table (`tiered.TieredTable`).

Each backend module also has a pure-functional core (`init`/`lookup`/`update`) for a jitted
train step; docs/memory.md explains how to choose and how a step calls each one.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from engram_jax.memory import base, device, host, sharded, storage, tiered
from engram_jax.memory.base import KINDS, MemoryTable, TableState
from engram_jax.memory.table import TableLayout

_CLASSES = {
  "device": device.DeviceTable,
  "sharded": sharded.ShardedTable,
  "host": host.HostTable,
  "tiered": tiered.TieredTable,
}


def _options(cls) -> set[str]:
  params = inspect.signature(cls.__init__).parameters
  return {name for name, p in params.items() if p.kind == p.KEYWORD_ONLY}


def options(kind: str) -> list[str]:
  """The keyword options `create` accepts for a backend."""
  if kind not in _CLASSES:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  names = _options(_CLASSES[kind])
  if kind == "tiered":
    names |= _options(host.HostTable) - {"init_std"}
  return sorted(names)


def create(
  kind: str,
  *,
  num_rows: int,
  dim: int,
  dtype=jnp.float32,
  seed: int = 0,
  rows=None,
  mesh=None,
  **opts,
) -> MemoryTable:
  """A table of `num_rows` rows of width `dim` on the backend `kind`.

  Args:
    kind: 'device', 'sharded', 'host' or 'tiered'.
    num_rows: R.
    dim: Dh.
    dtype: dtype of the rows `fetch` returns (and of the table, unless a storage type says
      otherwise).
    seed: seed of the normal initialisation (`base.init_rows`: the same rows on every
      backend); ignored when `rows` is given.
    rows: [R, Dh] initial rows (NumPy or jax), e.g. a `TableLayout.init` table.
    mesh: the mesh of the 'sharded' backend (default: every device on one axis).
    **opts: backend options, listed by `options(kind)` (e.g. `storage='int8'` for host,
      `cache_fraction=0.05` for tiered, `axis='data'` for sharded).

  Returns:
    The table object.

  Raises:
    ValueError: for an unknown kind, an option the backend does not take, or bad values.
  """
  if kind not in _CLASSES:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  unknown = sorted(set(opts) - set(options(kind)))
  if unknown:
    raise ValueError(f"{kind} table: unknown options {unknown}; it takes {options(kind)}")
  if mesh is not None:
    if kind != "sharded":
      raise ValueError(f"mesh: only the 'sharded' backend takes a mesh, not {kind!r}")
    opts["mesh"] = mesh
  return _CLASSES[kind](num_rows, dim, dtype, seed, rows, **opts)


__all__ = [
  "KINDS",
  "MemoryTable",
  "TableLayout",
  "TableState",
  "base",
  "create",
  "device",
  "host",
  "options",
  "sharded",
  "storage",
  "tiered",
]
