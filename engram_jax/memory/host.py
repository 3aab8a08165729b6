"""The `host` backend: the table lives in `pinned_host` memory and never enters device memory.

Only fetched rows cross to the device; the sparse update rewrites the touched rows on the host.
The table, its moments and (int8, mxfp8 storage) its scales are jax arrays whose
`sharding.memory_kind` is 'pinned_host'; a compiled step that takes them keeps them in the host
memory space (layout `S(5)` in its entry computation).

Pure-functional core, for one jitted train step (all arrays of the state stay on the host):

    state = host.init(rows)                                   # HostState, outside jit
    rows = host.lookup(state, ids)                            # [...] -> [..., Dh] on device
    ... loss, grads w.r.t. rows ...
    state = host.update(state, ids, row_grads, lr, optim_cfg)   # jit with the state donated

`lookup` moves the ids to the host, gathers there (`compute_on` host computation) and returns
the rows in device memory, still packed in their storage type; the device decodes them
(`dispatch.decode_rows`: the Pallas decoding kernel on a GPU). `update` deduplicates ids and
sums their gradients on the device (N rows), gathers the touched rows and moments from the
host, runs `optimizer.sparse_adam_update` on that compact [N, Dh] slice (so the result is
bitwise that of the `device` backend) and scatters the new rows back on the host in place.
Prefetch inside one jit: the lookup depends only on the ids, so XLA may start it (and its
host-to-device copy) before the layers in front of the Engram layer; nothing forces the order.

Two-stage dispatch (what the table object of `memory.create('host', ...)` does on a CPU
client, measured faster there; see docs/memory.md): outside jit, `rows = table.fetch(ids)`
(or `table.prefetch(ids)` on a background thread, then `.result()`) gathers with a threaded
NumPy `take` through a zero-copy view of the pinned buffer, the jitted step consumes `rows` and
returns the row gradients, and
`table.apply_gradients(ids, row_grads, lr, optim_cfg)` runs the jitted `update` above.

Shapes: R table rows, Dh row width, N fetched ids.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import compute_on as _compute_on
from jax.sharding import SingleDeviceSharding

from engram_jax.config import OptimConfig
from engram_jax.memory import base, contract, dispatch, host_buffers, validation
from engram_jax.memory import storage as storage_lib
from engram_jax.memory.base import TableState
from engram_jax.memory.optimizer import TableOptState, dedup, sparse_adam_update

HOST = jax.memory.Space.Host
DEVICE = jax.memory.Space.Device
PINNED_HOST = "pinned_host"


def on_host(f, out_memory_spaces):
  """`f` as a host computation inside jit, its outputs placed in `out_memory_spaces`.

  jax 0.10 calls the transform `compute_on2` (`compute_on` is a context manager there); later
  versions name the transform `compute_on`. This shim is the one place that knows.
  """
  transform = getattr(_compute_on, "compute_on2", None) or _compute_on.compute_on
  return transform(f, compute_type="device_host", out_memory_spaces=out_memory_spaces)


class HostState(NamedTuple):
  """A host-resident table (every array in `pinned_host` memory).

  Attributes:
    table: [R, Dh] stored values (float32, bfloat16, int8 or float8_e4m3fn).
    scale: [R] float32 row scales of int8 values, [R, Dh/32] E8M0 exponent bytes of mxfp8
      values, else None.
    opt: `TableOptState` moments (None when read-only; quantised tables are read-only).
  """

  table: jax.Array
  scale: jax.Array | None
  opt: TableOptState | None


def host_sharding(device: jax.Device | None = None) -> SingleDeviceSharding:
  """`pinned_host` memory of `device` (default: the first device)."""
  return SingleDeviceSharding(device or jax.devices()[0], memory_kind=PINNED_HOST)


def init(
  rows, device: jax.Device | None = None, storage_type: str = "float32", trainable: bool = True
) -> HostState:
  """Places rows [R, Dh] (NumPy) in pinned host memory in a storage type, with zero moments.

  The moments are built on the host (NumPy), never in device memory.
  """
  sharding = host_sharding(device)
  parts = storage_lib.encode(np.asarray(rows), storage_type)
  table = jax.device_put(parts["values"], sharding)
  scale = jax.device_put(parts["scale"], sharding) if "scale" in parts else None
  if not trainable or storage_type in storage_lib.SCALED:
    return HostState(table, scale, None)
  zeros = lambda: jax.device_put(np.zeros(table.shape, np.float32), sharding)
  return HostState(table, None, TableOptState(zeros(), zeros(), jnp.int32(0)))


def _host_take(arrays, ids):
  """Rows `ids` of each array, gathered on the host, delivered in device memory."""
  ids = jax.device_put(ids, HOST)
  # mode='clip': the default fill mode builds its mask in device memory and fails here.
  take = lambda xs, i: [jnp.take(x, i, axis=0, mode="clip") for x in xs]
  return on_host(take, out_memory_spaces=[DEVICE] * len(arrays))(arrays, ids)


def _host_put(arrays, ids, values):
  """`arrays[k].at[ids].set(values[k])` on the host (ids >= R dropped), results on the host."""
  ids = jax.device_put(ids, HOST)
  values = [jax.device_put(v, HOST) for v in values]
  put = lambda xs, i, vs: [x.at[i].set(v, mode="drop") for x, v in zip(xs, vs, strict=True)]
  out = on_host(put, out_memory_spaces=[HOST] * len(arrays))(arrays, ids, values)
  # The outputs' avals may still say device memory; an explicit put fixes where they live.
  return [jax.device_put(x, HOST) for x in out]


def lookup(
  state: HostState, ids: jax.Array, dtype=jnp.float32, implementation: str = "auto"
) -> jax.Array:
  """Rows of flat row ids, gathered on the host and decoded on the device (pure; jit it).

  Args:
    state: the host table.
    ids: [...] flat row ids (clamped to [0, R)).
    dtype: the rows' dtype.
    implementation: the device decoding, 'pallas', 'xla' or 'auto' (`memory.dispatch`).

  Returns:
    [..., Dh] rows in device memory.
  """
  r, dh = state.table.shape
  flat = validation.clip_ids(ids, 0, r - 1).reshape(-1)  # [...] -> [N] int32
  if state.scale is None:
    (values,) = _host_take([state.table], flat)
    scale = None
  else:
    values, scale = _host_take([state.table, state.scale], flat)
  storage = storage_lib.storage_of(values.dtype)
  rows = dispatch.decode_rows(values, storage, scale, dtype, implementation)  # [N, Dh]
  return rows.reshape(*jnp.shape(ids), dh)  # [N, Dh] -> [..., Dh]


def update_rows(state: HostState, ids, grads, lr, cfg: OptimConfig):
  """`update`, also returning the touched rows: (state, unique [N] ids (R = padding), [N, Dh]
  new values of those rows in the table's dtype), for a cache above the table to write
  through."""
  if state.opt is None:
    raise ValueError("update: this host table is read-only (no moments, or quantised storage)")
  r, dh = state.table.shape
  flat = validation.clip_ids(ids, 0, r - 1).reshape(-1)  # [...] -> [N] int32
  n = flat.shape[0]
  # [N] -> [N] sorted unique ids padded with R, and each fetched id's slot among them.
  unique, slot = dedup(flat, r)
  rows, mu, nu = _host_take([state.table, state.opt.mu, state.opt.nu], unique)
  # The touched rows as a compact table: the same Adam arithmetic, row for row, as on [R, Dh].
  new_rows, mini = sparse_adam_update(
    rows,
    TableOptState(mu, nu, state.opt.count),
    slot,
    grads.reshape(n, dh),
    lr,
    cfg,  # [..., Dh] -> [N, Dh]
  )
  table, mu, nu = _host_put(
    [state.table, state.opt.mu, state.opt.nu], unique, [new_rows, mini.mu, mini.nu]
  )
  return HostState(table, None, TableOptState(mu, nu, mini.count)), unique, new_rows


def update(state: HostState, ids, grads, lr, cfg: OptimConfig) -> HostState:
  """Lazy Adam on the rows read, on the host (pure; jit it with the state donated).

  Args:
    state: a trainable host state.
    ids: [...] flat row ids that were fetched (clamped to [0, R) like the lookup).
    grads: [..., Dh] gradient of the loss w.r.t. each fetched row.
    lr: scalar learning rate.
    cfg: Adam's b1, b2, eps.

  Returns:
    The new state, still in pinned host memory.
  """
  return update_rows(state, ids, grads, lr, cfg)[0]


jit_lookup = jax.jit(lookup, static_argnames=("dtype", "implementation"))


@dataclasses.dataclass(frozen=True)
class HostBackend(contract.Backend):
  """Pinned host memory: state `HostState(table, scale, opt)`."""

  kind: ClassVar[str] = "host"
  has_storage: ClassVar[bool] = True

  def __post_init__(self):
    super().__post_init__()
    if self.mesh is not None:
      raise ValueError(
        f"memory={self.kind!r}: expected one device (no --mesh); use 'sharded' to spread a "
        "table over several devices"
      )
    storage_lib.check_storage(self.storage)
    if self.trainable and self.storage in storage_lib.SCALED:
      raise ValueError(
        f"storage={self.storage!r} is read-only: train with 'float32' or 'bfloat16' rows"
      )

  def init(self, rows):
    r = rows.shape[0]
    rows = jnp.pad(rows.astype(self.dtype), ((0, self.padded_rows(r) - r), (0, 0)))  # [Rp, Dh]
    parts = storage_lib.encode(rows, self.storage)
    opt = base.init_state(parts["values"]).opt if self.trainable else None
    return HostState(parts["values"], parts.get("scale"), opt)

  def build(self, rows_fn, num_rows, dim):
    rows = contract.host_rows(rows_fn, num_rows, 0, self.padded_rows(num_rows), dim, self.dtype)
    return self._place_lower(init(rows, self.device, self.storage, self.trainable))

  def _table_sharding(self):
    return self._single(PINNED_HOST)

  def _lower_shardings(self, state: HostState) -> HostState:
    t = self._table_sharding()
    opt = None
    if state.opt is not None:
      opt = state.opt._replace(mu=t, nu=t, count=self._single())
    return HostState(t, None if state.scale is None else t, opt)

  def _place_lower(self, state: HostState) -> HostState:
    placed = jax.tree.map(jax.device_put, state, self._lower_shardings(state))
    # An array restored into a pinned_host sharding can still carry a device memory space in
    # its aval; an explicit put to the host space fixes what jit sees.
    put = lambda x: None if x is None else jax.device_put(x, jax.memory.Space.Host)
    opt = placed.opt
    if opt is not None:
      opt = opt._replace(mu=put(opt.mu), nu=put(opt.nu))
    return HostState(put(placed.table), put(placed.scale), opt)

  def shardings(self, state):
    return self._lower_shardings(state)

  def place(self, state):
    return self._place_lower(state)

  def lookup_with_route(self, state, row_ids):
    rows = lookup(state, row_ids, jnp.dtype(self.dtype), self.memory.lookup_impl)
    return rows, jnp.zeros((), bool)

  def update_with_route(self, state, row_ids, row_grads, lr, adam):
    return update(state, row_ids, row_grads, lr, adam), jnp.zeros((), bool)

  def persistent(self, state) -> TableState:
    if state.scale is not None:
      raise ValueError(
        f"persistent: a {self.storage} table is a serving copy; checkpoints hold float rows"
      )
    return TableState(state.table, state.opt)

  def from_persistent(self, persistent: TableState):
    return HostState(persistent.table, None, persistent.opt)

  def numpy_parts(self, state):
    parts = {"values": host_buffers.numpy_view(state.table)}
    if state.scale is not None:
      parts["scale"] = host_buffers.numpy_view(state.scale)
    return None if any(v is None for v in parts.values()) else parts

  def _moved(self, n, dim):
    return {"bytes_to_device": n * self.row_bytes(dim)}  # every fetched row crossed

  def read_rows(self, state, lower=None):
    parts = lower
    if parts is None:
      parts = {"values": np.asarray(state.table)}
      if state.scale is not None:
        parts["scale"] = np.asarray(state.scale)
    return storage_lib.decode_table(parts, self.storage, self.dtype)
