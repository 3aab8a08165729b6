"""The backend contract: what every memory backend answers, and the 'device' backend.

Every memory backend is a frozen dataclass of pure functions over one state pytree; `Backend`
(the 'device' kind) is the base the others extend (`host.HostBackend`,
`sharded_backend.ShardedBackend`, `tiered.TieredBackend`), and
`backends.backend(memory_cfg, mesh)` is the only place a kind is looked up. For one Engram
layer's table, a backend answers:

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
  bfloat16, int8 or mxfp8 (the quantised types read-only);
- 'sharded': rows split over a mesh axis ('data' in training); ids and rows travel with
  `all_to_all` (`memory.sharded`, adapted by `memory.sharded_backend`);
- 'tiered': as 'host', plus a device cache of the rows the calibration batches read most
  (`memory.tiered`): hits come from device memory, only misses cross from the host, and the
  update writes the new values of cached rows through to the cache. The cache lives in the
  state but is derived: `persistent` drops it, `calibrate` rebuilds it.

Shapes: R rows, Rp padded rows, Dh row width, L cached rows, N ids.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from engram_jax import sharding as sharding_lib
from engram_jax.config import MemoryConfig, OptimConfig
from engram_jax.memory import base, device, host_buffers
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


def host_rows(rows_fn: RowsFn, num_rows: int, start: int, stop: int, dim: int, dtype):
  """Rows [start, stop) of the padded table as NumPy [stop - start, Dh]: `rows_fn`'s rows
  (of the R real ones), copied piece by piece, then zero rows."""
  out = np.zeros((stop - start, dim), dtype)
  for a in range(start, min(stop, num_rows), _BUILD_CHUNK_ROWS):
    b = min(a + _BUILD_CHUNK_ROWS, stop, num_rows)
    out[a - start : b - start] = rows_fn(a, b)
  return out


@functools.partial(jax.jit, static_argnums=0)
def jit_lookup(backend, state, ids):
  return backend.lookup_with_route(state, ids)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=1)
def jit_update(backend, state, ids, grads, lr, adam):
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
    table_axes: the mesh axes a backend that splits the table spreads it over (None: every
      axis of the mesh); the others ignore it.
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
  table_axes: tuple[str, ...] | None = None

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
    rows = host_rows(rows_fn, num_rows, 0, num_rows, dim, self.dtype)
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
    state = device.update(state, row_ids, row_grads, lr, adam, self.memory.lookup_impl)
    return state, jnp.zeros((), bool)

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
    rows, _ = jit_lookup(self, state, jnp.asarray(ids))
    return rows, self._moved(int(np.prod(np.shape(ids))), rows.shape[-1])

  def apply(self, state, ids, grads, lr, adam: OptimConfig) -> tuple[object, dict]:
    """The jitted update (the state donated): (new state, what it moved)."""
    state, _ = jit_update(self, state, jnp.asarray(ids), jnp.asarray(grads), jnp.float32(lr), adam)
    return state, {}

  def _moved(self, n: int, dim: int) -> dict:
    """What a fetch of n ids moved between memories (nothing: the rows stay on the device)."""
    del n, dim
    return {}

  def numpy_parts(self, state) -> dict | None:
    """Zero-copy NumPy views {"values"[, "scale"]} of the stored table, or None where none
    exist (a GPU's memory, a sharded table)."""
    view = host_buffers.numpy_view(state.table)
    return None if view is None else {"values": view}

  def numpy_lookup(self, state, ids: np.ndarray, buffers, threads, lower=None):
    """The NumPy engine: ([..., Dh] rows of prepared ids, what moved), gathered on the host by a
    threaded `take` into a reused buffer and handed to jax (no copy on a CPU client). `lower`:
    stored parts to read instead of the state's (a disk tier)."""
    parts = lower or self.numpy_parts(jax.block_until_ready(state))
    target = self.device or jax.devices()[0]
    values = host_buffers.host_fetch(parts["values"], ids, buffers, target, threads)
    moved = self._moved(ids.size, values.shape[-1])
    if "scale" not in parts:
      return (values if values.dtype == self.dtype else values.astype(self.dtype)), moved
    scale = host_buffers.host_fetch(parts["scale"], ids, buffers, target, threads=1)
    rows = jit_decode({"values": values, "scale": scale}, storage=self.storage, dtype=self.dtype)
    return rows, moved

  def read_rows(self, state, lower=None) -> np.ndarray:
    """The whole stored table [Rp, Dh], decoded to `dtype`, as NumPy."""
    del lower
    return np.asarray(state.table)

  def row_bytes(self, dim: int) -> int:
    return storage_lib.row_bytes(self.storage, dim)


jit_decode = jax.jit(storage_lib.decode, static_argnames=("storage", "dtype"))
