"""Where Engram rows live and how they are fetched.

`backend(memory_cfg, mesh)` is the contract a jitted train step uses (`backends`): pure
`init` / `lookup` / `update` / `shardings` / `calibrate` over one state pytree per table, and
`persistent` / `from_persistent` for checkpoints, the same for every kind.

`create(kind, num_rows=..., dim=...)` returns a table object for serving and benchmarks
(`objects.Table`: `fetch`, `prefetch`, `apply_gradients`, `calibrate`, `stats`), a thin
stateful wrapper that runs the same backend's functions, for every kind:

- 'device': one array in accelerator memory;
- 'sharded': rows split over a mesh axis, fetched with all-to-all;
- 'host': the table in pinned host memory, only fetched rows cross;
- 'tiered': a device cache of hot rows over a host or disk table.

Both look a kind up in one registry (`backends`). docs/memory.md explains how to choose.
"""

from __future__ import annotations

import jax.numpy as jnp

from engram_jax.memory import backends, base, device, host, objects, sharded, storage, tiered
from engram_jax.memory.backends import KINDS, backend
from engram_jax.memory.base import MemoryTable, TableState
from engram_jax.memory.objects import options
from engram_jax.memory.table import TableLayout


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
) -> objects.Table:
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
  known = options(kind)
  unknown = sorted(set(opts) - set(known))
  if unknown:
    raise ValueError(f"{kind} table: unknown options {unknown}; it takes {known}")
  if mesh is not None and kind != "sharded":
    raise ValueError(f"mesh: only the 'sharded' backend takes a mesh, not {kind!r}")
  return objects.Table(kind, num_rows, dim, dtype, seed, rows, mesh=mesh, **opts)


__all__ = [
  "KINDS",
  "MemoryTable",
  "TableLayout",
  "TableState",
  "backend",
  "backends",
  "base",
  "create",
  "device",
  "host",
  "objects",
  "options",
  "sharded",
  "storage",
  "tiered",
]
