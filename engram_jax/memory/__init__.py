"""Where Engram rows live and how they are fetched.

`backend(memory_cfg, mesh)` is the contract a jitted train step uses (`backends`): pure
`init` / `lookup` / `update` / `shardings` / `calibrate` over one state pytree per table, and
`persistent` / `from_persistent` for checkpoints, the same for every kind.

`create(kind, num_rows=..., dim=...)` returns a stateful table object for serving and
benchmarks, with one interface for every kind (`base.MemoryTable`: `fetch`,
`apply_gradients`, `stats`), run by the same backend modules' functions:

- 'device': one array in accelerator memory (`device.DeviceTable`);
- 'sharded': rows split over a mesh axis, fetched with all-to-all (`sharded.ShardedTable`);
- 'host': the table in pinned host memory, only fetched rows cross (`host.HostTable`);
- 'tiered': a device cache of hot rows over a host or disk table (`tiered.TieredTable`).

Both look a kind up in one registry (`backends`). docs/memory.md explains how to choose.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from engram_jax.memory import backends as backend_lib
from engram_jax.memory import base, device, host, sharded, storage, tiered
from engram_jax.memory.backends import KINDS, backend
from engram_jax.memory.base import MemoryTable, TableState
from engram_jax.memory.table import TableLayout


def _options(cls) -> set[str]:
  params = inspect.signature(cls.__init__).parameters
  return {name for name, p in params.items() if p.kind == p.KEYWORD_ONLY}


def options(kind: str) -> list[str]:
  """The keyword options `create` accepts for a backend."""
  names = _options(backend_lib.table_class(kind))
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
  cls = backend_lib.table_class(kind)
  unknown = sorted(set(opts) - set(options(kind)))
  if unknown:
    raise ValueError(f"{kind} table: unknown options {unknown}; it takes {options(kind)}")
  if mesh is not None:
    if kind != "sharded":
      raise ValueError(f"mesh: only the 'sharded' backend takes a mesh, not {kind!r}")
    opts["mesh"] = mesh
  return cls(num_rows, dim, dtype, seed, rows, **opts)


__all__ = [
  "KINDS",
  "MemoryTable",
  "TableLayout",
  "TableState",
  "backend",
  "base",
  "create",
  "device",
  "host",
  "options",
  "sharded",
  "storage",
  "tiered",
]
