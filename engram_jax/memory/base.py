"""What every table backend shares: the interface, the state, the statistics, host gathers.

A table object (`engram_jax.memory.create(kind, ...)`) holds one flat table [R, Dh] and its
sparse Adam moments wherever its backend keeps them, and answers:

- `fetch(ids) -> rows [..., Dh]`: ids are flat row ids of any shape (per-head offsets are the
  `TableLayout`'s job: `layout.row_ids(hash_ids)`);
- `apply_gradients(ids, grads, lr, optim_cfg)`: lazy Adam on the rows `ids` touched
  (`engram_jax.memory.optimizer.sparse_adam_update` semantics);
- `stats()`: fetches, rows, bytes moved, hit rates where they apply.

Each backend module also has a pure-functional core for a jitted train step; see its docstring.

Out-of-range ids, the one rule of every backend, object and pure core alike, for any integer
dtype: ids are range-checked in int64 (never after a narrowing cast, so 2**32 + 5 is out of
range, not row 5) and clamped to [0, R), or rejected with a ValueError by a table created with
`out_of_range='raise'` (`prepare_ids`). The pure cores always clamp (`clip_ids`).

Shapes: R table rows, Rp padded rows (R rounded up by a backend), Dh row width, N fetched ids
(repeats allowed).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import gc
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import OptimConfig
from engram_jax.memory.optimizer import TableOptState, init_table_state

# What a table object does with an id outside [0, R): clamp it, or raise a ValueError.
OUT_OF_RANGE = ("clamp", "raise")
_INT32 = np.iinfo(np.int32)
# Rows drawn per random block by `init_rows`: any row range can be generated on its own.
INIT_BLOCK_ROWS = 1 << 16
# Rows per task of the threaded host gather.
GATHER_CHUNK_ROWS = 1 << 14
_ALIGNMENT = 64  # XLA's CPU client aliases NumPy buffers aligned to this many bytes.
_POOL: ThreadPoolExecutor | None = None


class TableState(NamedTuple):
  """A table and its sparse Adam state: the pytree the pure-functional cores pass around.

  Attributes:
    table: [R, Dh] rows (a backend may pad them to [Rp, Dh], e.g. to a multiple of the shards).
    opt: the moments `TableOptState(mu [R, Dh], nu [R, Dh], count [])`, or None for a
      read-only table.
  """

  table: jax.Array
  opt: TableOptState | None


def padded_rows(num_rows: int, multiple: int) -> int:
  """R rounded up to a multiple of `multiple` (the shards, or the alignment every backend's
  training state shares); padding rows are never addressed."""
  return -(-num_rows // multiple) * multiple


def init_state(table: jax.Array) -> TableState:
  """A state with zero moments (placed where the caller's jit or `device_put` puts them)."""
  return TableState(table, init_table_state(table))


def state_items(state: TableState) -> dict:
  """The arrays of a state under their checkpoint names: table (and mu, nu, count)."""
  items = {"table": state.table}
  return items | state.opt._asdict() if state.opt is not None else items


def init_rows(
  num_rows: int,
  dim: int,
  seed: int,
  *,
  init_std: float = 1.0,
  start: int = 0,
  stop: int | None = None,
  dtype=np.float32,
) -> np.ndarray:
  """Rows [start, stop) of a normally initialised table, identical for every backend.

  Block b of `INIT_BLOCK_ROWS` rows is drawn from `np.random.default_rng((seed, b))`, so a
  shard or a chunk can be generated without the rest of the table.

  Returns:
    [stop - start, Dh] NumPy rows in `dtype`.
  """
  stop = num_rows if stop is None else stop
  if not 0 <= start <= stop <= num_rows:
    raise ValueError(f"rows [{start}, {stop}): expected a range inside [0, {num_rows})")
  out = np.empty((stop - start, dim), dtype)
  for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
    lo = block * INIT_BLOCK_ROWS
    hi = min(lo + INIT_BLOCK_ROWS, num_rows)
    rows = np.random.default_rng((seed, block)).standard_normal((hi - lo, dim), np.float32)
    a, b = max(lo, start), min(hi, stop)
    out[a - start : b - start] = (init_std * rows[a - lo : b - lo]).astype(dtype)
  return out


def check_ids(ids) -> None:
  """Raises ValueError unless `ids` is an integer array."""
  dtype = getattr(ids, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"ids: expected an integer array, got {type(ids).__name__} of {dtype}")


def check_out_of_range(out_of_range: str) -> str:
  """Returns `out_of_range` if it is one of `OUT_OF_RANGE`, else raises ValueError."""
  if out_of_range not in OUT_OF_RANGE:
    raise ValueError(f"out_of_range: expected one of {OUT_OF_RANGE}, got {out_of_range!r}")
  return out_of_range


def clip_ids(ids, lo, hi) -> jax.Array:
  """Integer ids clamped to [lo, hi] and cast to int32, without wrapping (pure; jit it).

  Ids of a dtype wider than int32 (int64 NumPy ids, int64 jax ids under x64, uint32) are first
  clamped to the int32 range in their own dtype, and only then cast: 2**32 + 5 becomes `hi`,
  not 5. NumPy ids are never passed through `jnp.asarray` (which, with x64 disabled, casts
  int64 to int32 by wrapping).

  Args:
    ids: [...] integer ids: a jax array (traced or not), a NumPy array or Python ints.
    lo: int32 lower bound: a scalar, or an array of ids' rank (e.g. [1, H] per head).
    hi: int32 upper bound (>= lo), like `lo`.

  Returns:
    [...] int32 jax array.
  """
  xp = jnp if isinstance(ids, jax.Array) else np
  ids = xp.asarray(ids)
  info = np.iinfo(ids.dtype)
  if info.min < _INT32.min or info.max > _INT32.max:
    ids = xp.clip(ids, max(info.min, _INT32.min), min(info.max, _INT32.max))
  return jnp.clip(jnp.asarray(ids.astype(np.int32)), lo, hi)


_jit_clip_ids = jax.jit(clip_ids, static_argnums=(1, 2))


def _check_range(ids: np.ndarray, num_rows: int) -> None:
  """Raises ValueError naming the first id of `ids` (NumPy) outside [0, num_rows), if any."""
  if ids.size == 0 or (ids.min() >= 0 and ids.max() < num_rows):
    return
  first = int(np.argmax(((ids < 0) | (ids >= num_rows)).reshape(-1)))
  where = tuple(int(i) for i in np.unravel_index(first, ids.shape))
  raise ValueError(
    f"ids: id {int(ids.reshape(-1)[first])} at index {where} is outside the table's rows "
    f"[0, {num_rows}) (out_of_range='raise'; 'clamp' clamps it)"
  )


def prepare_ids(ids, num_rows: int, out_of_range: str = "clamp") -> np.ndarray | jax.Array:
  """Flat row ids as int32 in [0, num_rows): what every table object does with its ids first.

  Host ids (NumPy arrays, Python ints) are range-checked in int64 (at least: uint64 ids above
  2**63 - 1 saturate there) before any narrowing cast, then clamped to [0, num_rows) or
  rejected. Jax arrays (already on device; int32 unless x64 is enabled) are clamped in their
  own dtype, then cast (`clip_ids`, on their device); 'raise' checks their min and max on the
  host first.

  Args:
    ids: [...] integer row ids.
    num_rows: R.
    out_of_range: 'clamp' (ids below 0 read row 0, ids from R on read row R - 1) or 'raise'.

  Returns:
    [...] int32 ids in [0, R): a NumPy array for host ids, a jax array for jax ids.

  Raises:
    ValueError: for non-integer ids, an unknown `out_of_range`, or (with 'raise') an id outside
      [0, R), naming the first such id, its index and the range.
  """
  check_out_of_range(out_of_range)
  if not hasattr(ids, "dtype"):
    ids = np.asarray(ids)  # Python ints (int64 in NumPy)
  check_ids(ids)
  if isinstance(ids, jax.Array):
    if out_of_range == "raise" and ids.size:
      lo, hi = jax.device_get((jnp.min(ids), jnp.max(ids)))
      if lo < 0 or hi >= num_rows:
        _check_range(np.asarray(ids), num_rows)
    return _jit_clip_ids(ids, 0, num_rows - 1)
  ids = np.asarray(ids)
  if np.can_cast(ids.dtype, np.int32):  # every value fits int32: checked exactly there
    exact = ids.astype(np.int32, copy=False)
  elif ids.dtype == np.uint64:
    exact = np.minimum(ids, np.uint64(np.iinfo(np.int64).max)).astype(np.int64)
  else:
    exact = ids.astype(np.int64, copy=False)
  if out_of_range == "raise":
    _check_range(exact, num_rows)
  return np.clip(exact, 0, num_rows - 1).astype(np.int32, copy=False)


def check_grads(ids, grads, dim: int) -> None:
  """Raises ValueError unless grads has shape ids.shape + (dim,)."""
  check_ids(ids)
  want = (*tuple(ids.shape), dim)
  if tuple(grads.shape) != want:
    raise ValueError(f"grads: expected shape {want} (ids.shape + (dim,)), got {grads.shape}")


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised NumPy array whose data is 64-byte aligned (so XLA's CPU client can alias
  it without a copy)."""
  dtype = np.dtype(dtype)
  return _aligned_view(
    np.empty(int(np.prod(shape)) * dtype.itemsize + _ALIGNMENT, np.uint8), shape, dtype
  )


def _aligned_view(raw: np.ndarray, shape, dtype) -> np.ndarray:
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  offset = (-raw.ctypes.data) % _ALIGNMENT
  return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _is_free(buffers: list, i: int) -> bool:
  # Two references: the list's and this call's argument. Every view of the buffer refers to it
  # (NumPy views keep their owner as `base`), and so does jax while any array or transfer uses
  # memory it aliased (it keeps the owner alive): each adds one.
  return sys.getrefcount(buffers[i]) == 2


class OutputBuffers:
  """Reusable 64-byte aligned output buffers for host gathers.

  A host fetch gathers into a buffer and hands it to jax without a copy (`to_device`). Writing
  into fresh memory costs page faults (a new 256 MB buffer made the gather ~1.5x slower here),
  so buffers are reused, but only once nothing refers to them any more: no NumPy view and no
  jax array (jax holds a reference to the buffer's owner for as long as it uses the memory).
  A live array is never overwritten. Thread-safe (a prefetch thread may take buffers too).

  Args:
    per_shape: buffers kept per (shape, dtype).
    shapes: (shape, dtype) keys kept, least recently used dropped first.
  """

  def __init__(self, per_shape: int = 3, shapes: int = 4):
    self._per_shape, self._shapes = per_shape, shapes
    self._buffers: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def take(self, shape, dtype) -> np.ndarray:
    """An uninitialised aligned array of `shape` and `dtype`, not used by anything else."""
    key = (tuple(shape), np.dtype(dtype))
    with self._lock:
      buffers = self._buffers.setdefault(key, [])  # the owners (uint8) of the memory
      self._buffers.move_to_end(key)
      while len(self._buffers) > self._shapes:
        self._buffers.popitem(last=False)
      for attempt in range(2):
        for i in range(len(buffers)):
          if _is_free(buffers, i):
            return _aligned_view(buffers[i], *key)
        if attempt == 0 and buffers:
          # A deleted jax array lets go of its buffer in a young reference cycle: collect it.
          gc.collect(0)
      buffers.append(np.empty(int(np.prod(shape)) * key[1].itemsize + _ALIGNMENT, np.uint8))
      if len(buffers) > self._per_shape:
        buffers.pop(0)  # forgotten by the pool; whoever uses it keeps it alive
      return _aligned_view(buffers[-1], *key)


def _pool() -> ThreadPoolExecutor:
  global _POOL
  if _POOL is None:
    _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="engram-gather")
  return _POOL


def gather_rows(
  source: np.ndarray, ids: np.ndarray, out: np.ndarray | None = None, threads: int | None = None
) -> np.ndarray:
  """`source[clip(ids)]` with NumPy's `take` over chunks of ids on a thread pool.

  `np.take(..., mode='clip', out=...)` is the fast NumPy gather: the default mode 'raise'
  buffers the whole output and was 4x slower here. `take` releases the GIL, so chunks run in
  parallel.

  Args:
    source: [R, ...] rows (any NumPy array, e.g. a zero-copy view or a memmap).
    ids: [N] integer row ids; out-of-range ids are clamped.
    out: [N, ...] destination (default: a new 64-byte aligned array).
    threads: parallel chunks (default: the CPU count; 1 runs in the calling thread).

  Returns:
    `out`, filled.
  """
  n = ids.shape[0]
  if out is None:
    out = aligned_empty((n, *source.shape[1:]), source.dtype)
  threads = threads or os.cpu_count() or 1
  if threads == 1 or n <= GATHER_CHUNK_ROWS:
    np.take(source, ids, axis=0, out=out, mode="clip")
    return out
  tasks = [
    _pool().submit(
      np.take, source, ids[i : i + GATHER_CHUNK_ROWS], 0, out[i : i + GATHER_CHUNK_ROWS], "clip"
    )
    for i in range(0, n, GATHER_CHUNK_ROWS)
  ]
  for task in tasks:
    task.result()
  return out


def host_fetch(
  source: np.ndarray,
  ids,
  buffers: OutputBuffers,
  device: jax.Device | None = None,
  threads: int | None = None,
) -> jax.Array:
  """`source[clip(ids)]` gathered on the host into a reused buffer, as a jax array on `device`.

  Args:
    source: [R, ...] rows on the host (a zero-copy view of a table, a memmap).
    ids: [...] integer row ids.
    buffers: where the output buffer comes from.
    device: receives the rows (no copy on a CPU client).
    threads: threads of the gather.

  Returns:
    [..., *source.shape[1:]] rows.
  """
  ids = np.asarray(ids)
  out = buffers.take((*ids.shape, *source.shape[1:]), source.dtype)
  # [...] -> [N] ids into the [N, ...] view of the output
  gather_rows(source, ids.reshape(-1), out.reshape(-1, *source.shape[1:]), threads)
  return to_device(out, device)


def numpy_view(array: jax.Array) -> np.ndarray | None:
  """A zero-copy NumPy view of a single-device jax array, or None where none exists.

  On a CPU client, device and host memory are the same RAM and DLPack hands out the buffer
  itself; elsewhere (a GPU's memory, or a host buffer NumPy cannot address) this returns None.
  """
  try:
    view = np.from_dlpack(array, copy=False)
  except (BufferError, RuntimeError, TypeError, ValueError):
    if any(d.platform != "cpu" for d in array.devices()):
      return None  # NumPy's array interface would copy the whole table to the host
    # DLPack has no bfloat16; on a CPU client the array interface hands out the same buffer.
    view = np.asarray(array)
  return view if view.ctypes.data == array.unsafe_buffer_pointer() else None


def to_device(rows: np.ndarray, device: jax.Device | None = None) -> jax.Array:
  """Rows gathered on the host as a jax array in `device`'s memory (no copy on a CPU client
  when `rows` is 64-byte aligned; a host-to-device transfer elsewhere)."""
  return jax.device_put(rows, device or jax.devices()[0], may_alias=True)


@dataclasses.dataclass
class Stats:
  """Counters of one table object since creation or `reset_stats()`.

  Attributes:
    fetches: `fetch` calls.
    rows_fetched: ids fetched (repeats counted).
    bytes_fetched: bytes of the rows returned.
    bytes_to_device: bytes that crossed from host memory into device memory (host, tiered).
    bytes_exchanged: bytes sent between devices by the sharded exchange (ids, rows, grads).
    hits / misses: ids served from the device cache / from the tier below (tiered).
    updates: `apply_gradients` calls.
    rows_updated: ids passed to `apply_gradients` (repeats counted).
  """

  fetches: int = 0
  rows_fetched: int = 0
  bytes_fetched: int = 0
  bytes_to_device: int = 0
  bytes_exchanged: int = 0
  hits: int = 0
  misses: int = 0
  updates: int = 0
  rows_updated: int = 0

  def as_dict(self) -> dict:
    """The counters plus `hit_rate` (hits / (hits + misses); None before any tiered fetch)."""
    out = dataclasses.asdict(self)
    total = self.hits + self.misses
    out["hit_rate"] = self.hits / total if total else None
    return out


class MemoryTable(abc.ABC):
  """The interface of every backend (see the module docstring).

  Attributes:
    kind: the backend's name, one of `engram_jax.config.MEMORY_KINDS`.
    num_rows: R.
    dim: Dh.
    dtype: dtype of the rows `fetch` returns.
    out_of_range: 'clamp' or 'raise': what `fetch` and `apply_gradients` do with ids outside
      [0, R) (`prepare_ids`).
  """

  kind: str = ""

  def __init__(self, num_rows: int, dim: int, dtype, out_of_range: str = "clamp"):
    if not isinstance(num_rows, int) or num_rows < 1:
      raise ValueError(f"num_rows: expected an int >= 1, got {num_rows!r}")
    if not isinstance(dim, int) or dim < 1:
      raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
    if num_rows >= 2**31:
      raise ValueError(f"num_rows: expected fewer than 2**31 rows (int32 ids), got {num_rows}")
    self.num_rows, self.dim, self.dtype = num_rows, dim, jnp.dtype(dtype)
    self.out_of_range = check_out_of_range(out_of_range)
    self._stats = Stats()

  def _ids(self, ids) -> np.ndarray | jax.Array:
    """`prepare_ids` with this table's R and `out_of_range`: int32 ids in [0, R)."""
    return prepare_ids(ids, self.num_rows, self.out_of_range)

  @abc.abstractmethod
  def fetch(self, ids) -> jax.Array:
    """Rows [..., Dh] (in `dtype`) of the flat row ids [...]."""

  @abc.abstractmethod
  def apply_gradients(self, ids, grads, lr, optim_cfg: OptimConfig) -> None:
    """Lazy Adam on the rows read: ids [...] with their gradients [..., Dh] (repeats summed)."""

  @abc.abstractmethod
  def _arrays(self) -> dict:
    """{"table": [R or Rp, Dh] (decoded to `dtype`), and "mu", "nu", "count" if trainable}."""

  def rows(self) -> np.ndarray:
    """The whole table [R, Dh] in `dtype` as a NumPy array (for tests and conversions)."""
    return np.asarray(self._arrays()["table"])[: self.num_rows]

  def stats(self) -> dict:
    """The counters of `Stats` as a dict, with `hit_rate`."""
    return self._stats.as_dict()

  def reset_stats(self) -> None:
    self._stats = Stats()

  def _count_fetch(self, n: int, to_device: int = 0) -> None:
    self._stats.fetches += 1
    self._stats.rows_fetched += n
    self._stats.bytes_fetched += n * self.dim * self.dtype.itemsize
    self._stats.bytes_to_device += to_device

  def _count_update(self, n: int) -> None:
    self._stats.updates += 1
    self._stats.rows_updated += n
