"""The 'sharded' kind's backend: `ShardedBackend`, the contract over the sharded table.

The rows are split over mesh axes and fetched with all-to-all by the pure-functional sharded
table (`memory.sharded`: `ShardSpec`, `init`, `lookup_with_route`, `update_with_route`); this
module adapts it to the backend contract (`memory.contract`) that training, the table objects
of `memory.create` and checkpoints use through `backends.backend(memory_cfg, mesh)`:

- `build` makes the state shard by shard (no device ever holds the whole table), padded to a
  multiple of both `contract.ROW_ALIGN` and the shards;
- `lookup_with_route` / `update_with_route` run the exchange inside the jitted step and also
  return one bool, True where any device took the overflow path (`lookup` / `update` drop it);
- `fetch` / `apply` (the table objects' path) pad the ids of one call to a multiple of the
  shards, place them on the mesh, and report the bytes the exchange moved
  (`ShardSpec.exchange_bytes`, on the route that ran).

Shapes: R table rows, Rp padded rows, Dh row width, N ids, N' ids padded to a multiple of the
shards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax.memory import base, contract, sharded
from engram_jax.memory.sharded import ShardSpec


@dataclasses.dataclass(frozen=True)
class ShardedBackend(contract.Backend):
  """Rows split over mesh axes (`ShardSpec`): `table_axes` (default every axis of the mesh),
  of which those of size > 1.

  Attributes:
    slack: bucket capacity factor of the all-to-all route.
    route: 'all_to_all' (with the overflow path) or 'all_gather'.
  """

  kind: ClassVar[str] = "sharded"
  slack: float = 2.0
  route: str = "all_to_all"

  def __post_init__(self):
    super().__post_init__()
    if self.mesh is None:
      raise ValueError("memory='sharded': expected a mesh of several devices (--mesh > 1)")
    if not set(self.table_axes or ()) <= set(self.mesh.axis_names):
      raise ValueError(f"axis: expected axes of {self.mesh.axis_names}, got {self.table_axes}")
    ShardSpec(self.mesh, self.axis, contract.ROW_ALIGN, self.slack, self.route)  # validates

  @property
  def axis(self) -> str | tuple[str, ...]:
    """The mesh axes the rows are split over (one name when there is one)."""
    names = self.table_axes or self.mesh.axis_names
    axes = tuple(a for a in names if self.mesh.shape[a] > 1) or tuple(names[:1])
    return axes[0] if len(axes) == 1 else axes

  @property
  def shards(self) -> int:
    return self._spec(contract.ROW_ALIGN).shards

  def padded_rows(self, num_rows):
    return base.padded_rows(num_rows, math.lcm(contract.ROW_ALIGN, self.shards))

  def _spec(self, num_rows: int) -> ShardSpec:
    return ShardSpec(
      self.mesh, self.axis, num_rows, self.slack, self.route, self.memory.lookup_impl
    )

  def build(self, rows_fn, num_rows, dim):
    padded = self.padded_rows(num_rows)

    # Rows [start, stop) of the padded table; each device builds only its own shard.
    piece = lambda start, stop: contract.host_rows(rows_fn, num_rows, start, stop, dim, self.dtype)
    return sharded.init(piece, self._spec(padded), dim, jnp.dtype(self.dtype), self.trainable)

  def _table_sharding(self):
    return NamedSharding(self.mesh, P(self.axis, None))

  def lookup_with_route(self, state, row_ids):
    rows, overflow = sharded.lookup_with_route(state, row_ids, self._spec(state.table.shape[0]))
    return rows, overflow.any()

  def update_with_route(self, state, row_ids, row_grads, lr, adam):
    spec = self._spec(state.table.shape[0])
    state, overflow = sharded.update_with_route(state, row_ids, row_grads, lr, adam, spec)
    return state, overflow.any()

  def _pad(self, ids) -> np.ndarray:
    """Flat prepared ids padded to a multiple of the shards with a repeat of the first id (no
    new row; its gradient is zero)."""
    flat = np.asarray(ids).reshape(-1)  # [...] -> [N] int32 in [0, R)
    n = flat.shape[0]
    padded = np.full(-(-max(n, 1) // self.shards) * self.shards, flat[0] if n else 0, np.int32)
    padded[:n] = flat
    return padded

  def fetch(self, state, ids):
    padded = self._pad(ids)
    spec = self._spec(state.table.shape[0])
    with jax.set_mesh(self.mesh):
      ids_dev = jax.device_put(padded, spec.ids_sharding())
      rows, route = _jit_sharded_fetch(self, state, ids_dev, tuple(np.shape(ids)))
    return rows, self._exchanged(state, padded.shape[0], route, update=False)

  def apply(self, state, ids, grads, lr, adam):
    padded = self._pad(ids)
    n = int(np.prod(np.shape(ids)))
    padded_grads = np.zeros((padded.shape[0], state.table.shape[1]), np.float32)  # [N', Dh]
    padded_grads[:n] = np.asarray(grads, np.float32).reshape(n, -1)
    spec = self._spec(state.table.shape[0])
    with jax.set_mesh(self.mesh):
      state, route = contract.jit_update(
        self,
        state,
        jax.device_put(padded, spec.ids_sharding()),
        jax.device_put(padded_grads, spec.table_sharding()),
        jnp.float32(lr),
        adam,
      )
    return state, self._exchanged(state, padded.shape[0], route, update=True)

  def numpy_parts(self, state):
    return None

  def _exchanged(self, state, n_padded: int, route, update: bool) -> dict:
    """Bytes all devices sent for n_padded ids on the route that ran (waits for it)."""
    spec = self._spec(state.table.shape[0])
    per_device = spec.exchange_bytes(
      n_padded // self.shards,
      state.table.shape[1],
      4 if update else jnp.dtype(self.dtype).itemsize,
      "all_gather" if bool(np.asarray(route)) else "all_to_all",
      update,
    )
    return {"bytes_exchanged": per_device * self.shards}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jit_sharded_fetch(backend, state, padded, shape: tuple[int, ...]):
  """ids [N'] (N padded to a multiple of the shards) -> rows [*shape, Dh] (and the route)."""
  rows, overflow = backend.lookup_with_route(state, padded)  # [N', Dh]
  n = math.prod(shape)
  if n != padded.shape[0] or not shape or shape[0] % backend.shards:
    # The rows cannot be split evenly along the ids' leading axis: replicate them.
    spec = backend._spec(state.table.shape[0])
    rows = sharded.constrain(rows, spec, P())[:n]
  return rows.reshape(*shape, state.table.shape[1]), overflow  # [N, Dh] -> [..., Dh]
