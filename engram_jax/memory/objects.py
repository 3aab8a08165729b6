"""The table objects of `memory.create`: one stateful wrapper over the backend contract.

A `Table` holds one backend (`memory.backends`) and its state, and adds what a serving process
or a benchmark wants around the pure functions, the same for every kind:

- id preparation (`validation.prepare_ids`: range checks before any int32 cast, clamp or raise);
- `fetch` by one of two engines: 'jit' (the backend's jitted `lookup`, with the ids placed as
  the kind needs) or 'numpy' (a threaded NumPy gather through zero-copy views of the stored
  rows, handed to jax without a copy; CPU clients, where it is several times faster than
  XLA's gather); 'auto' picks numpy where the views exist;
- `prefetch` on a background thread; `apply_gradients` (the backend's jitted `update`, the
  state donated); `calibrate`; statistics (`base.Stats`) from what those calls report moved;
- for a backend with a device cache ('tiered'): the cache policies 'static' (filled by
  `calibrate` only), 'lfu' (online counts, aged by halving, refilled every `refresh_every`
  fetches) and 'lru' (the rows used last), and the read-only disk tier below the cache:
  `disk=` a directory written by `storage.save_memmap`, or `(parts, storage)` with parts
  {"values": [R, Dh], "scale": ...} mapped already, e.g. the Engram table of a safetensors
  checkpoint (`interop.safetensors`: F8_E4M3 values and F8_E8M0 scales are storage 'mxfp8').

Shapes: R rows, Dh row width, L cached rows, N ids.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from engram_jax.config import MemoryConfig, OptimConfig
from engram_jax.memory import backends, base, host_buffers, tiered, validation
from engram_jax.memory import storage as storage_lib

ENGINES = ("auto", "jit", "numpy")
# Options every kind takes, and those of each backend class's objects.
_COMMON = ("init_std", "trainable", "out_of_range")
_ENGINE = ("device", "engine", "threads")
_CACHE = ("cache_rows", "cache_fraction", "policy", "refresh_every", "count_sample", "disk")
_OPTIONS = {
  backends.Backend: (*_ENGINE, "implementation"),
  backends.HostBackend: (*_ENGINE, "storage"),
  backends.ShardedBackend: ("axis", "slack", "route"),
  backends.TieredBackend: (*_ENGINE, "storage", *_CACHE),
}


def options(kind: str) -> list[str]:
  """The keyword options `create` accepts for a kind."""
  return sorted(_COMMON + _OPTIONS[backends.backend_class(kind, "kind")])


def _open_disk(disk, num_rows: int, dim: int) -> tuple[dict, str]:
  """The NumPy parts and storage type of a disk tier (`disk=`, see the module docstring)."""
  if isinstance(disk, tuple):
    if len(disk) != 2:
      raise ValueError(f"disk: expected a directory or (parts, storage), got {len(disk)} items")
    parts, storage = disk
    return dict(storage_lib.check_parts(parts, storage, num_rows, dim)), storage
  parts, storage = storage_lib.open_memmap(disk)
  if parts["values"].shape != (num_rows, dim):
    raise ValueError(f"disk: table {parts['values'].shape}, expected {(num_rows, dim)}")
  return parts, storage


class Table(base.MemoryTable):
  """A table of R rows of width Dh on one backend (`memory.create`; see the module docstring).

  Attributes:
    kind: the backend's kind.
    backend: the backend (`memory.backends`) whose functions run the table.
    state: the backend's state (its pytree; `set_state` takes back one the pure functions
      returned).
    engine: 'jit' or 'numpy'.
  """

  def __init__(
    self,
    kind: str,
    num_rows: int,
    dim: int,
    dtype=jnp.float32,
    seed: int = 0,
    rows=None,
    *,
    mesh=None,
    init_std: float = 1.0,
    trainable: bool = True,
    out_of_range: str = "clamp",
    device: jax.Device | None = None,
    engine: str = "auto",
    threads: int | None = None,
    implementation: str = "auto",
    storage: str | None = None,
    axis: str | tuple[str, ...] | None = None,
    slack: float = 2.0,
    route: str = "all_to_all",
    cache_rows: int | None = None,
    cache_fraction: float | None = None,
    policy: str = "lfu",
    refresh_every: int = 64,
    count_sample: int = 1 << 16,
    disk=None,
  ):
    super().__init__(num_rows, dim, dtype, out_of_range)
    self.kind = kind
    cls = backends.backend_class(kind)
    if engine not in ENGINES:
      raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    fields = {"dtype": self.dtype.name, "device": device}
    self._lower = None  # NumPy parts of a disk tier
    if disk is not None:
      if rows is not None or storage is not None:
        raise ValueError("disk tier: the rows and their storage type come from the disk")
      self._lower, storage = _open_disk(disk, num_rows, dim)
    if storage is None:
      storage = "bfloat16" if cls.has_storage and self.dtype == jnp.bfloat16 else "float32"
    fields["trainable"] = trainable and storage not in storage_lib.SCALED and disk is None
    if cls is backends.ShardedBackend:
      if mesh is None:
        mesh = jax.make_mesh((jax.device_count(),), ("table",), axis_types=(AxisType.Auto,))
      axes = (axis,) if isinstance(axis, str) else tuple(axis or mesh.axis_names[:1])
      fields |= {"table_axes": axes, "slack": slack, "route": route}
      del fields["device"]
    if cls.has_cache:
      fields["cache_rows"] = self._cache_size(cache_rows, cache_fraction)
      if policy not in tiered.POLICIES:
        raise ValueError(f"policy: expected one of {tiered.POLICIES}, got {policy!r}")
    memory_cfg = MemoryConfig(kind=kind, storage=storage, lookup_impl=implementation)
    self.backend = backends.backend(memory_cfg, mesh, **fields)
    self.storage = storage

    if self._lower is not None:
      self.state = self.backend.build_read_only(dim, fields["cache_rows"])
    else:
      self.state = self.backend.build(self._rows_fn(rows, seed, init_std), num_rows, dim)
    viewable = self._lower is not None or self.backend.numpy_parts(self.state) is not None
    if engine == "numpy" and not viewable:
      raise ValueError("engine='numpy': this table's memory has no zero-copy NumPy view")
    if engine == "jit" and self._lower is not None:
      raise ValueError("engine='jit': a disk tier is read by the NumPy engine only")
    self.engine = "numpy" if engine == "numpy" or (engine == "auto" and viewable) else "jit"

    self._threads = threads
    self._buffers = host_buffers.OutputBuffers()
    self._lock = threading.RLock()
    self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")
    self._pending: list[Future] = []
    self.policy = policy if cls.has_cache else None
    self.refresh_every, self.count_sample = refresh_every, count_sample
    self._since_refresh = 0
    self._clock = 0  # accesses seen ('lru')
    self._counts = self._cached = None
    if self.policy is not None:
      # Access counts ('lfu', 'static'), or for 'lru' the number of each row's last access.
      self._counts = np.zeros((num_rows,), np.uint64 if policy == "lru" else np.uint32)
      # The cached row ids, kept on the host (a jitted step may donate the state's copy).
      self._cached = np.asarray(self.state.cached_ids)

  def _cache_size(self, cache_rows, cache_fraction) -> int:
    if (cache_rows is None) == (cache_fraction is None):
      raise ValueError("tiered: give exactly one of cache_rows and cache_fraction")
    c = cache_rows if cache_rows is not None else round(cache_fraction * self.num_rows)
    if not 1 <= c <= self.num_rows:
      raise ValueError(f"cache size: expected 1..{self.num_rows} rows, got {c}")
    return c

  def _rows_fn(self, rows, seed: int, init_std: float) -> backends.RowsFn:
    if rows is None:
      r, dh, dtype = self.num_rows, self.dim, self.dtype
      return lambda a, b: base.init_rows(
        r, dh, seed, init_std=init_std, start=a, stop=b, dtype=dtype
      )
    if tuple(rows.shape) != (self.num_rows, self.dim):
      raise ValueError(f"rows: expected shape {(self.num_rows, self.dim)}, got {tuple(rows.shape)}")
    if not isinstance(rows, np.ndarray):
      rows = np.asarray(rows)  # a jax array: one copy to the host
    return lambda a, b: rows[a:b]

  @property
  def trainable(self) -> bool:
    return self.backend.trainable

  # ---- reading

  def fetch(self, ids) -> jax.Array:
    return self._fetch(self._ids(ids))

  def _fetch(self, ids) -> jax.Array:
    """`fetch` of ids already prepared (int32 in [0, R))."""
    with self._lock:
      if self.engine == "numpy":
        rows, moved = self.backend.numpy_lookup(
          self.state, np.asarray(ids), self._buffers, self._threads, self._lower
        )
      else:
        rows, moved = self.backend.fetch(self.state, ids)
      self._count_fetch(int(np.prod(np.shape(ids))))
      self._count(moved)
      if self.policy is not None:
        self._observe(np.asarray(ids).reshape(-1))  # [...] -> [N]
    return rows

  def prefetch(self, ids) -> Future:
    """Starts `fetch(ids)` on a background thread; `.result()` returns the rows.

    Issue it before the work that precedes the rows' use (earlier layers, the previous step's
    compute in inference). `apply_gradients` waits for pending prefetches first; a prefetch
    issued before an update reads the rows as they were before it.
    """
    ids = np.asarray(self._ids(ids))  # checked here: a bad id raises in the caller
    future = self._prefetcher.submit(self._fetch, ids)
    self._pending = [f for f in self._pending if not f.done()] + [future]
    return future

  # ---- training

  def apply_gradients(self, ids, grads, lr, optim_cfg: OptimConfig) -> None:
    ids = self._ids(ids)  # [...] int32 in [0, R)
    validation.check_grads(ids, grads, self.dim)
    if not self.trainable:
      raise ValueError(
        f"apply_gradients: this {self.kind} table is read-only (trainable=False, quantised storage "
        "or a disk tier)"
      )
    for future in self._pending:
      future.result()
    self._pending = []
    with self._lock:
      self.state, moved = self.backend.apply(self.state, ids, grads, lr, optim_cfg)
      self._count(moved)
      self._count_update(int(np.prod(np.shape(ids))))

  def set_state(self, state) -> None:
    """Takes back a state the pure functions returned (same structure; a cache must hold the
    same rows), e.g. after jitted steps and before `fetch` on this object."""
    if jax.tree.structure(state) != jax.tree.structure(self.state):
      raise ValueError("set_state: expected a state of this table's backend")
    if self.backend.has_cache and not np.array_equal(np.asarray(state.cached_ids), self._cached):
      raise ValueError("set_state: the state caches other rows than this table")
    self.state = state

  # ---- the cache of a backend that has one

  def calibrate(self, batches) -> None:
    """Counts the row ids of `batches` (an iterable of int arrays) and fills the cache with the
    L most frequent rows ('lru': the L rows used last); nothing for a backend without a cache."""
    if self.policy is None:
      return
    with self._lock:
      for ids in batches:
        flat = np.asarray(self._ids(ids)).reshape(-1)  # [...] -> [N] int32 in [0, R)
        if self.policy == "lru":
          self._stamp(flat)
        else:
          self._counts += np.bincount(flat, minlength=self.num_rows).astype(np.uint32)
      self._fill()

  def _fill(self) -> None:
    """Loads the (at most L) rows with the highest counts into the cache: the most frequent
    ('lfu', 'static') or the most recently accessed ('lru')."""
    hot = tiered.hottest_rows(self._counts, self.state.cache.shape[0])
    self.state = self.backend.fill(self.state, hot, self._lower)
    self._cached = np.asarray(self.state.cached_ids)
    cache_rows = self._cached.shape[0]
    self._count({"bytes_to_device": cache_rows * self.backend.row_bytes(self.dim)})

  def _stamp(self, flat: np.ndarray) -> None:
    """LRU: numbers the accesses of `flat` [N] in order and records each row's last one."""
    rows, from_end = np.unique(flat[::-1], return_index=True)  # distinct rows, last access from end
    self._counts[rows] = self._clock + (flat.shape[0] - from_end).astype(np.uint64)
    self._clock += flat.shape[0]

  def _observe(self, flat: np.ndarray) -> None:
    if self.policy == "static":
      return
    self._since_refresh += 1
    if self.policy == "lru":
      self._stamp(flat)
    else:
      step = max(1, flat.shape[0] // self.count_sample)
      np.add.at(self._counts, flat[::step], np.uint32(1))
    if self._since_refresh >= self.refresh_every:
      self._fill()
      if self.policy == "lfu":
        self._counts >>= 1  # aging: recent accesses weigh more
      self._since_refresh = 0

  # ---- contents and statistics

  def _arrays(self) -> dict:
    return {"table": self.backend.read_rows(jax.block_until_ready(self.state), self._lower)}

  def _count(self, traffic: dict) -> None:
    for name, value in traffic.items():
      setattr(self._stats, name, getattr(self._stats, name) + int(value))
