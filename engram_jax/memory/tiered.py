"""The `tiered` backend: a device cache of hot rows over a host table (or a disk tier).

Hashed n-gram accesses are Zipfian, so a small cache of the most frequent rows serves most
ids from device memory; only misses cross from the tier below. Which rows are hot comes from
access counts: gathered by a calibration pass over data (`calibrate`, policy 'static'), or
online (policy 'lfu': counts of the fetched ids, aged by halving, and the cache refilled with
the top rows every `refresh_every` fetches; policy 'lru': refilled with the L rows accessed most
recently, counting every access of every fetch in order). Below the cache sits a `host` table
(trainable; pinned host memory) or, with `disk=<directory written by storage.save_memmap>`, a
read-only NumPy memmap for tables larger than RAM (the OS page cache is then the host level).

Pure-functional core, for one jitted step (the cache contents change only between steps):

    state = backend.calibrate(state, id_batches)     # TieredState: cache + host state
    rows = tiered.lookup(state, ids, miss_capacity)  # hits from the cache, misses from host
    state = tiered.update(state, ids, row_grads, lr, optim_cfg)   # host update + write-through

`lookup` deduplicates the misses and compacts them to `miss_capacity` distinct rows so only those
cross; if a step misses more distinct rows, it gathers every id from the host instead (no id is
dropped). The table object (`memory.create('tiered', ...)`, `memory.objects`) runs the same
functions through `TieredBackend` (below); on a CPU client its NumPy engine looks up
each id's cache slot on the host and gathers the hits from the cache and only the distinct
missed rows from the tier below; where the cache is not readable by NumPy, `combine` places the
transferred misses among the cache rows in one jitted call.

Shapes: R table rows, L cached rows, Dh row width, N ids, U distinct missed rows moved per
call (in the pure core, its miss capacity), Nm ids of one fetch that missed (repeats counted).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from engram_jax.config import OptimConfig
from engram_jax.memory import contract, dispatch, host, host_buffers, validation
from engram_jax.memory import storage as storage_lib
from engram_jax.memory.base import TableState
from engram_jax.memory.optimizer import dedup

# Cache policies of the table objects (`memory.objects`).
POLICIES = ("static", "lfu", "lru")


class TieredState(NamedTuple):
  """Attributes: cache [L, Dh] rows on device; cached_ids [L] sorted int32 row ids of the
  cache (R in empty slots); lower: the `host.HostState` below."""

  cache: jax.Array
  cached_ids: jax.Array
  lower: host.HostState


def hottest_rows(counts: np.ndarray, capacity: int) -> np.ndarray:
  """What a cache of `capacity` rows holds: the rows with the highest nonzero `counts` [R]
  (at most `capacity` of them), sorted, int32. Training's calibration and the table objects'
  policies both choose with it."""
  if np.count_nonzero(counts) <= capacity:
    rows = np.nonzero(counts)[0]
  else:
    rows = np.argpartition(counts, -capacity)[-capacity:]
  return np.sort(rows).astype(np.int32)


def _probe(cached_ids, flat):
  c = cached_ids.shape[0]
  pos = jnp.minimum(jnp.searchsorted(cached_ids, flat), c - 1)  # [N]
  return pos, cached_ids[pos] == flat


def lookup_with_route(
  state: TieredState, ids, miss_capacity: int, dtype=jnp.float32, implementation: str = "auto"
) -> tuple[jax.Array, jax.Array]:
  """Rows of flat row ids: hits from the cache, misses gathered on the host (pure; jit it).

  The missed ids are deduplicated (one sort of the N ids) and compacted to `miss_capacity`
  distinct rows, so only those cross from the host; with more distinct misses, every id is
  gathered from the host instead (no id is dropped).

  Args:
    state: cache and host table.
    ids: [...] flat row ids (clamped to [0, R)).
    miss_capacity: U, distinct missed rows moved per call before the fallback.
    dtype: the rows' dtype.
    implementation: the device gathers (the cache's hits, the misses' places) and the decoding
      of the missed rows: 'pallas', 'xla' or 'auto' (`memory.dispatch`).

  Returns:
    ([..., Dh] rows, bool scalar: True where the fallback moved every id).
  """
  r, dh = state.lower.table.shape
  flat = validation.clip_ids(ids, 0, r - 1).reshape(-1)  # [...] -> [N] int32
  pos, hit = _probe(state.cached_ids, flat)
  # Misses keyed by their row, hits by R: the distinct missed rows come first, sorted, and
  # each id gets its distinct row's slot.
  key = jnp.where(hit, r, flat)  # [N]
  unique, slot = dedup(key, r)  # [N], [N]
  n = flat.shape[0]
  compact = jnp.pad(unique, (0, max(0, miss_capacity - n)))[:miss_capacity]  # [U] (R: unused)
  distinct = jnp.sum(unique < r)

  def few():
    rows = host.lookup(state.lower, compact, dtype, implementation)  # [U, Dh]
    # [U, Dh] -> [N, Dh]
    return dispatch.gather_rows(rows, slot, implementation=implementation)

  many = lambda: host.lookup(state.lower, flat, dtype, implementation)  # [N, Dh]
  overflow = distinct > miss_capacity
  misses = lax.cond(overflow, many, few)
  hits = dispatch.gather_rows(state.cache, pos, dtype=dtype, implementation=implementation)
  rows = jnp.where(hit[:, None], hits, misses)  # [N, Dh]
  return rows.reshape(*jnp.shape(ids), dh), overflow  # [N, Dh] -> [..., Dh]


def lookup(
  state: TieredState, ids, miss_capacity: int, dtype=jnp.float32, implementation: str = "auto"
) -> jax.Array:
  """`lookup_with_route` without the route: [...] ids -> [..., Dh] rows."""
  return lookup_with_route(state, ids, miss_capacity, dtype, implementation)[0]


def update(state: TieredState, ids, grads, lr, cfg: OptimConfig) -> TieredState:
  """Lazy Adam on the host table, new values of cached rows written to the cache (pure)."""
  lower, unique, new_rows = host.update_rows(state.lower, ids, grads, lr, cfg)
  pos, hit = _probe(state.cached_ids, unique)
  c = state.cache.shape[0]
  cache = state.cache.at[jnp.where(hit, pos, c)].set(
    new_rows.astype(state.cache.dtype), mode="drop"
  )
  return TieredState(cache, state.cached_ids, lower)


@jax.jit
def _combine(cache, slots, miss_pos, miss_rows, miss_src):
  """Cache rows at hits, transferred rows at misses.

  Args:
    cache: [L, Dh] cached rows.
    slots: [N] cache slot of each id (any slot at misses).
    miss_pos: [Nm'] positions of the misses among the N ids, padded (N in padding: dropped).
    miss_rows: [U', Dh] the distinct missed rows, as transferred (padded).
    miss_src: [Nm'] which of the U rows each miss takes (padded like `miss_pos`).
  """
  rows = jnp.take(cache, slots, axis=0)  # [N] -> [N, Dh]
  fill = jnp.take(miss_rows, miss_src, axis=0).astype(cache.dtype)  # [U', Dh] -> [Nm', Dh]
  return rows.at[miss_pos].set(fill, mode="drop")  # misses in place


def _bucket(n: int) -> int:
  """Padded size for n transferred rows: a power of two (few recompilations)."""
  return max(256, 1 << max(n - 1, 0).bit_length())


def combine(cache, pos, hit, miss, miss_rows, src, device) -> jax.Array:
  """Rows of N ids on `device` from the cache and host rows of the misses, where the cache
  cannot be read by NumPy (a GPU): only the distinct missed rows cross.

  Args:
    cache: [L, Dh] the device cache.
    pos: [N] each id's cache slot (host), valid where `hit`.
    hit: [N] bools (host).
    miss: [Nm] positions of the misses (host).
    miss_rows: [U, Dh] the distinct missed rows (host, NumPy).
    src: [Nm] which of them each miss takes.
    device: where the rows go.

  Returns:
    [N, Dh] rows.
  """
  n, m, u = pos.shape[0], miss.shape[0], miss_rows.shape[0]
  rows = np.zeros((_bucket(u), miss_rows.shape[1]), miss_rows.dtype)  # [U', Dh]
  rows[:u] = miss_rows
  miss_pos = np.full((_bucket(m),), n, np.int32)  # position N: dropped by the combine
  miss_pos[:m] = miss
  miss_src = np.zeros_like(miss_pos)
  miss_src[:m] = src
  put = lambda x: jax.device_put(x, device)
  slots = np.where(hit, pos, 0).astype(np.int32)
  return _combine(cache, put(slots), put(miss_pos), put(rows), put(miss_src))


@dataclasses.dataclass(frozen=True)
class TieredBackend(host.HostBackend):
  """A device cache over the host table: state `TieredState(cache, cached_ids, lower)`.

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

  def _empty_cache(self, lower: host.HostState, dim: int) -> TieredState:
    """An empty cache (no id hits it) above `lower`, until `calibrate` or `fill`."""
    rp = lower.table.shape[0] if lower is not None else 0
    c = self.num_cache_rows(rp)
    return TieredState(
      jnp.zeros((c, dim), self.dtype), jnp.full((c,), jnp.iinfo(jnp.int32).max, jnp.int32), lower
    )

  def init(self, rows):
    lower = super().init(rows)
    return self._empty_cache(lower, rows.shape[1])

  def build(self, rows_fn, num_rows, dim):
    lower = super().build(rows_fn, num_rows, dim)
    return self._place_cache(self._empty_cache(lower, dim))

  def build_read_only(self, dim: int, cache_rows: int) -> TieredState:
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
    return TieredState(on_device, on_device, self._lower_shardings(state.lower))

  def place(self, state):
    return self._place_cache(state._replace(lower=self._place_lower(state.lower)))

  def _miss_capacity(self, row_ids) -> int:
    return max(256, int(np.prod(jnp.shape(row_ids))) // 4)

  def lookup_with_route(self, state, row_ids):
    capacity = self._miss_capacity(row_ids)
    return lookup_with_route(
      state, row_ids, capacity, jnp.dtype(self.dtype), self.memory.lookup_impl
    )

  def update_with_route(self, state, row_ids, row_grads, lr, adam):
    return update(state, row_ids, row_grads, lr, adam), jnp.zeros((), bool)

  def calibrate(self, state, id_batches):
    """The cache filled with the L rows `id_batches` (flat row ids) read most often.

    Runs outside jit: counts on the host, then reads the chosen rows from the host table.
    """
    rows = state.lower.table.shape[0]
    counts = np.zeros(rows, np.int64)
    for ids in id_batches:
      counts += np.bincount(np.asarray(ids).reshape(-1), minlength=rows)[:rows]
    return self.fill(state, hottest_rows(counts, state.cache.shape[0]))

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
    got = {k: host_buffers.gather_rows(v, ids) for k, v in parts.items()}
    return storage_lib.decode(got, self.storage, self.dtype)

  def _hits(self, n: int, hit: np.ndarray, moved: int, dim: int) -> dict:
    hits = int(hit.sum())
    return {"hits": hits, "misses": n - hits, "bytes_to_device": moved * self.row_bytes(dim)}

  def fetch(self, state, ids):
    rows, overflow = contract.jit_lookup(self, state, jnp.asarray(ids))
    flat = np.asarray(ids).reshape(-1)  # [...] -> [N]
    _, hit = _probe_host(np.asarray(state.cached_ids), flat)
    # The distinct misses crossed, or every id where there were more than the capacity.
    moved = flat.shape[0] if bool(np.asarray(overflow)) else np.unique(flat[~hit]).shape[0]
    return rows, self._hits(flat.shape[0], hit, moved, rows.shape[-1])

  def numpy_lookup(self, state, ids, buffers, threads, lower=None):
    """Hits from the cache, the distinct misses from the tier below, gathered by NumPy."""
    parts = lower or self.numpy_parts(jax.block_until_ready(state))
    flat = np.asarray(ids).reshape(-1)  # [...] -> [N]
    n, dh = flat.shape[0], state.cache.shape[1]
    pos, hit = _probe_host(np.asarray(state.cached_ids), flat)
    miss = np.flatnonzero(~hit)  # [Nm]
    unique, src = np.unique(flat[miss], return_inverse=True)  # [U], [Nm]
    miss_rows = self._gather_decoded(parts, unique)  # [U, Dh]
    moved = self._hits(n, hit, unique.shape[0], dh)
    target = self.device or jax.devices()[0]
    cache_view = host_buffers.numpy_view(jax.block_until_ready(state.cache))
    if cache_view is not None:
      # Both tiers readable by NumPy (a CPU client): gather there, hand the rows over.
      out = buffers.take((*np.shape(ids), dh), self.dtype)
      flat_out = out.reshape(n, dh)  # [..., Dh] -> [N, Dh] view
      host_buffers.gather_rows(cache_view, np.where(hit, pos, 0), flat_out, threads)
      flat_out[miss] = miss_rows[src]
      return host_buffers.to_device(out, target), moved
    # Only the distinct missed rows cross (Zipfian ids repeat within a batch).
    rows = combine(state.cache, pos, hit, miss, miss_rows, src, target)  # [N, Dh]
    return rows.reshape(*np.shape(ids), dh), moved  # [N, Dh] -> [..., Dh]

  def read_rows(self, state, lower=None):
    return super().read_rows(state.lower, lower)


def _probe_host(cached_ids: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each id's cache slot [N] and whether it is cached [N] (host side)."""
  pos = np.minimum(np.searchsorted(cached_ids, flat), cached_ids.shape[0] - 1)
  return pos, cached_ids[pos] == flat
