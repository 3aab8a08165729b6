"""The `tiered` backend: a device cache of hot rows over a host table (or a disk tier).

Hashed n-gram accesses are Zipfian, so a small cache of the most frequent rows serves most
ids from device memory; only misses cross from the tier below. Which rows are hot comes from
access counts: gathered by a calibration pass over data (`calibrate`, policy 'static'), or
online (policy 'lfu': counts of the fetched ids, aged by halving, and the cache refilled with
the top rows every `refresh_every` fetches; policy 'lru': refilled with the L rows accessed most
recently, counting every access of every fetch in order). Below the cache sits a `host` table
(trainable; pinned host memory) or, with `disk=<directory written by storage.save_memmap>`, a
read-only NumPy memmap for tables larger than RAM (the OS page cache is then the host level).

Object use, two-stage (what `TieredTable` does): outside jit, `rows = table.fetch(ids)` looks up
each id's cache slot on the host, gathers only the distinct missed rows from the tier below, and
one jitted call combines the cache rows with the transferred misses; `apply_gradients` updates the
host table and writes the new values of cached rows through to the cache.

Pure-functional core, for one jitted step (the cache contents change only between steps):

    state = table.tiered_state()                     # TieredState: cache + host state
    rows = tiered.lookup(state, ids, miss_capacity)  # hits from the cache, misses from host
    state = tiered.update(state, ids, row_grads, lr, optim_cfg)   # host update + write-through

`lookup` deduplicates the misses and compacts them to `miss_capacity` distinct rows so only those
cross; if a step misses more distinct rows, it gathers every id from the host instead (no id is
dropped).

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
from engram_jax.memory import storage as storage_lib
from engram_jax.memory.optimizer import dedup

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
    slots: [N] cache slot of each id (< 0 at misses).
    miss_pos: [Nm] positions of the misses among the N ids, padded (N in padding: dropped).
    miss_rows: [U, Dh] the distinct missed rows, as transferred (padded).
    miss_src: [Nm] which of the U rows each miss takes (padded like `miss_pos`).
  """
  rows = jnp.take(cache, jnp.maximum(slots, 0), axis=0)  # [N] -> [N, Dh] (misses: any slot)
  fill = jnp.take(miss_rows, miss_src, axis=0).astype(cache.dtype)  # [U, Dh] -> [Nm, Dh]
  return rows.at[miss_pos].set(fill, mode="drop")  # misses in place


_write_through = jax.jit(
  lambda cache, slots, rows: cache.at[slots].set(rows.astype(cache.dtype)), donate_argnums=0
)


def _bucket(n: int) -> int:
  """Padded size for n transferred rows: a power of two (few recompilations)."""
  return max(256, 1 << max(n - 1, 0).bit_length())


