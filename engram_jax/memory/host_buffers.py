"""Host buffers and host gathers: rows gathered on the host and handed to jax without a copy.

A host fetch (the 'host' and 'tiered' table objects, `Backend.numpy_lookup`) gathers rows of a
NumPy view of the table (`numpy_view`, zero-copy on a CPU client, or a memmap) with a threaded
`np.take` (`gather_rows`) into a reused 64-byte aligned buffer (`OutputBuffers`), which
`to_device` hands to jax (aliased, not copied, on a CPU client). `host_fetch` is the three in
one call.

Shapes: R table rows, N gathered ids, [...] ids of any shape; a source [R, ...] is a table's
stored values [R, Dh] or its scales ([R] int8 scales, [R, Dh/32] mxfp8 exponents).
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

# Rows per task of the threaded host gather.
GATHER_CHUNK_ROWS = 1 << 14
_ALIGNMENT = 64  # XLA's CPU client aliases NumPy buffers aligned to this many bytes.
_POOL: ThreadPoolExecutor | None = None


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
