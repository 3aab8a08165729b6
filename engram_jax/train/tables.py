"""Where the training state's Engram tables live, and how a jitted step reads and updates them.

Every backend keeps one layer's table in the same form, `memory.base.TableState(table [Rp, Dh],
TableOptState(mu, nu, count))`, with the rows padded to a multiple of `ROW_ALIGN` (the padding
rows are never addressed). Only the placement of the arrays differs:

- 'device': one device's memory (replicated over the mesh, if there is one);
- 'host': `pinned_host` memory; the jitted step gathers on the host and moves only the fetched
  rows (`memory.host`), and the sparse update writes back on the host;
- 'sharded': rows split over the mesh's data axis; ids and rows travel with `all_to_all`
  (`memory.sharded`), while the backbone trains data-parallel on the same axis;
- 'tiered': as 'host', plus a device cache of the rows the first batches read most
  (`memory.tiered`): hits are served from device memory, only misses cross from the host, and
  the update writes the new values of cached rows through to the cache. The cache is derived
  state (`TableCache`): it is not checkpointed but rebuilt by `calibrate` on start and resume.

Because the arrays have the same shapes everywhere, a checkpoint written with one backend
restores into another: orbax places each array where the new backend's sharding says.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from engram_jax.config import OptimConfig
from engram_jax.memory import base, device, host, sharded, tiered

KINDS = ("device", "host", "sharded", "tiered")
# Batches whose row ids decide the tiered cache's contents.
CALIBRATION_BATCHES = 8
# Rows are padded to a multiple of this, so a table splits evenly over any mesh of up to 128
# devices (a power of two) and has the same shape under every backend.
ROW_ALIGN = 128
DATA_AXIS = "data"


def padded_rows(num_rows: int) -> int:
  return -(-num_rows // ROW_ALIGN) * ROW_ALIGN


def make_mesh(num_devices: int) -> Mesh | None:
  """A 1-D data-parallel mesh over the first `num_devices` devices (None for one device).

  Raises:
    ValueError: more devices than jax sees.
  """
  available = jax.device_count()
  if num_devices < 1 or num_devices > available:
    raise ValueError(
      f"mesh: expected 1..{available} devices (jax.device_count()), got {num_devices}"
    )
  if num_devices == 1:
    return None
  return jax.make_mesh(
    (num_devices,),
    (DATA_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[:num_devices],
  )


@dataclasses.dataclass(frozen=True)
class Placement:
  """A backend and a mesh.

  Attributes:
    kind: 'device', 'host' or 'sharded'.
    mesh: a 1-D mesh with axis 'data' for data-parallel training, or None (one device).
  """

  kind: str = "device"
  mesh: Mesh | None = None
  cache_fraction: float = 0.05

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"memory: expected one of {KINDS}, got {self.kind!r}")
    if not 0 < self.cache_fraction <= 1:
      raise ValueError(f"cache_fraction: expected a fraction in (0, 1], got {self.cache_fraction}")
    if self.kind == "sharded" and self.mesh is None:
      raise ValueError("memory='sharded': expected a mesh of several devices (--mesh > 1)")
    if self.kind in ("host", "tiered") and self.mesh is not None:
      raise ValueError(
        f"memory={self.kind!r}: expected one device (no --mesh); use "
        "'sharded' to spread a table over several devices"
      )

  @property
  def shards(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape[DATA_AXIS]

  def replicated(self):
    """Sharding of the backbone's parameters and of scalars."""
    if self.mesh is None:
      return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(self.mesh, P())

  def batch_sharding(self):
    """Sharding of the batch's arrays: split over the data axis on their leading dimension."""
    if self.mesh is None:
      return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(self.mesh, P(DATA_AXIS))

  def table_sharding(self):
    """Sharding (and memory kind) of a table and its moments."""
    if self.kind in ("host", "tiered"):
      return host.host_sharding()
    if self.kind == "sharded":
      return NamedSharding(self.mesh, P(DATA_AXIS, None))
    return self.replicated()

  def state_shardings(self, state: base.TableState) -> base.TableState:
    t = self.table_sharding()
    count = self.replicated()
    return jax.tree.map(lambda _: t, state)._replace(
      opt=state.opt._replace(mu=t, nu=t, count=count)
    )

  def place(self, state: base.TableState) -> base.TableState:
    """Moves a table state (anywhere) to this placement."""
    placed = jax.tree.map(jax.device_put, state, self.state_shardings(state))
    if self.kind in ("host", "tiered"):
      # An array restored into a pinned_host sharding can still carry a device memory space
      # in its aval; an explicit put to the host space fixes what jit sees.
      host_space = jax.memory.Space.Host
      placed = placed._replace(
        table=jax.device_put(placed.table, host_space),
        opt=placed.opt._replace(
          mu=jax.device_put(placed.opt.mu, host_space), nu=jax.device_put(placed.opt.nu, host_space)
        ),
      )
    return placed

  def _spec(self, state: base.TableState) -> sharded.ShardSpec:
    return sharded.ShardSpec(self.mesh, DATA_AXIS, state.table.shape[0])

  def lookup(self, state: base.TableState, ids: jax.Array, cache: TableCache | None = None):
    """Rows of flat row ids (inside the jitted step): [...] -> [..., Dh]."""
    if self.kind == "tiered":
      return tiered.lookup(_tiered(state, cache), ids, _miss_capacity(ids), state.table.dtype)
    if self.kind == "host":
      return host.lookup(host.HostState(state.table, None, state.opt), ids, state.table.dtype)
    if self.kind == "sharded":
      return sharded.lookup(state, ids, self._spec(state))
    return device.lookup(state, ids)

  def update(
    self, state: base.TableState, ids, grads, lr, cfg: OptimConfig, cache: TableCache | None = None
  ):
    """Lazy Adam on the rows the step read (inside the jitted step).

    Returns:
      The new state; for 'tiered', (state, cache) with the cache written through.
    """
    if self.kind == "tiered":
      new = tiered.update(_tiered(state, cache), ids, grads, lr, cfg)
      return (
        base.TableState(new.lower.table, new.lower.opt),
        TableCache(new.cache, new.cached_ids),
      )
    if self.kind == "host":
      new = host.update(host.HostState(state.table, None, state.opt), ids, grads, lr, cfg)
      return base.TableState(new.table, new.opt)
    if self.kind == "sharded":
      return sharded.update(state, ids, grads, lr, cfg, self._spec(state))
    return device.update(state, ids, grads, lr, cfg)


