"""The compiled host kernel of the n-gram hash and the threads that run it.

`hash_kernel` is a Numba kernel in exact 64-bit integer arithmetic (compiled once per machine and
cached next to this file); `split_blocks` cuts one layer's work into GIL-free kernel calls of
about a millisecond and `run_blocks` runs them on a shared thread pool.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Sequence

import numba
import numpy as np

# From this table size up, the float quotient of a mix is at most one off (see `hash_kernel`).
_FLOAT_QUOTIENT_MIN_SIZE = 1 << 13
# Tokens per tile of `hash_kernel`: the tile's per-head results (H x 128 int64) stay in L1.
_TILE = 128
# Tokens per work item of the threaded host path: large enough to amortise the per-call
# overhead, small enough to balance the work between threads.
_CHUNK_TOKENS = 16384
_WORKERS = min(8, os.cpu_count() or 1)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def hash_kernel(x, start, mults, sizes, inv_sizes, use_float, pad_id, heads_per_ngram, out):
  """Hashes positions `start:` of `x` [B, T] into `out` [B, T - start, H], in one pass.

  Positions before `start` are only context; a block that begins the sequence has `start = 0`
  and sees the pad id before it. The sequence is cut into tiles of `_TILE` tokens; for each tile
  the mixes and every head's remainders are computed token-contiguously (the loops vectorise),
  then the tile is transposed into `out`'s token-major layout while it is still in cache.

  The mix is below 2**63 (ids < V' and multipliers < 2**63 / (2 V')), so it converts to float64
  with relative error <= 2**-53. With `inv = 1 / p` rounded the same way, the quotient estimate
  `trunc(mix * inv)` is within 3 * 2**10 / p + 1 of the true floor; for p >= 2**13 that is at
  most one away, and one correction on either side makes the remainder exact. Smaller tables
  (tests, toy configs; `use_float[h]` false) use the integer remainder. Arithmetic is uint64
  so that `q * p` wraps instead of overflowing; the remainder is then a small signed value.

  Args:
    x: int64 [B, T] compressed ids (a block of the sequence).
    start: first position to hash; earlier ones are context.
    mults: uint64 [Ng] multipliers.
    sizes: uint64 [H] prime table sizes.
    inv_sizes: float64 [H], 1 / sizes.
    use_float: bool [H], sizes >= _FLOAT_QUOTIENT_MIN_SIZE.
    pad_id: uint64, the id before the sequence start.
    heads_per_ngram: Hn.
    out: int64 [B, T - start, H], written.
  """
  b_size, s_size = x.shape
  n = mults.shape[0]
  heads = sizes.shape[0]
  mix = np.empty(_TILE, np.uint64)  # [tile]
  mix_f = np.empty(_TILE, np.float64)  # [tile]
  res = np.empty((heads, _TILE), np.int64)  # [H, tile]
  for b in range(b_size):
    for t0 in range(start, s_size, _TILE):
      width = min(_TILE, s_size - t0)
      for i in range(width):
        mix[i] = np.uint64(x[b, t0 + i]) * mults[0]
      for k in range(1, n):
        # Order k + 1: XOR in the k-th previous token (the pad id before the start).
        for i in range(width):
          t = t0 + i
          tok = np.uint64(x[b, t - k]) if t >= k else pad_id
          mix[i] ^= tok * mults[k]
          mix_f[i] = np.float64(mix[i])
        for j in range(heads_per_ngram):
          h = (k - 1) * heads_per_ngram + j
          p, p_signed, inv = sizes[h], np.int64(sizes[h]), inv_sizes[h]
          res_h = res[h]
          if use_float[h]:
            for i in range(width):
              q = np.uint64(mix_f[i] * inv)
              r = np.int64(mix[i] - q * p)  # in [-p, 2p)
              r = r + p_signed if r < 0 else r
              res_h[i] = r - p_signed if r >= p_signed else r
          else:
            for i in range(width):
              res_h[i] = np.int64(mix[i] % p)
      for i in range(width):  # [H, tile] -> [tile, H]
        for h in range(heads):
          out[b, t0 - start + i, h] = res[h, i]


def kernel_args(mults: np.ndarray, sizes: Sequence[int], pad_id: int, heads_per_ngram: int):
  """`hash_kernel`'s per-layer arguments, from `mults` to `heads_per_ngram`.

  Args:
    mults: int64 [Ng], the layer's odd multipliers.
    sizes: the layer's H prime table sizes.
    pad_id: the compressed pad id.
    heads_per_ngram: Hn.
  """
  sizes = np.asarray(sizes, np.uint64)
  return (
    np.asarray(mults).astype(np.uint64),
    sizes,
    1.0 / sizes.astype(np.float64),
    sizes >= _FLOAT_QUOTIENT_MIN_SIZE,
    np.uint64(pad_id),
    int(heads_per_ngram),
  )


def split_blocks(
  x: np.ndarray, args: tuple, context: int, out: np.ndarray
) -> list[Callable[[], None]]:
  """Splits one layer's work into `hash_kernel` calls of ~_CHUNK_TOKENS tokens.

  Whole rows when they are short (contiguous memory); otherwise windows of the sequence that
  carry `context` (Ng - 1) tokens of left context.

  Args:
    x: int64 [B, T] compressed ids.
    args: the layer's `kernel_args`.
    context: Ng - 1.
    out: int64 [B, T, H], written by the blocks.
  """
  b, t = x.shape
  if t <= _CHUNK_TOKENS:
    rows = max(1, _CHUNK_TOKENS // max(t, 1))
    return [
      functools.partial(hash_kernel, x[r0 : r0 + rows], 0, *args, out[r0 : r0 + rows])
      for r0 in range(0, b, rows)
    ]
  blocks = []
  for r in range(b):
    for t0 in range(0, t, _CHUNK_TOKENS):
      t1 = min(t, t0 + _CHUNK_TOKENS)
      s = max(0, t0 - context)
      blocks.append(
        functools.partial(hash_kernel, x[r : r + 1, s:t1], t0 - s, *args, out[r : r + 1, t0:t1])
      )
  return blocks


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS)


def run_blocks(blocks: list[Callable[[], None]]) -> None:
  """Runs the blocks on the thread pool; idle workers take the next block from the queue.

  Each block is one GIL-free kernel call of about a millisecond, so a shared queue costs little
  and keeps the cores busy even when one of them is slowed down by other work on the machine.
  """
  if _WORKERS == 1 or len(blocks) == 1:
    for fn in blocks:
      fn()
    return
  for f in [_pool().submit(fn) for fn in blocks]:
    f.result()
