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
functions through `memory.backends.TieredBackend`; on a CPU client its NumPy engine looks up
each id's cache slot on the host and gathers the hits from the cache and only the distinct
missed rows from the tier below; where the cache is not readable by NumPy, `combine` places the
transferred misses among the cache rows in one jitted call.

Shapes: R table rows, L cached rows, Dh row width, N ids, U distinct missed rows moved per
call (in the pure core, its miss capacity), Nm ids of one fetch that missed (repeats counted).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from engram_jax.config import OptimConfig
from engram_jax.memory import base, host
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
  state: TieredState, ids, miss_capacity: int, dtype=jnp.float32
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

  Returns:
    ([..., Dh] rows, bool scalar: True where the fallback moved every id).
  """
  r, dh = state.lower.table.shape
  flat = base.clip_ids(ids, 0, r - 1).reshape(-1)  # [...] -> [N] int32
  pos, hit = _probe(state.cached_ids, flat)
  # Misses keyed by their row, hits by R: the distinct missed rows come first, sorted, and
  # each id gets its distinct row's slot.
  key = jnp.where(hit, r, flat)  # [N]
  unique, slot = dedup(key, r)  # [N], [N]
  n = flat.shape[0]
  compact = jnp.pad(unique, (0, max(0, miss_capacity - n)))[:miss_capacity]  # [U] (R: unused)
  distinct = jnp.sum(unique < r)

  def few():
    rows = host.lookup(state.lower, compact, dtype)  # [U, Dh]
    return jnp.take(rows, jnp.clip(slot, 0, miss_capacity - 1), axis=0)  # [U, Dh] -> [N, Dh]

  many = lambda: host.lookup(state.lower, flat, dtype)  # [N, Dh]
  overflow = distinct > miss_capacity
  misses = lax.cond(overflow, many, few)
  rows = jnp.where(hit[:, None], state.cache[pos].astype(dtype), misses)  # [N, Dh]
  return rows.reshape(*jnp.shape(ids), dh), overflow  # [N, Dh] -> [..., Dh]


def lookup(state: TieredState, ids, miss_capacity: int, dtype=jnp.float32) -> jax.Array:
  """`lookup_with_route` without the route: [...] ids -> [..., Dh] rows."""
  return lookup_with_route(state, ids, miss_capacity, dtype)[0]


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
