"""The backend contract: one set of pure functions per memory kind, over one state pytree.

`backend(memory_cfg, mesh)` is the only place a kind is looked up. What it returns answers, for
one Engram layer's table:

- `init(rows) -> state`: rows [R, Dh] padded to `padded_rows(R)` with zero rows (never
  addressed), stored as `memory.storage` says, with zero sparse-Adam moments; jit it (or
  `jax.eval_shape` it), then `place`; `build(rows_fn, R, Dh)` makes the placed state straight
  from host rows, piece by piece (no device ever holds a table meant for the host or a shard);
- `lookup(state, row_ids) -> rows`: flat row ids [...] -> [..., Dh] (inside the jitted step);
- `update(state, row_ids, row_grads, lr, adam) -> state`: lazy Adam on the rows read;
- `shardings(state)`: where every array of the state lives (and `place(state)` puts it there);
- `calibrate(state, id_batches) -> state`: fills a device cache from the row ids of some
  batches (host work, outside jit); the identity except for 'tiered';
- `persistent(state) -> TableState` and `from_persistent(TableState) -> state`: what a
  checkpoint holds, the same (table, moments) for every kind, so a checkpoint written with one
  kind restores into any other (orbax places each array where `shardings` says).

The table objects of `memory.create` (`memory.objects`) are a thin stateful wrapper over the
same backend: they call `fetch`/`apply` (the jitted `lookup`/`update` with the ids placed as
the kind needs, each also saying what it moved, for the statistics), `numpy_lookup` (the NumPy
engine of a CPU client), `fill` (a cache's contents) and `read_rows`.

The kinds:
- 'device': one device's memory (replicated over the mesh, if there is one);
- 'host': `pinned_host` memory; the step gathers on the host and moves only the fetched rows
  (`memory.host`); the sparse update writes back on the host; rows stored as float32,
  bfloat16 or int8 (read-only);
- 'sharded': rows split over a mesh axis ('data' in training); ids and rows travel with
  `all_to_all` (`memory.sharded`);
- 'tiered': as 'host', plus a device cache of the rows the calibration batches read most
  (`memory.tiered`): hits come from device memory, only misses cross from the host, and the
  update writes the new values of cached rows through to the cache. The cache lives in the
  state but is derived: `persistent` drops it, `calibrate` rebuilds it.

Shapes: R rows, Rp padded rows, Dh row width, L cached rows, N ids.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from engram_jax import sharding as sharding_lib
from engram_jax.config import MEMORY_KINDS, MemoryConfig, OptimConfig
from engram_jax.memory import base, device, host, sharded, tiered
from engram_jax.memory import storage as storage_lib
from engram_jax.memory.base import TableState

# Rows are padded to a multiple of this, so a table splits evenly over any mesh of up to 128
# devices (a power of two) and has the same shape under every backend.
ROW_ALIGN = 128
# Batches whose row ids decide a tiered cache's contents.
CALIBRATION_BATCHES = 8
# Rows copied per piece when a state is built from host rows.
_BUILD_CHUNK_ROWS = 1 << 20

RowsFn = Callable[[int, int], np.ndarray]


def table_key(layer: int) -> str:
  """The key of an Engram layer's table in a state or checkpoint (strings keep checkpoints
  readable)."""
  return f"layer_{layer}"


def padded_rows(num_rows: int) -> int:
  """Rp: R rounded up to a multiple of `ROW_ALIGN`."""
  return base.padded_rows(num_rows, ROW_ALIGN)


def _host_rows(rows_fn: RowsFn, num_rows: int, start: int, stop: int, dim: int, dtype):
  """Rows [start, stop) of the padded table as NumPy [stop - start, Dh]: `rows_fn`'s rows
  (of the R real ones), copied piece by piece, then zero rows."""
  out = np.zeros((stop - start, dim), dtype)
  for a in range(start, min(stop, num_rows), _BUILD_CHUNK_ROWS):
    b = min(a + _BUILD_CHUNK_ROWS, stop, num_rows)
    out[a - start : b - start] = rows_fn(a, b)
  return out


@functools.partial(jax.jit, static_argnums=0)
def _jit_lookup(backend, state, ids):
  return backend.lookup_with_route(state, ids)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=1)
def _jit_update(backend, state, ids, grads, lr, adam):
  return backend.update_with_route(state, ids, grads, lr, adam)


@dataclasses.dataclass(frozen=True)
class Backend:
  """The 'device' backend; the other kinds override what differs.

  Attributes:
    memory: the memory settings (kind, cache fraction, storage, lookup implementation).
    mesh: the mesh (training: the data-parallel mesh), or None for one device.
    dtype: the rows' dtype: what `lookup` returns (and the table's, unless `memory.storage`
      stores it otherwise on the host).
    trainable: False keeps no moments (serving).
    device: the device that holds a state without a mesh (default: the first).
  """

  kind: ClassVar[str] = "device"
  # Whether the state holds a device cache that `fill` sets (the table objects then run a
  # cache policy).
  has_cache: ClassVar[bool] = False
  # Whether rows can live in another storage type than `dtype`.
  has_storage: ClassVar[bool] = False
  memory: MemoryConfig
  mesh: Mesh | None = None
  dtype: str = "float32"
  trainable: bool = True
  device: jax.Device | None = None

  def __post_init__(self):
    if self.memory.kind != self.kind:
      raise ValueError(f"memory.kind: expected {self.kind!r}, got {self.memory.kind!r}")
    if not self.has_storage and self.memory.storage != "float32":
      raise ValueError(
        f"storage: the {self.kind!r} backend keeps rows in their dtype; storage types are for "
        f"'host' and 'tiered', got {self.memory.storage!r}"
      )
    if self.mesh is not None and self.device is not None:
      raise ValueError("device: a state on a mesh lives on the mesh's devices; give one of them")

  @property
  def storage(self) -> str:
    """How the rows are stored ('float32' also stands for the rows' own dtype)."""
    return self.memory.storage

  def padded_rows(self, num_rows: int) -> int:
    """Rp for a table of R rows."""
    return padded_rows(num_rows)

  # ---- building and placing a state

  def init(self, rows: jax.Array):
    """A fresh, unplaced state of rows [R, Dh] (jit it; `place` then moves it)."""
    r = rows.shape[0]
    table = jnp.pad(rows.astype(self.dtype), ((0, self.padded_rows(r) - r), (0, 0)))  # [Rp, Dh]
    return base.init_state(table) if self.trainable else TableState(table, None)

  def build(self, rows_fn: RowsFn, num_rows: int, dim: int):
    """The placed state of the R rows `rows_fn(start, stop)` returns (NumPy, [stop - start,
    Dh]); what the table objects start from."""
    rows = _host_rows(rows_fn, num_rows, 0, num_rows, dim, self.dtype)
    return self.place(jax.jit(self.init)(rows))

  def _single(self, memory_kind: str | None = None):
    return SingleDeviceSharding(self.device or jax.devices()[0], memory_kind=memory_kind)

  def _replicated(self):
    return sharding_lib.replicated(self.mesh) if self.mesh is not None else self._single()

  def _table_sharding(self):
    return self._replicated()

  def _persistent_shardings(self, state: TableState) -> TableState:
    t = self._table_sharding()
    if state.opt is None:
      return TableState(t, None)
    return TableState(t, state.opt._replace(mu=t, nu=t, count=self._replicated()))

  def shardings(self, state):
    return self._persistent_shardings(state)

  def place(self, state):
    """Moves a state (fresh or restored) to `shardings(state)`."""
    return jax.tree.map(jax.device_put, state, self.shardings(state))

  # ---- the jitted step's functions

  def lookup_with_route(self, state, row_ids: jax.Array):
    """`lookup`, and a bool: True where a backend took its fallback route (sharded: the
    overflow path; tiered: more distinct misses than its capacity)."""
    rows = device.lookup(state, row_ids, implementation=self.memory.lookup_impl)
    return rows.astype(self.dtype), jnp.zeros((), bool)

  def lookup(self, state, row_ids: jax.Array) -> jax.Array:
    return self.lookup_with_route(state, row_ids)[0]

  def update_with_route(self, state, row_ids, row_grads, lr, adam: OptimConfig):
    return device.update(state, row_ids, row_grads, lr, adam), jnp.zeros((), bool)

  def update(self, state, row_ids, row_grads, lr, adam: OptimConfig):
    return self.update_with_route(state, row_ids, row_grads, lr, adam)[0]

  def calibrate(self, state, id_batches: Iterable[np.ndarray]):
    """The state with its cache filled from flat row ids (identity without a cache)."""
    del id_batches
    return state

  def persistent(self, state) -> TableState:
    return state

  def from_persistent(self, persistent: TableState):
    return persistent

  # ---- what the table objects call, outside jit

  def fetch(self, state, ids) -> tuple[jax.Array, dict]:
    """The jitted lookup of prepared ids [...] (int32 in [0, R)): ([..., Dh] rows, what it
    moved as `base.Stats` increments). Nothing waits for the lookup unless the statistics
    need its route."""
    rows, _ = _jit_lookup(self, state, jnp.asarray(ids))
    return rows, self._moved(int(np.prod(np.shape(ids))), rows.shape[-1])

  def apply(self, state, ids, grads, lr, adam: OptimConfig) -> tuple[object, dict]:
    """The jitted update (the state donated): (new state, what it moved)."""
    state, _ = _jit_update(self, state, jnp.asarray(ids), jnp.asarray(grads), jnp.float32(lr), adam)
    return state, {}

  def _moved(self, n: int, dim: int) -> dict:
    """What a fetch of n ids moved between memories (nothing: the rows stay on the device)."""
    del n, dim
    return {}

  def numpy_parts(self, state) -> dict | None:
    """Zero-copy NumPy views {"values"[, "scale"]} of the stored table, or None where none
    exist (a GPU's memory, a sharded table)."""
    view = base.numpy_view(state.table)
    return None if view is None else {"values": view}

  def numpy_lookup(self, state, ids: np.ndarray, buffers, threads, lower=None):
    """The NumPy engine: ([..., Dh] rows of prepared ids, what moved), gathered on the host by a
    threaded `take` into a reused buffer and handed to jax (no copy on a CPU client). `lower`:
    stored parts to read instead of the state's (a disk tier)."""
    parts = lower or self.numpy_parts(jax.block_until_ready(state))
    target = self.device or jax.devices()[0]
    values = base.host_fetch(parts["values"], ids, buffers, target, threads)
    moved = self._moved(ids.size, values.shape[-1])
    if "scale" not in parts:
      return (values if values.dtype == self.dtype else values.astype(self.dtype)), moved
    scale = base.host_fetch(parts["scale"], ids, buffers, target, threads=1)
    rows = _jit_decode({"values": values, "scale": scale}, storage="int8", dtype=self.dtype)
    return rows, moved

  def read_rows(self, state, lower=None) -> np.ndarray:
    """The whole stored table [Rp, Dh], decoded to `dtype`, as NumPy."""
    del lower
    return np.asarray(state.table)

  def row_bytes(self, dim: int) -> int:
    return storage_lib.row_bytes(self.storage, dim)


_jit_decode = jax.jit(storage_lib.decode, static_argnames=("storage", "dtype"))


@dataclasses.dataclass(frozen=True)
class HostBackend(Backend):
  """Pinned host memory: state `host.HostState(table, scale, opt)`."""

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
    if self.trainable and self.storage == "int8":
      raise ValueError("storage='int8' is read-only: train with 'float32' or 'bfloat16' rows")

  def init(self, rows):
    r = rows.shape[0]
    rows = jnp.pad(rows.astype(self.dtype), ((0, self.padded_rows(r) - r), (0, 0)))  # [Rp, Dh]
    parts = storage_lib.encode(rows, self.storage)
    opt = base.init_state(parts["values"]).opt if self.trainable else None
    return host.HostState(parts["values"], parts.get("scale"), opt)

  def build(self, rows_fn, num_rows, dim):
    rows = _host_rows(rows_fn, num_rows, 0, self.padded_rows(num_rows), dim, self.dtype)
    return self._place_lower(host.init(rows, self.device, self.storage, self.trainable))

  def _table_sharding(self):
    return self._single(host.PINNED_HOST)

  def _lower_shardings(self, state: host.HostState) -> host.HostState:
    t = self._table_sharding()
    opt = None
    if state.opt is not None:
      opt = state.opt._replace(mu=t, nu=t, count=self._single())
    return host.HostState(t, None if state.scale is None else t, opt)

  def _place_lower(self, state: host.HostState) -> host.HostState:
    placed = jax.tree.map(jax.device_put, state, self._lower_shardings(state))
    # An array restored into a pinned_host sharding can still carry a device memory space in
    # its aval; an explicit put to the host space fixes what jit sees.
    put = lambda x: None if x is None else jax.device_put(x, jax.memory.Space.Host)
    opt = placed.opt
    if opt is not None:
      opt = opt._replace(mu=put(opt.mu), nu=put(opt.nu))
    return host.HostState(put(placed.table), put(placed.scale), opt)

  def shardings(self, state):
    return self._lower_shardings(state)

  def place(self, state):
    return self._place_lower(state)

  def lookup_with_route(self, state, row_ids):
    return host.lookup(state, row_ids, jnp.dtype(self.dtype)), jnp.zeros((), bool)

  def update_with_route(self, state, row_ids, row_grads, lr, adam):
    return host.update(state, row_ids, row_grads, lr, adam), jnp.zeros((), bool)

  def persistent(self, state) -> TableState:
    if state.scale is not None:
      raise ValueError("persistent: an int8 table is a serving copy; checkpoints hold float32")
    return TableState(state.table, state.opt)

  def from_persistent(self, persistent: TableState):
    return host.HostState(persistent.table, None, persistent.opt)

  def numpy_parts(self, state):
    parts = {"values": base.numpy_view(state.table)}
    if state.scale is not None:
      parts["scale"] = base.numpy_view(state.scale)
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


@dataclasses.dataclass(frozen=True)
class ShardedBackend(Backend):
  """Rows split over one mesh axis (`sharded.ShardSpec`).

  Attributes:
    axis: the mesh axis (default: 'data', the training mesh's axis).
    slack: bucket capacity factor of the all-to-all route.
    route: 'all_to_all' (with the overflow path) or 'all_gather'.
  """

  kind: ClassVar[str] = "sharded"
  axis: str = sharding_lib.DATA_AXIS
  slack: float = 2.0
  route: str = "all_to_all"

  def __post_init__(self):
    super().__post_init__()
    if self.mesh is None:
      raise ValueError("memory='sharded': expected a mesh of several devices (--mesh > 1)")
    sharded.ShardSpec(self.mesh, self.axis, ROW_ALIGN, self.slack, self.route)  # validates

  @property
  def shards(self) -> int:
    return self.mesh.shape[self.axis]

  def padded_rows(self, num_rows):
    return base.padded_rows(num_rows, math.lcm(ROW_ALIGN, self.shards))

  def _spec(self, num_rows: int) -> sharded.ShardSpec:
    return sharded.ShardSpec(self.mesh, self.axis, num_rows, self.slack, self.route)

  def build(self, rows_fn, num_rows, dim):
    padded = self.padded_rows(num_rows)

    # Rows [start, stop) of the padded table; each device builds only its own shard.
    piece = lambda start, stop: _host_rows(rows_fn, num_rows, start, stop, dim, self.dtype)
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
      state, route = _jit_update(
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


@dataclasses.dataclass(frozen=True)
class TieredBackend(HostBackend):
  """A device cache over the host table: state `tiered.TieredState(cache, cached_ids, lower)`.

  Attributes:
    cache_rows: L; None: `memory.cache_fraction` of the padded rows.
  """

  kind: ClassVar[str] = "tiered"
  has_cache: ClassVar[bool] = True
  cache_rows: int | None = None

  def num_cache_rows(self, num_rows: int) -> int:
    """L for a table of `num_rows` (padded) rows."""
    if self.cache_rows is not None:
      return self.cache_rows
    return max(1, round(self.memory.cache_fraction * num_rows))

  def _empty_cache(self, lower: host.HostState, dim: int) -> tiered.TieredState:
    """An empty cache (no id hits it) above `lower`, until `calibrate` or `fill`."""
    rp = lower.table.shape[0] if lower is not None else 0
    c = self.num_cache_rows(rp)
    return tiered.TieredState(
      jnp.zeros((c, dim), self.dtype), jnp.full((c,), jnp.iinfo(jnp.int32).max, jnp.int32), lower
    )

  def init(self, rows):
    lower = super().init(rows)
    return self._empty_cache(lower, rows.shape[1])

  def build(self, rows_fn, num_rows, dim):
    lower = super().build(rows_fn, num_rows, dim)
    return self._place_cache(self._empty_cache(lower, dim))

  def build_read_only(self, dim: int, cache_rows: int) -> tiered.TieredState:
    """A state with no host table: a cache above a tier the objects read with NumPy (disk)."""
    state = dataclasses.replace(self, cache_rows=cache_rows)._empty_cache(None, dim)
    return self._place_cache(state)

  def _place_cache(self, state):
    on_device = self._single()
    return state._replace(
      cache=jax.device_put(state.cache, on_device),
      cached_ids=jax.device_put(state.cached_ids, on_device),
    )

  def persistent(self, state) -> TableState:
    return super().persistent(state.lower)

  def from_persistent(self, persistent: TableState):
    return self._empty_cache(super().from_persistent(persistent), persistent.table.shape[1])

  def shardings(self, state):
    on_device = self._single()
    return tiered.TieredState(on_device, on_device, self._lower_shardings(state.lower))

  def place(self, state):
    return self._place_cache(state._replace(lower=self._place_lower(state.lower)))

  def _miss_capacity(self, row_ids) -> int:
    return max(256, int(np.prod(jnp.shape(row_ids))) // 4)

  def lookup_with_route(self, state, row_ids):
    dtype = jnp.dtype(self.dtype)
    return tiered.lookup_with_route(state, row_ids, self._miss_capacity(row_ids), dtype)

  def update_with_route(self, state, row_ids, row_grads, lr, adam):
    return tiered.update(state, row_ids, row_grads, lr, adam), jnp.zeros((), bool)

  def calibrate(self, state, id_batches):
    """The cache filled with the L rows `id_batches` (flat row ids) read most often.

    Runs outside jit: counts on the host, then reads the chosen rows from the host table.
    """
    rows = state.lower.table.shape[0]
    counts = np.zeros(rows, np.int64)
    for ids in id_batches:
      counts += np.bincount(np.asarray(ids).reshape(-1), minlength=rows)[:rows]
    return self.fill(state, tiered.hottest_rows(counts, state.cache.shape[0]))

  def fill(self, state, row_ids: np.ndarray, lower: dict | None = None):
    """The state with the rows `row_ids` (at most L, distinct) in its cache, read from the
    host table (or from `lower`, NumPy parts of a tier below)."""
    c = state.cache.shape[0]
    ids = np.full((c,), np.iinfo(np.int32).max, np.int32)  # [L]; int32 max: an empty slot
    ids[: row_ids.shape[0]] = np.sort(row_ids)
    if lower is not None:
      clamped = np.minimum(ids, lower["values"].shape[0] - 1)  # empty slots read any row
      cached = jnp.asarray(self._gather_decoded(lower, clamped))  # [L, Dh]
    else:
      # [L, Dh]; empty slots read a clamped row that no id hits
      cached = host.jit_lookup(state.lower, jnp.asarray(ids), dtype=jnp.dtype(self.dtype))
    return self._place_cache(state._replace(cache=cached, cached_ids=jnp.asarray(ids)))

  def numpy_parts(self, state):
    return None if state.lower is None else super().numpy_parts(state.lower)

  def _gather_decoded(self, parts: dict, ids: np.ndarray) -> np.ndarray:
    """[U] ids -> [U, Dh] rows of stored NumPy parts, gathered and decoded."""
    got = {k: base.gather_rows(v, ids) for k, v in parts.items()}
    return storage_lib.decode(got, self.storage, self.dtype)

  def _hits(self, n: int, hit: np.ndarray, moved: int, dim: int) -> dict:
    hits = int(hit.sum())
    return {"hits": hits, "misses": n - hits, "bytes_to_device": moved * self.row_bytes(dim)}

  def fetch(self, state, ids):
    rows, overflow = _jit_lookup(self, state, jnp.asarray(ids))
    flat = np.asarray(ids).reshape(-1)  # [...] -> [N]
    _, hit = _probe(np.asarray(state.cached_ids), flat)
    # The distinct misses crossed, or every id where there were more than the capacity.
    moved = flat.shape[0] if bool(np.asarray(overflow)) else np.unique(flat[~hit]).shape[0]
    return rows, self._hits(flat.shape[0], hit, moved, rows.shape[-1])

  def numpy_lookup(self, state, ids, buffers, threads, lower=None):
    """Hits from the cache, the distinct misses from the tier below, gathered by NumPy."""
    parts = lower or self.numpy_parts(jax.block_until_ready(state))
    flat = np.asarray(ids).reshape(-1)  # [...] -> [N]
    n, dh = flat.shape[0], state.cache.shape[1]
    pos, hit = _probe(np.asarray(state.cached_ids), flat)
    miss = np.flatnonzero(~hit)  # [Nm]
    unique, src = np.unique(flat[miss], return_inverse=True)  # [U], [Nm]
    miss_rows = self._gather_decoded(parts, unique)  # [U, Dh]
    moved = self._hits(n, hit, unique.shape[0], dh)
    target = self.device or jax.devices()[0]
    cache_view = base.numpy_view(jax.block_until_ready(state.cache))
    if cache_view is not None:
      # Both tiers readable by NumPy (a CPU client): gather there, hand the rows over.
      out = buffers.take((*np.shape(ids), dh), self.dtype)
      flat_out = out.reshape(n, dh)  # [..., Dh] -> [N, Dh] view
      base.gather_rows(cache_view, np.where(hit, pos, 0), flat_out, threads)
      flat_out[miss] = miss_rows[src]
      return base.to_device(out, target), moved
    # Only the distinct missed rows cross (Zipfian ids repeat within a batch).
    rows = tiered.combine(state.cache, pos, hit, miss, miss_rows, src, target)  # [N, Dh]
    return rows.reshape(*np.shape(ids), dh), moved  # [N, Dh] -> [..., Dh]

  def read_rows(self, state, lower=None):
    return super().read_rows(state.lower, lower)


def _probe(cached_ids: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each id's cache slot [N] and whether it is cached [N] (host side)."""
  pos = np.minimum(np.searchsorted(cached_ids, flat), cached_ids.shape[0] - 1)
  return pos, cached_ids[pos] == flat


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