class TieredTable(base.MemoryTable):
  """A device cache over a host (or disk) table (`memory.create('tiered', ...)`).

  Options:
    cache_rows / cache_fraction: the cache size L, in rows or as a fraction of R.
    policy: 'static' (the cache changes only in `calibrate`), 'lfu' or 'lru' (online).
    refresh_every: fetches between online refills.
    count_sample: at most this many ids of each fetch are counted (LFU).
    disk: directory of a table written by `storage.save_memmap` (read-only disk tier).
    out_of_range: 'clamp' (default) or 'raise' for ids outside [0, R) (`base.prepare_ids`), in
      `fetch`, `apply_gradients` and `calibrate`.
    Remaining options (storage, engine, threads, trainable, device) go to the host table.
  """

  kind = "tiered"

  def __init__(
    self,
    num_rows: int,
    dim: int,
    dtype=jnp.float32,
    seed: int = 0,
    rows=None,
    *,
    cache_rows: int | None = None,
    cache_fraction: float | None = None,
    policy: str = "lfu",
    refresh_every: int = 64,
    count_sample: int = 1 << 16,
    disk=None,
    device: jax.Device | None = None,
    out_of_range: str = "clamp",
    **host_options,
  ):
    super().__init__(num_rows, dim, dtype, out_of_range)
    if policy not in POLICIES:
      raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if (cache_rows is None) == (cache_fraction is None):
      raise ValueError("tiered: give exactly one of cache_rows and cache_fraction")
    c = cache_rows if cache_rows is not None else round(cache_fraction * num_rows)
    if not 1 <= c <= num_rows:
      raise ValueError(f"cache size: expected 1..{num_rows} rows, got {c}")
    self.policy, self.refresh_every, self.count_sample = policy, refresh_every, count_sample
    self.device = device or jax.devices()[0]
    if disk is not None:
      if rows is not None or host_options:
        raise ValueError(f"disk tier: rows and host options {sorted(host_options)} don't apply")
      self.disk, self.storage = storage_lib.open_memmap(disk)
      if self.disk["values"].shape != (num_rows, dim):
        raise ValueError(f"disk: table {self.disk['values'].shape}, expected {(num_rows, dim)}")
      self.lower = None
    else:
      self.disk = None
      self.lower = host.HostTable(
        num_rows, dim, dtype, seed, rows, device=self.device, **host_options
      )
      self.storage = self.lower.storage
    self.cache = jax.device_put(jnp.zeros((c, dim), self.dtype), self.device)
    self.cached_ids = np.full((c,), num_rows, np.int32)  # sorted; R marks an empty slot
    self.slot_of = np.full((num_rows,), -1, np.int32)
    # Access counts ('lfu', 'static'), or for 'lru' the number of the last access of each row.
    self.counts = np.zeros((num_rows,), np.uint64 if policy == "lru" else np.uint32)
    self._buffers = base.OutputBuffers()
    self._since_refresh = 0
    self._clock = 0  # accesses seen ('lru')

  @property
  def cache_size(self) -> int:
    return self.cache.shape[0]

  def _lower_parts(self) -> dict | None:
    """NumPy views {"values"[, "scale"]} of the tier below, or None where none exist."""
    if self.lower is None:
      return self.disk
    if self.lower.engine != "numpy":
      return None
    state = jax.block_until_ready(self.lower.state)
    parts = {"values": base.numpy_view(state.table)}
    if state.scale is not None:
      parts["scale"] = base.numpy_view(state.scale)
    return parts

  def _lower_numpy(self, parts: dict, ids: np.ndarray) -> np.ndarray:
    """[N] ids -> [N, Dh] rows of the tier below, gathered and decoded by NumPy."""
    got = {k: base.gather_rows(v, ids) for k, v in parts.items()}
    return storage_lib.decode(got, self.storage, self.dtype)

  def _lower_rows(self, ids: np.ndarray) -> jax.Array:
    """[N] ids -> [N, Dh] rows of the tier below, in device memory (a buffer of jax's own)."""
    parts = self._lower_parts()
    if parts is None:
      return host._jit_lookup(self.lower.state, jnp.asarray(ids), dtype=self.dtype)
    return jax.device_put(self._lower_numpy(parts, ids), self.device)

  def _fill(self, row_ids: np.ndarray) -> None:
    """Loads the rows `row_ids` (at most L, distinct) into the cache."""
    new = np.sort(row_ids.astype(np.int32))
    c = self.cache_size
    self.slot_of[self.cached_ids[self.cached_ids < self.num_rows]] = -1
    self.cached_ids = np.full((c,), self.num_rows, np.int32)
    self.cached_ids[: new.shape[0]] = new
    self.slot_of[new] = np.arange(new.shape[0], dtype=np.int32)
    padded = np.minimum(self.cached_ids, self.num_rows - 1)  # empty slots read any row
    self.cache = self._lower_rows(padded)
    self._stats.bytes_to_device += c * storage_lib.row_bytes(self.storage, self.dim)

  def _top_rows(self) -> np.ndarray:
    """The (at most L) rows with the highest counts: the most frequent ('lfu', 'static') or the
    most recently accessed ('lru')."""
    return hottest_rows(self.counts, self.cache_size)

  def calibrate(self, batches) -> None:
    """Counts the ids of `batches` (an iterable of int arrays) and fills the cache with the
    L most frequent rows ('lru': the L rows used last)."""
    for ids in batches:
      flat = np.asarray(self._ids(ids)).reshape(-1)  # [...] -> [N] int32 in [0, R)
      if self.policy == "lru":
        self._stamp(flat)
      else:
        self.counts += np.bincount(flat, minlength=self.num_rows).astype(np.uint32)
    self._fill(self._top_rows())

  def _stamp(self, flat: np.ndarray) -> None:
    """LRU: numbers the accesses of `flat` [N] in order and records each row's last one."""
    rows, from_end = np.unique(flat[::-1], return_index=True)  # distinct rows, last access from end
    self.counts[rows] = self._clock + (flat.shape[0] - from_end).astype(np.uint64)
    self._clock += flat.shape[0]

  def _observe(self, flat: np.ndarray) -> None:
    if self.policy == "static":
      return
    self._since_refresh += 1
    if self.policy == "lru":
      self._stamp(flat)
    else:
      step = max(1, flat.shape[0] // self.count_sample)
      np.add.at(self.counts, flat[::step], np.uint32(1))
    if self._since_refresh >= self.refresh_every:
      self._fill(self._top_rows())
      if self.policy == "lfu":
        self.counts >>= 1  # aging: recent accesses weigh more
      self._since_refresh = 0

  def fetch(self, ids) -> jax.Array:
    ids = self._ids(ids)
    flat = np.asarray(ids).reshape(-1)  # [...] -> [N] int32 in [0, R)
    n = flat.shape[0]
    slots = self.slot_of[flat]  # [N]
    miss_pos = np.flatnonzero(slots < 0)  # [Nm]
    m = miss_pos.shape[0]
    cache_view, parts = base.numpy_view(jax.block_until_ready(self.cache)), self._lower_parts()
    if cache_view is not None and parts is not None:
      # Both tiers readable by NumPy (a CPU client): gather there, hand the rows over.
      out = self._buffers.take((*np.shape(ids), self.dim), self.dtype)
      flat_out = out.reshape(n, self.dim)  # [..., Dh] -> [N, Dh] view
      base.gather_rows(cache_view, np.maximum(slots, 0), flat_out)
      if m:
        flat_out[miss_pos] = self._lower_numpy(parts, flat[miss_pos])
      rows = base.to_device(out, self.device)
      moved = m
    else:
      # Only the distinct missed rows cross (Zipfian ids repeat within a batch).
      unique, src = np.unique(flat[miss_pos], return_inverse=True)  # [U], [Nm]
      moved = unique.shape[0]
      miss_ids = np.zeros((_bucket(moved),), np.int32)
      miss_ids[:moved] = unique
      padded_pos = np.full((_bucket(m),), n, np.int32)  # position N: dropped by the combine
      padded_pos[:m] = miss_pos
      padded_src = np.zeros_like(padded_pos)
      padded_src[:m] = src
      miss_rows = self._lower_rows(miss_ids)  # [bucket(U), Dh]
      rows = _combine(
        self.cache,
        jnp.asarray(slots),
        jnp.asarray(padded_pos),
        miss_rows,
        jnp.asarray(padded_src),
      )
      rows = rows.reshape(*np.shape(ids), self.dim)  # [N, Dh] -> [..., Dh]
    self._count_fetch(n, moved * storage_lib.row_bytes(self.storage, self.dim))
    self._stats.hits += n - m
    self._stats.misses += m
    self._observe(flat)
    return rows

  def apply_gradients(self, ids, grads, lr, optim_cfg: OptimConfig) -> None:
    ids = self._ids(ids)  # [...] int32 in [0, R)
    base.check_grads(ids, grads, self.dim)
    if self.lower is None or not self.lower.trainable:
      raise ValueError("apply_gradients: this tiered table is read-only (disk or int8 tier)")
    self.lower.apply_gradients(ids, grads, lr, optim_cfg)
    touched = np.unique(np.asarray(ids).reshape(-1))  # distinct rows, sorted
    cached = touched[self.slot_of[touched] >= 0]
    if cached.size:
      self.cache = _write_through(
        self.cache, jnp.asarray(self.slot_of[cached]), self._lower_rows(cached.astype(np.int32))
      )
    self._count_update(int(np.prod(np.shape(ids))))

  def tiered_state(self) -> TieredState:
    """The pure-functional state (cache, sorted cached ids, host state) of this table."""
    if self.lower is None:
      raise ValueError("tiered_state: a disk tier has no jax state")
    return TieredState(self.cache, jax.device_put(self.cached_ids, self.device), self.lower.state)

  def set_state(self, state: TieredState) -> None:
    """Takes back a state the pure functions returned (same cached ids), e.g. after jitted
    steps and before `calibrate`, `fetch` or `save` on this object."""
    if not np.array_equal(np.asarray(state.cached_ids), self.cached_ids):
      raise ValueError("set_state: the state caches other rows than this table")
    self.cache, self.lower.state = state.cache, state.lower

  def _arrays(self) -> dict:
    if self.lower is not None:
      return self.lower._arrays()
    return {"table": storage_lib.decode_table(self.disk, self.storage, self.dtype)}
