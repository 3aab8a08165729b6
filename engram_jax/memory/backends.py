"""The backend contract: one set of pure functions per memory kind, over one state pytree.

`backend(memory_cfg, mesh)` is the only place a kind is looked up. What it returns answers, for
one Engram layer's table:

- `init(rows) -> state`: rows [R, Dh] padded to `padded_rows(R)` with zero rows (never
  addressed), with zero sparse-Adam moments; jit it (or `jax.eval_shape` it), then `place`;
- `lookup(state, row_ids) -> rows`: flat row ids [...] -> [..., Dh] (inside the jitted step);
- `update(state, row_ids, row_grads, lr, adam) -> state`: lazy Adam on the rows read;
- `shardings(state)`: where every array of the state lives (and `place(state)` puts it there);
- `calibrate(state, id_batches) -> state`: fills a device cache from the row ids of some
  batches (host work, outside jit); the identity except for 'tiered';
- `persistent(state) -> TableState` and `from_persistent(TableState) -> state`: what a
  checkpoint holds, the same (table, moments) for every kind, so a checkpoint written with one
  kind restores into any other (orbax places each array where `shardings` says).

The kinds:
- 'device': one device's memory (replicated over the mesh, if there is one);
- 'host': `pinned_host` memory; the step gathers on the host and moves only the fetched rows
  (`memory.host`); the sparse update writes back on the host;
- 'sharded': rows split over the mesh's data axis; ids and rows travel with `all_to_all`
  (`memory.sharded`);
- 'tiered': as 'host', plus a device cache of the rows the calibration batches read most
  (`memory.tiered`): hits come from device memory, only misses cross from the host, and the
  update writes the new values of cached rows through to the cache. The cache lives in the
  state but is derived: `persistent` drops it, `calibrate` rebuilds it.

The stateful table objects of `memory.create` (serving, benchmarks) run the same backend
modules' functions.

Shapes: R rows, Rp padded rows, Dh row width, L cached rows, N ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax import sharding as sharding_lib
from engram_jax.config import MEMORY_KINDS, MemoryConfig, OptimConfig
from engram_jax.memory import base, device, host, sharded, tiered
from engram_jax.memory.base import TableState

# Rows are padded to a multiple of this, so a table splits evenly over any mesh of up to 128
# devices (a power of two) and has the same shape under every backend.
ROW_ALIGN = 128
# Batches whose row ids decide a tiered cache's contents.
CALIBRATION_BATCHES = 8


def table_key(layer: int) -> str:
  """The key of an Engram layer's table in a state or checkpoint (strings keep checkpoints
  readable)."""
  return f"layer_{layer}"


def padded_rows(num_rows: int) -> int:
  """Rp: R rounded up to a multiple of `ROW_ALIGN`."""
  return base.padded_rows(num_rows, ROW_ALIGN)


class CachedState(NamedTuple):
  """The tiered state: the host table and its moments, and the device cache above them.

  Attributes:
    table: [Rp, Dh] in pinned host memory.
    opt: its `TableOptState` (pinned host; count on device).
    cache: [L, Dh] rows on the device.
    cached_ids: [L] sorted int32 row ids of the cache (Rp in empty slots).
  """

  table: jax.Array
  opt: object
  cache: jax.Array
  cached_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class Backend:
  """The 'device' backend; the other kinds override what differs.

  Attributes:
    memory: the memory settings (kind, cache fraction, lookup implementation).
    mesh: the data-parallel mesh, or None for one device.
  """

  kind: ClassVar[str] = "device"
  memory: MemoryConfig
  mesh: Mesh | None = None

  def __post_init__(self):
    if self.memory.kind != self.kind:
      raise ValueError(f"memory.kind: expected {self.kind!r}, got {self.memory.kind!r}")

  def init(self, rows: jax.Array):
    """A fresh, unplaced state of rows [R, Dh] (jit it; `place` then moves it)."""
    r = rows.shape[0]
    return base.init_state(jnp.pad(rows, ((0, padded_rows(r) - r), (0, 0))))  # -> [Rp, Dh]

  def persistent(self, state) -> TableState:
    return state

  def from_persistent(self, persistent: TableState):
    return persistent

  def _table_sharding(self):
    return sharding_lib.replicated(self.mesh)

  def _persistent_shardings(self, state) -> TableState:
    t = self._table_sharding()
    count = sharding_lib.replicated(self.mesh)
    return TableState(t, state.opt._replace(mu=t, nu=t, count=count))

  def shardings(self, state):
    return self._persistent_shardings(state)

  def place(self, state):
    """Moves a state (fresh or restored) to `shardings(state)`."""
    return jax.tree.map(jax.device_put, state, self.shardings(state))

  def lookup(self, state, row_ids: jax.Array) -> jax.Array:
    return device.lookup(state, row_ids, implementation=self.memory.lookup_impl)

  def update(self, state, row_ids, row_grads, lr, adam: OptimConfig):
    return device.update(state, row_ids, row_grads, lr, adam)

  def calibrate(self, state, id_batches: Iterable[np.ndarray]):
    """The state with its cache filled from flat row ids (identity without a cache)."""
    del id_batches
    return state


@dataclasses.dataclass(frozen=True)
class HostBackend(Backend):
  kind: ClassVar[str] = "host"

  def __post_init__(self):
    super().__post_init__()
    if self.mesh is not None:
      raise ValueError(
        f"memory={self.kind!r}: expected one device (no --mesh); use 'sharded' to spread a "
        "table over several devices"
      )

  def _table_sharding(self):
    return host.host_sharding()

  def place(self, state):
    placed = super().place(state)
    # An array restored into a pinned_host sharding can still carry a device memory space in
    # its aval; an explicit put to the host space fixes what jit sees.
    space = jax.memory.Space.Host
    opt = placed.opt._replace(mu=jax.device_put(placed.opt.mu, space))
    opt = opt._replace(nu=jax.device_put(placed.opt.nu, space))
    return placed._replace(table=jax.device_put(placed.table, space), opt=opt)

  def _host(self, state) -> host.HostState:
    return host.HostState(state.table, None, state.opt)

  def lookup(self, state, row_ids):
    return host.lookup(self._host(state), row_ids, state.table.dtype)

  def update(self, state, row_ids, row_grads, lr, adam):
    new = host.update(self._host(state), row_ids, row_grads, lr, adam)
    return state._replace(table=new.table, opt=new.opt)


@dataclasses.dataclass(frozen=True)
class ShardedBackend(Backend):
  kind: ClassVar[str] = "sharded"

  def __post_init__(self):
    super().__post_init__()
    if self.mesh is None:
      raise ValueError("memory='sharded': expected a mesh of several devices (--mesh > 1)")

  def _table_sharding(self):
    return NamedSharding(self.mesh, P(sharding_lib.DATA_AXIS, None))

  def _spec(self, state) -> sharded.ShardSpec:
    return sharded.ShardSpec(self.mesh, sharding_lib.DATA_AXIS, state.table.shape[0])

  def lookup(self, state, row_ids):
    return sharded.lookup(state, row_ids, self._spec(state))

  def update(self, state, row_ids, row_grads, lr, adam):
    return sharded.update(state, row_ids, row_grads, lr, adam, self._spec(state))


@dataclasses.dataclass(frozen=True)
class TieredBackend(HostBackend):
  kind: ClassVar[str] = "tiered"

  def cache_rows(self, num_rows: int) -> int:
    """L for a table of `num_rows` (padded) rows."""
    return max(1, round(self.memory.cache_fraction * num_rows))

  def init(self, rows):
    table = super().init(rows)
    c = self.cache_rows(table.table.shape[0])
    return self.from_persistent(table, cache_rows=c)

  def persistent(self, state) -> TableState:
    return TableState(state.table, state.opt)

  def from_persistent(self, persistent: TableState, cache_rows: int | None = None):
    """An empty cache (no id hits it) above the table, until `calibrate`."""
    rp, dh = persistent.table.shape
    c = cache_rows or self.cache_rows(rp)
    return CachedState(
      persistent.table,
      persistent.opt,
      jnp.zeros((c, dh), persistent.table.dtype),
      jnp.full((c,), rp, jnp.int32),
    )

  def shardings(self, state):
    on_device = sharding_lib.replicated(None)
    table = self._persistent_shardings(state)
    return CachedState(table.table, table.opt, on_device, on_device)

  def _tiered(self, state) -> tiered.TieredState:
    return tiered.TieredState(state.cache, state.cached_ids, self._host(state))

  def lookup(self, state, row_ids):
    miss_capacity = max(256, int(np.prod(jnp.shape(row_ids))) // 4)
    return tiered.lookup(self._tiered(state), row_ids, miss_capacity, state.table.dtype)

  def update(self, state, row_ids, row_grads, lr, adam):
    new = tiered.update(self._tiered(state), row_ids, row_grads, lr, adam)
    return CachedState(new.lower.table, new.lower.opt, new.cache, new.cached_ids)

  def calibrate(self, state, id_batches):
    """The cache filled with the L rows `id_batches` (flat row ids) read most often.

    Runs outside jit: counts on the host, then reads the chosen rows from the host table.
    """
    rows = state.table.shape[0]
    counts = np.zeros(rows, np.int64)
    for ids in id_batches:
      counts += np.bincount(np.asarray(ids).reshape(-1), minlength=rows)[:rows]
    c = state.cache.shape[0]
    hot = tiered.hottest_rows(counts, c)  # [<= L] sorted
    ids = np.full((c,), rows, np.int32)  # [L]; Rp marks an empty slot (after every row id)
    ids[: hot.shape[0]] = hot
    cached = jax.jit(host.lookup, static_argnames="dtype")(
      self._host(state), jnp.asarray(ids), dtype=state.table.dtype
    )  # [L, Dh]; empty slots read a clamped row that no id hits
    on_device = sharding_lib.replicated(None)
    return state._replace(
      cache=jax.device_put(cached, on_device),
      cached_ids=jax.device_put(jnp.asarray(ids), on_device),
    )


# The one place a kind is looked up: its functional backend (training, serving the
# `backend(...)` contract) and its stateful table object (`memory.create`).
_REGISTRY = {
  "device": (Backend, device.DeviceTable),
  "host": (HostBackend, host.HostTable),
  "sharded": (ShardedBackend, sharded.ShardedTable),
  "tiered": (TieredBackend, tiered.TieredTable),
}
KINDS = MEMORY_KINDS
assert set(_REGISTRY) == set(KINDS)


def _lookup(kind: str, field: str):
  if kind not in _REGISTRY:
    raise ValueError(f"{field}: expected one of {KINDS}, got {kind!r}")
  return _REGISTRY[kind]


def table_class(kind: str) -> type[base.MemoryTable]:
  """The stateful table object of a kind (`memory.create`)."""
  return _lookup(kind, "kind")[1]


def backend(memory_cfg: MemoryConfig, mesh: Mesh | None = None) -> Backend:
  """The backend of `memory_cfg.kind` on `mesh` (None: one device).

  Raises:
    ValueError: an unknown kind, or a kind that does not fit the mesh.
  """
  return _lookup(memory_cfg.kind, "memory")[0](memory_cfg, mesh)
