"""The one registry of memory kinds: `backend(memory_cfg, mesh)` returns the backend of a kind.

Each backend is a frozen dataclass of pure functions over one state pytree (the contract:
`memory.contract`): 'device' (`contract.Backend`), 'host' (`host.HostBackend`), 'sharded'
(`sharded_backend.ShardedBackend`) and 'tiered' (`tiered.TieredBackend`). Training's step, the table
objects of `memory.create`, serving and checkpoints all reach a kind through here.
"""

from __future__ import annotations

from jax.sharding import Mesh

from engram_jax.config import MEMORY_KINDS, MemoryConfig
from engram_jax.memory.base import TableState
from engram_jax.memory.contract import (
  CALIBRATION_BATCHES,
  ROW_ALIGN,
  Backend,
  RowsFn,
  padded_rows,
  table_key,
)
from engram_jax.memory.host import HostBackend
from engram_jax.memory.sharded_backend import ShardedBackend
from engram_jax.memory.tiered import TieredBackend

# The one place a kind is looked up.
_REGISTRY = {
  "device": Backend,
  "host": HostBackend,
  "sharded": ShardedBackend,
  "tiered": TieredBackend,
}
KINDS = MEMORY_KINDS
assert set(_REGISTRY) == set(KINDS)


def backend_class(kind: str, field: str = "memory") -> type[Backend]:
  """The backend class of a kind.

  Raises:
    ValueError: an unknown kind (the message names `field`).
  """
  if kind not in _REGISTRY:
    raise ValueError(f"{field}: expected one of {KINDS}, got {kind!r}")
  return _REGISTRY[kind]


def backend(memory_cfg: MemoryConfig, mesh: Mesh | None = None, **fields) -> Backend:
  """The backend of `memory_cfg.kind` on `mesh` (None: one device).

  Args:
    memory_cfg: kind, cache fraction, storage, lookup implementation.
    mesh: the mesh ('sharded' needs one; 'host' and 'tiered' take none).
    **fields: the backend's other fields (`dtype`, `trainable`, `device`; 'sharded': `axis`,
      `slack`, `route`; 'tiered': `cache_rows`).

  Raises:
    ValueError: an unknown kind, or a kind that does not fit the mesh.
  """
  return backend_class(memory_cfg.kind)(memory_cfg, mesh, **fields)


__all__ = [
  "CALIBRATION_BATCHES",
  "KINDS",
  "ROW_ALIGN",
  "Backend",
  "HostBackend",
  "RowsFn",
  "ShardedBackend",
  "TableState",
  "TieredBackend",
  "backend",
  "backend_class",
  "padded_rows",
  "table_key",
]
