"""The sharded table: rows split over one mesh axis, fetched with all-to-all (pure functions).

Shard p of P owns rows [p * Rs, (p + 1) * Rs) of a table padded to Rp = P * Rs rows. Inside
`shard_map`, each device takes its slice of the ids and:

1. deduplicates them (`jnp.unique`, sorted, so the ids of one owner are contiguous) and
   buckets them by owner into a [P, Cb] buffer of local row numbers, Cb = `capacity` (the mean
   bucket size times `slack`);
2. exchanges the buckets with `all_to_all`, gathers the rows it owns for every requester, and
   sends them back with a second `all_to_all`; each fetched id reads its row from there.

If any device has a bucket larger than Cb (checked with `pmax`, so every device agrees), the
step takes the overflow path instead: `all_gather` of the deduplicated ids, each device fills
the rows it owns, and `psum_scatter` returns every device its rows. No id is ever dropped.
The sparse update travels the reverse route: per-device sums of each id's gradients go to
the owner in the same buckets (or by `all_gather` on overflow), and the owner runs
`optimizer.sparse_adam_update` on its shard.

Pure-functional core for a jitted, data-parallel train step on the same mesh axis:

    spec = sharded.ShardSpec(mesh, axis, num_rows)
    state = sharded.init(rows_fn, spec, dim, dtype)     # TableState, table P(axis, None)
    rows = sharded.lookup(state, ids, spec)             # ids [B, T, H] sharded on B over axis
    ... loss, grads w.r.t. rows (data parallel) ...
    state = sharded.update(state, ids, row_grads, lr, optim_cfg, spec)

`ids.size` must be a multiple of P (e.g. a batch divisible by P); the rows come back sharded
like the ids. Jit the step with the state donated; the spec is static. The 'sharded' kind's
backend (`memory.sharded_backend.ShardedBackend`) adapts these functions to the backend
contract.

Shapes: R table rows, P shards (devices on the mesh axis), Rs = ceil(R / P) rows per shard,
Rp = P * Rs padded rows, Dh row width, N ids, n = N / P ids per device, Cb bucket capacity.
(`P(...)` with arguments is jax's `PartitionSpec`, not the shard count.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax.config import OptimConfig
from engram_jax.memory import base, dispatch, validation
from engram_jax.memory.optimizer import (
  TableOptState,
  dedup,
  dedup_sum,
  init_table_state,
  sparse_adam_update,
)

ROUTES = ("all_to_all", "all_gather")
# The Pallas kernels' outputs carry no varying-axes annotation, which shard_map's type check
# requires; nothing here is differentiated through the shard_map, so the check is off.
_CHECK_VMA = False


@dataclasses.dataclass(frozen=True)
class ShardSpec:
  """How a table is split and how ids travel.

  Attributes:
    mesh: the device mesh.
    axis: the mesh axis the rows (and the ids) are split over, or a tuple of axes (the shards
      are then numbered row-major over them, as `PartitionSpec((a, b))` splits an array).
    num_rows: R, the table's rows before padding.
    slack: bucket capacity relative to an even split of a device's ids over the owners.
    route: 'all_to_all' (with the overflow path) or 'all_gather' (the overflow path always).
    implementation: each owner's gather of its rows and the summing of the gradients of an
      update: 'pallas' (the fused gather kernel, the sort-and-sum kernel), 'xla' or 'auto'
      (`memory.dispatch`).
  """

  mesh: Mesh
  axis: str | tuple[str, ...]
  num_rows: int
  slack: float = 2.0
  route: str = "all_to_all"
  implementation: str = "auto"

  def __post_init__(self):
    if not set(self.axes) <= set(self.mesh.axis_names) or not self.axes:
      raise ValueError(f"axis: expected axes of {self.mesh.axis_names}, got {self.axis!r}")
    if self.slack <= 0:
      raise ValueError(f"slack: expected a positive factor, got {self.slack}")
    if self.route not in ROUTES:
      raise ValueError(f"route: expected one of {ROUTES}, got {self.route!r}")

  @property
  def axes(self) -> tuple[str, ...]:
    return self.axis if isinstance(self.axis, tuple) else (self.axis,)

  @property
  def shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axes)

  @property
  def rows_per_shard(self) -> int:
    return -(-self.num_rows // self.shards)

  @property
  def padded_rows(self) -> int:
    return base.padded_rows(self.num_rows, self.shards)

  def capacity(self, n: int) -> int:
    """Cb: ids one device may send to one owner on the all-to-all path (a multiple of 8)."""
    c = 8 * math.ceil(self.slack * n / self.shards / 8)
    return max(1, min(n, c))

  def table_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.axis, None))

  def ids_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.axis))

  def exchange_bytes(
    self, n: int, dim: int, itemsize: int, route: str, update: bool = False
  ) -> int:
    """Bytes one device sends per fetch (or update) on a route, its own bucket excluded.

    all_to_all: (P - 1) * Cb ids and (P - 1) * Cb rows (or gradients). all_gather: (P - 1) * n
    ids and, through `psum_scatter` (fetch) or `all_gather` (update), (P - 1) * n rows.
    """
    k = self.capacity(n) if route == "all_to_all" else n
    value_bytes = 4 if update else itemsize
    return (self.shards - 1) * k * (4 + dim * value_bytes)


def _plan(unique, inverse, spec: ShardSpec, capacity: int):
  """Deduplicated ids of one device (`optimizer.dedup` with fill Rp) bucketed by owner.

  Returns (unique [n] sorted ids padded with Rp, inverse [n] slot of each id, owner [n]
  (P for padding), pos [n] place in the owner's bucket, send [P, Cb] local row numbers (Rs in
  empty places), overflow: any bucket larger than Cb).
  """
  s, rs = spec.shards, spec.rows_per_shard
  n = unique.shape[0]
  owner = unique // rs
  # Sorted ids: owner d's ids are unique[starts[d]:starts[d + 1]].
  starts = jnp.searchsorted(unique, jnp.arange(s + 1, dtype=unique.dtype) * rs)  # [P + 1]
  pos = jnp.arange(n, dtype=jnp.int32) - starts[jnp.minimum(owner, s - 1)]
  send = (
    jnp.full((s, capacity), rs, jnp.int32)
    .at[owner, pos]
    .set((unique - owner * rs).astype(jnp.int32), mode="drop")
  )  # [P, Cb]
  overflow = jnp.max(starts[1:] - starts[:-1]) > capacity
  return unique, inverse, owner, pos, send, overflow


def _all_to_all(x, axis):
  return lax.all_to_all(x, axis, 0, 0, tiled=True)  # [P, Cb, ...] -> [P, Cb, ...]


def _rows_all_to_all(table, plan, spec: ShardSpec):
  _, _, owner, pos, send, _ = plan
  recv = _all_to_all(send, spec.axis)  # recv[p]: local rows device p asks this device for
  rows = dispatch.gather_rows(table, recv, implementation=spec.implementation)  # [P, Cb, Dh]
  back = _all_to_all(rows, spec.axis)  # back[d]: the rows owner d sent back
  s, c = send.shape
  return back[jnp.minimum(owner, s - 1), jnp.minimum(pos, c - 1)]  # [n, Dh] per unique id


def _rows_all_gather(table, plan, spec: ShardSpec):
  unique = plan[0]
  rs, axis = spec.rows_per_shard, spec.axis
  me = lax.axis_index(axis)
  every = lax.all_gather(unique, axis)  # [n] -> [P, n]
  mine = (every // rs) == me
  # [P, n] -> [P, n, Dh]
  rows = dispatch.gather_rows(table, every - me * rs, implementation=spec.implementation)
  rows = jnp.where(mine[..., None], rows, jnp.zeros((), rows.dtype))
  # Each id has one owner, so the sum adds zeros to one row: exact.
  return lax.psum_scatter(rows, axis, scatter_dimension=0)  # [P, n, Dh] -> [n, Dh]


def _choose(spec: ShardSpec, overflow, fast, slow):
  if spec.route == "all_gather":
    return slow(), jnp.ones((), bool)
  overflow = lax.pmax(overflow.astype(jnp.int32), spec.axis) > 0
  return lax.cond(overflow, slow, fast), overflow


def _local_lookup(table, ids, spec: ShardSpec):
  unique, inverse = dedup(ids, spec.shards * spec.rows_per_shard)
  plan = _plan(unique, inverse, spec, spec.capacity(ids.shape[0]))
  rows, overflow = _choose(
    spec,
    plan[5],
    lambda: _rows_all_to_all(table, plan, spec),
    lambda: _rows_all_gather(table, plan, spec),
  )
  return rows[plan[1]], overflow[None]  # [n, Dh] per unique id -> [n, Dh] per id


def _local_update(table, opt, ids, grads, lr, cfg, spec: ShardSpec):
  n, dh = grads.shape
  s, rs = spec.shards, spec.rows_per_shard
  # [n] ids, [n, Dh] grads -> distinct ids and the summed gradient of each
  unique, summed = dedup_sum(ids, grads, s * rs, spec.implementation)
  _, _, owner, pos, send, overflow = _plan(unique, None, spec, spec.capacity(n))

  def fast():
    recv_ids = _all_to_all(send, spec.axis).reshape(-1)  # [P, Cb] -> [P * Cb] local rows
    payload = (
      jnp.zeros((s, send.shape[1], dh), jnp.float32).at[owner, pos].set(summed, mode="drop")
    )  # [P, Cb, Dh]
    recv = _all_to_all(payload, spec.axis).reshape(-1, dh)  # [P, Cb, Dh] -> [P * Cb, Dh]
    # Row Rs (the empty-place marker) is past this shard's rows, so the update drops it.
    return sparse_adam_update(table, opt, recv_ids, recv, lr, cfg, spec.implementation)

  def slow():
    me = lax.axis_index(spec.axis)
    every = lax.all_gather(unique, spec.axis).reshape(-1)  # [P, n] -> [P * n]
    local = jnp.where(every // rs == me, every - me * rs, rs).astype(jnp.int32)
    every_grads = lax.all_gather(summed, spec.axis).reshape(-1, dh)  # [P * n, Dh]
    return sparse_adam_update(table, opt, local, every_grads, lr, cfg, spec.implementation)

  (table, opt), overflow = _choose(spec, overflow, fast, slow)
  return table, opt, overflow[None]


def constrain(x, spec: ShardSpec, partition: P):
  """Shards x as `partition` (`reshard` on an explicit mesh axis, a constraint otherwise)."""
  sharding = NamedSharding(spec.mesh, partition)
  types = [spec.mesh.axis_types[spec.mesh.axis_names.index(a)] for a in spec.axes]
  if AxisType.Explicit in types:
    return jax.reshard(x, sharding)
  return lax.with_sharding_constraint(x, sharding)


def _flat(ids, spec: ShardSpec):
  # int32, clamped before the cast
  flat = validation.clip_ids(ids, 0, spec.num_rows - 1).reshape(-1)
  return constrain(flat, spec, P(spec.axis))  # [...] -> [N] split over the axis


def lookup_with_route(state: base.TableState, ids, spec: ShardSpec):
  """`lookup`, also returning [P] bools: True where the overflow path ran (same on all)."""
  mapped = jax.shard_map(
    functools.partial(_local_lookup, spec=spec),
    mesh=spec.mesh,
    in_specs=(P(spec.axis, None), P(spec.axis)),
    out_specs=(P(spec.axis), P(spec.axis)),
    check_vma=_CHECK_VMA,
  )
  rows, overflow = mapped(state.table, _flat(ids, spec))
  # [N, Dh] -> [..., Dh], split over the axis along the leading axis like the ids.
  rows = rows.reshape(*jnp.shape(ids), state.table.shape[1])
  if jnp.ndim(ids) and jnp.shape(ids)[0] % spec.shards == 0:
    rows = constrain(rows, spec, P(spec.axis))
  return rows, overflow


def lookup(state: base.TableState, ids, spec: ShardSpec) -> jax.Array:
  """Rows of flat row ids (pure; jit it). ids [...] -> [..., Dh], clamped to [0, R)."""
  return lookup_with_route(state, ids, spec)[0]


def update_with_route(state: base.TableState, ids, grads, lr, cfg: OptimConfig, spec: ShardSpec):
  """`update`, also returning [P] bools: True where the overflow path ran."""
  dh = state.table.shape[1]
  opt_specs = TableOptState(P(spec.axis, None), P(spec.axis, None), P())
  mapped = jax.shard_map(
    functools.partial(_local_update, cfg=cfg, spec=spec),
    mesh=spec.mesh,
    in_specs=(P(spec.axis, None), opt_specs, P(spec.axis), P(spec.axis, None), P()),
    out_specs=(P(spec.axis, None), opt_specs, P(spec.axis)),
    check_vma=_CHECK_VMA,
  )
  grads = constrain(jnp.asarray(grads).reshape(-1, dh), spec, P(spec.axis, None))  # [N, Dh]
  table, opt, overflow = mapped(
    state.table, state.opt, _flat(ids, spec), grads, jnp.asarray(lr, jnp.float32)
  )
  return base.TableState(table, opt), overflow


def update(
  state: base.TableState, ids, grads, lr, cfg: OptimConfig, spec: ShardSpec
) -> base.TableState:
  """Lazy Adam on the rows read, each shard updating its own rows (pure; jit, donate state).

  Args:
    state: the sharded table and moments (count replicated).
    ids: [...] flat row ids that were fetched (size a multiple of P).
    grads: [..., Dh] gradient of the loss w.r.t. each fetched row.
    lr: scalar learning rate.
    cfg: Adam's b1, b2, eps.
    spec: the table's `ShardSpec`.

  Returns:
    The new state, sharded as before.
  """
  return update_with_route(state, ids, grads, lr, cfg, spec)[0]


def init(rows_fn, spec: ShardSpec, dim: int, dtype, trainable: bool = True) -> base.TableState:
  """A sharded state built shard by shard (no device ever holds the whole table).

  Args:
    rows_fn: (start, stop) -> NumPy rows [stop - start, Dh] of the unpadded table.
    spec: the split.
    dim: Dh.
    dtype: the table's dtype.
    trainable: False keeps no moments.

  Returns:
    TableState with the table [Rp, Dh] sharded P(axis, None) (padding rows zero).
  """
  shape = (spec.padded_rows, dim)

  def shard(index):
    start, stop, _ = index[0].indices(spec.padded_rows)
    out = np.zeros((stop - start, dim), dtype)
    real = min(stop, spec.num_rows)
    if real > start:
      out[: real - start] = rows_fn(start, real)  # cast to the table's dtype
    return out

  table = jax.make_array_from_callback(shape, spec.table_sharding(), shard)
  if not trainable:
    return base.TableState(table, None)
  opt_shardings = TableOptState(
    spec.table_sharding(), spec.table_sharding(), NamedSharding(spec.mesh, P())
  )
  opt = jax.jit(init_table_state, out_shardings=opt_shardings)(table)
  return base.TableState(table, opt)