class TableCache(NamedTuple):
  """The tiered backend's device cache: rows [C, Dh] and their sorted row ids [C]."""

  rows: jax.Array
  ids: jax.Array


def _tiered(state: base.TableState, cache: TableCache) -> tiered.TieredState:
  if cache is None:
    raise ValueError("memory='tiered': the table has no cache; calibrate it first")
  return tiered.TieredState(cache.rows, cache.ids, host.HostState(state.table, None, state.opt))


def _miss_capacity(ids) -> int:
  """Distinct missed rows moved per lookup before falling back to moving every id (no id is
  dropped)."""
  return max(256, int(np.prod(jnp.shape(ids))) // 4)


def calibrate(state: base.TableState, id_batches, fraction: float) -> TableCache:
  """A cache of the `fraction` of rows read most often by `id_batches` (flat row ids).

  Runs outside jit: counts on the host, then reads the chosen rows from the host table.
  """
  rows = state.table.shape[0]
  counts = np.zeros(rows, np.int64)
  for ids in id_batches:
    counts += np.bincount(np.asarray(ids).reshape(-1), minlength=rows)[:rows]
  c = max(1, round(fraction * rows))
  ids = np.sort(np.argsort(-counts, kind="stable")[:c]).astype(np.int32)  # [C]
  host_state = host.HostState(state.table, None, state.opt)
  cached = jax.jit(host.lookup, static_argnames="dtype")(
    host_state, jnp.asarray(ids), dtype=state.table.dtype
  )
  return TableCache(
    jax.device_put(cached, jax.devices()[0]), jax.device_put(jnp.asarray(ids), jax.devices()[0])
  )


def init_state(table: jax.Array) -> base.TableState:
  """A table [R, Dh] padded to `padded_rows(R)` with zero rows, with zero moments."""
  r = table.shape[0]
  table = jnp.pad(table, ((0, padded_rows(r) - r), (0, 0)))  # [R, Dh] -> [Rp, Dh]
  return base.init_state(table)
