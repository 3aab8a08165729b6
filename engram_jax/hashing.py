"""Multi-head n-gram hashing (paper §2.2 eq. 1; spec §2).

For every Engram layer, orders n = 2..N and K heads per order, the suffix n-gram of compressed ids
ending at position t is mixed with per-layer odd multipliers and XOR, then reduced modulo a prime
table size that is distinct for every (layer, order, head) of the model.

Two paths give the same ids:
- the host path (`NgramHasher.__call__`, `hash_all`): a compiled (Numba) kernel in 64-bit integer
  arithmetic, exact, threaded over chunks of the sequence; this is what the data pipeline runs
  before the forward pass, so that a memory backend can prefetch the rows (paper §2.5);
- the device path (`NgramHasher.device_fn`): jittable, in 32-bit limb arithmetic so it needs
  neither `jax_enable_x64` nor int64 support on the accelerator (for incremental decoding).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numba
import numpy as np

from engram_jax.config import EngramConfig, check_engram_args

_INT64_MAX = np.iinfo(np.int64).max
# Layer seeds are spaced by this prime (spec §2).
_LAYER_SEED_STRIDE = 10007
# Tokens per work item of the threaded host path: large enough to amortise the per-call
# overhead, small enough to balance the work between threads.
_CHUNK_TOKENS = 16384

# ---------------------------------------------------------------------------------------------
# Primes
# ---------------------------------------------------------------------------------------------

_MR_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
  """Deterministic Miller-Rabin, exact for every n < 3.3e24."""
  if n < 2:
    return False
  for p in _MR_WITNESSES:
    if n % p == 0:
      return n == p
  d, s = n - 1, 0
  while d % 2 == 0:
    d, s = d // 2, s + 1
  for a in _MR_WITNESSES:
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(s - 1):
      x = x * x % n
      if x == n - 1:
        break
    else:
      return False
  return True


def next_prime(start: int, taken: set[int]) -> int:
  """The smallest prime strictly greater than `start` that is not in `taken`."""
  n = start + 1
  while n in taken or not is_prime(n):
    n += 1
  return n


def table_sizes_for_layers(
  table_bases: Sequence[int], heads_per_ngram: int, layer_ids: Sequence[int]
) -> dict[int, list[int]]:
  """Prime table sizes, distinct across the whole model (spec §2).

  Layers in configured order, then orders, then heads; each order starts its search at
  `base - 1` and every head continues from the prime the previous head took.
  """
  taken: set[int] = set()
  sizes: dict[int, list[int]] = {}
  for layer in layer_ids:
    layer_sizes = []
    for base in table_bases:
      start = base - 1
      for _ in range(heads_per_ngram):
        start = next_prime(start, taken)
        taken.add(start)
        layer_sizes.append(start)
    sizes[layer] = layer_sizes
  return sizes


def layer_multipliers(compressed_vocab_size: int, max_ngram_size: int, seed: int, layer: int):
  """Odd int64 multipliers of one layer, bounded so that `id * m` never overflows int64."""
  bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
  rng = np.random.default_rng(seed + _LAYER_SEED_STRIDE * layer)
  r = rng.integers(0, bound, size=max_ngram_size, dtype=np.int64)
  return 2 * r + 1


# ---------------------------------------------------------------------------------------------
# Host path
# ---------------------------------------------------------------------------------------------


# From this table size up, the float quotient of a mix is at most one off (see `_hash_kernel`).
_FLOAT_QUOTIENT_MIN_SIZE = 1 << 13
# Tokens per tile of `_hash_kernel`: the tile's per-head results (H x 128 int64) stay in L1.
_TILE = 128


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _hash_kernel(x, start, mults, sizes, inv_sizes, use_float, pad_id, heads_per_ngram, out):
  """Hashes positions `start:` of `x` [B, S] into `out` [B, S - start, H], in one pass.

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
    x: int64 [B, S] compressed ids.
    start: first position to hash; earlier ones are context.
    mults: uint64 [N] multipliers.
    sizes: uint64 [H] prime table sizes.
    inv_sizes: float64 [H], 1 / sizes.
    use_float: bool [H], sizes >= _FLOAT_QUOTIENT_MIN_SIZE.
    pad_id: uint64, the id before the sequence start.
    heads_per_ngram: K.
    out: int64 [B, S - start, H], written.
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


_WORKERS = min(8, os.cpu_count() or 1)


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS)


def _run_blocks(blocks: list[Callable[[], None]]) -> None:
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


# ---------------------------------------------------------------------------------------------
# Device path: 64-bit products, XOR and modulo in uint32 limbs.
# ---------------------------------------------------------------------------------------------


def _mul_wide_u32(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """(hi, lo) uint32 limbs of the 64-bit product of uint32 `a` and a constant `b` < 2**32."""
  a0, a1 = a & 0xFFFF, a >> 16
  b0, b1 = np.uint32(b & 0xFFFF), np.uint32(b >> 16)
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)  # < 3 * 2**16: no carry lost
  lo = (p00 & 0xFFFF) | (mid << 16)
  hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  return hi, lo


def _bits(hi: jax.Array, lo: jax.Array, pos: int, width: int) -> jax.Array:
  """Bits [pos, pos + width) of the 64-bit value (hi, lo), as uint32 (width <= 32)."""
  mask = np.uint32((1 << width) - 1)
  if pos >= 32:
    return (hi >> (pos - 32)) & mask
  if pos + width <= 32:
    return (lo >> pos) & mask
  return ((lo >> pos) | (hi << (32 - pos))) & mask


def _mod_u64(hi: jax.Array, lo: jax.Array, m: int) -> jax.Array:
  """(hi, lo) mod m for a constant m < 2**31, by Horner's rule over w-bit digits.

  The running remainder r < m, so `r * 2**w + digit` stays below 2**32 with w = 32 - bits(m).
  The values hashed are below 2**63, so 63 bits are reduced.
  """
  w = 32 - m.bit_length()
  pos = 63
  r = jnp.zeros_like(lo)
  mod = np.uint32(m)
  while pos > 0:
    width = min(w, pos)
    pos -= width
    r = ((r << width) | _bits(hi, lo, pos, width)) % mod
  return r


def _hash_device(ids, mults, sizes, pad_id, heads_per_ngram):
  """Jittable hashing of int ids [B, T] -> int32 [B, T, H], equal to the host path."""
  x = ids.astype(jnp.uint32)
  t = x.shape[1]
  hi = jnp.zeros_like(x)
  lo = jnp.zeros_like(x)
  out = []
  for k, m in enumerate(int(v) for v in mults):
    # [B, T] -> [B, T]: the k-th previous token, pad id before the start.
    xk = jnp.pad(x, ((0, 0), (k, 0)), constant_values=pad_id)[:, :t]
    p_hi, p_lo = _mul_wide_u32(xk, m & 0xFFFFFFFF)
    p_hi = p_hi + xk * np.uint32(m >> 32)  # exact: the product is below 2**63
    hi, lo = hi ^ p_hi, lo ^ p_lo
    if k == 0:
      continue
    for j in range(heads_per_ngram):
      out.append(_mod_u64(hi, lo, sizes[(k - 1) * heads_per_ngram + j]))
  return jnp.stack(out, axis=-1).astype(jnp.int32)  # H x [B, T] -> [B, T, H]


# ---------------------------------------------------------------------------------------------
# The hasher
# ---------------------------------------------------------------------------------------------


class NgramHasher:
  """Multi-head n-gram hashing for every Engram layer of a model.

  Args:
    compressed_vocab_size: V', the number of compressed ids (multipliers are bounded by it).
    table_bases: one base per n-gram order 2..N.
    max_ngram_size: N.
    heads_per_ngram: K.
    layer_ids: the Engram layers (0-based block indices).
    pad_id: the *compressed* id of the pad token, used before the sequence start.
    seed: multiplier seed.

  Raises:
    ValueError: arguments that break `EngramConfig`'s rules, a vocabulary < 1, or a pad id
      outside [0, V').
  """

  def __init__(
    self,
    compressed_vocab_size: int,
    table_bases: Sequence[int],
    max_ngram_size: int,
    heads_per_ngram: int,
    layer_ids: Sequence[int],
    pad_id: int,
    seed: int,
  ):
    check_engram_args(
      max_ngram_size=max_ngram_size,
      heads_per_ngram=heads_per_ngram,
      table_bases=table_bases,
      layer_ids=layer_ids,
    )
    if not isinstance(compressed_vocab_size, (int, np.integer)) or compressed_vocab_size < 1:
      raise ValueError(
        f"compressed_vocab_size: expected an int >= 1, got {compressed_vocab_size!r}"
      )
    if not 0 <= int(pad_id) < compressed_vocab_size:
      raise ValueError(
        f"pad_id: expected a compressed id in [0, {compressed_vocab_size}), got {pad_id!r}"
      )
    self.compressed_vocab_size = int(compressed_vocab_size)
    self.table_bases = tuple(int(b) for b in table_bases)
    self.max_ngram_size = int(max_ngram_size)
    self.heads_per_ngram = int(heads_per_ngram)
    self.layer_ids = tuple(int(i) for i in layer_ids)
    self.pad_id = int(pad_id)
    self.seed = int(seed)
    self._sizes = table_sizes_for_layers(self.table_bases, self.heads_per_ngram, self.layer_ids)
    self._mults = {
      layer: layer_multipliers(self.compressed_vocab_size, self.max_ngram_size, seed, layer)
      for layer in self.layer_ids
    }
    self._kernel_args = {layer: self._layer_kernel_args(layer) for layer in self.layer_ids}

  def _layer_kernel_args(self, layer: int) -> tuple:
    """`_hash_kernel`'s per-layer arguments, from mults to heads_per_ngram."""
    sizes = np.asarray(self._sizes[layer], np.uint64)
    return (
      self._mults[layer].astype(np.uint64),
      sizes,
      1.0 / sizes.astype(np.float64),
      sizes >= _FLOAT_QUOTIENT_MIN_SIZE,
      np.uint64(self.pad_id),
      self.heads_per_ngram,
    )

  @classmethod
  def from_config(cls, cfg: EngramConfig, compressed_vocab_size: int, pad_id: int):
    """A hasher for `cfg`; `pad_id` is the compressed id of `cfg.pad_token_id`."""
    return cls(
      compressed_vocab_size,
      cfg.table_bases,
      cfg.max_ngram_size,
      cfg.heads_per_ngram,
      cfg.layer_ids,
      pad_id,
      cfg.seed,
    )

  @property
  def num_heads(self) -> int:
    """H = (N - 1) * K."""
    return (self.max_ngram_size - 1) * self.heads_per_ngram

  def _check_layer(self, layer_id) -> int:
    if layer_id not in self._mults:
      raise ValueError(
        f"layer_id: expected one of the hasher's Engram layers {self.layer_ids}, got {layer_id!r}"
      )
    return int(layer_id)

  def multipliers(self, layer_id: int) -> np.ndarray:
    """int64 [N]: the odd multipliers of `layer_id`."""
    return self._mults[self._check_layer(layer_id)].copy()

  def table_sizes(self, layer_id: int) -> list[int]:
    """The H prime table sizes of `layer_id`, order-major."""
    return list(self._sizes[self._check_layer(layer_id)])

  def offsets(self, layer_id: int) -> np.ndarray:
    """int64 [H]: each head's first row in the layer's flat table (exclusive cumsum)."""
    sizes = np.asarray(self.table_sizes(layer_id), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

  def check_ids(self, compressed_ids) -> np.ndarray:
    """Validates compressed ids [B, T] and returns them as int64.

    Raises:
      ValueError: wrong rank or dtype, or ids outside [0, V').
    """
    x = np.asarray(compressed_ids)
    if x.ndim != 2:
      raise ValueError(f"compressed ids: expected rank 2 [B, T], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"compressed ids: expected an integer array, got dtype {x.dtype}")
    if x.size and (int(x.min()) < 0 or int(x.max()) >= self.compressed_vocab_size):
      raise ValueError(
        f"compressed ids: expected ids in [0, {self.compressed_vocab_size}) (the compressed "
        f"vocabulary; larger ids could overflow int64), got range "
        f"[{int(x.min())}, {int(x.max())}]"
      )
    return np.ascontiguousarray(x, dtype=np.int64)

  def __call__(self, compressed_ids, layer_id: int) -> np.ndarray:
    """Hash ids of one layer: compressed ids [B, T] -> int64 [B, T, H] (exact, spec §2)."""
    layer = self._check_layer(layer_id)
    x = self.check_ids(compressed_ids)
    out = np.empty((*x.shape, self.num_heads), dtype=np.int64)
    _run_blocks(self._blocks(x, layer, out))
    return out

  def hash_all(self, compressed_ids) -> dict[int, np.ndarray]:
    """Hash ids of every Engram layer: {layer_id: int64 [B, T, H]}."""
    x = self.check_ids(compressed_ids)
    outs = {layer: np.empty((*x.shape, self.num_heads), np.int64) for layer in self.layer_ids}
    _run_blocks([fn for layer in self.layer_ids for fn in self._blocks(x, layer, outs[layer])])
    return outs

  def _blocks(self, x: np.ndarray, layer: int, out: np.ndarray) -> list[Callable[[], None]]:
    """Splits one layer's work into blocks of ~_CHUNK_TOKENS tokens.

    Whole rows when they are short (contiguous memory); otherwise windows of the sequence that
    carry N - 1 tokens of left context.
    """
    b, t = x.shape
    args = self._kernel_args[layer]
    if t <= _CHUNK_TOKENS:
      rows = max(1, _CHUNK_TOKENS // max(t, 1))
      return [
        functools.partial(_hash_kernel, x[r0 : r0 + rows], 0, *args, out[r0 : r0 + rows])
        for r0 in range(0, b, rows)
      ]
    context = self.max_ngram_size - 1
    blocks = []
    for r in range(b):
      for t0 in range(0, t, _CHUNK_TOKENS):
        t1 = min(t, t0 + _CHUNK_TOKENS)
        s = max(0, t0 - context)
        blocks.append(
          functools.partial(_hash_kernel, x[r : r + 1, s:t1], t0 - s, *args, out[r : r + 1, t0:t1])
        )
    return blocks

  def device_fn(self, layer_id: int) -> Callable[[jax.Array], jax.Array]:
    """A jittable function: compressed ids [B, T] (int32) -> int32 [B, T, H], equal to
    `self(ids, layer_id)`. Needs every table size < 2**31 and V' < 2**31.

    Ids are not range-checked inside jit; out-of-range ids give unspecified hashes.
    """
    layer = self._check_layer(layer_id)
    sizes = self._sizes[layer]
    if max(sizes) >= 2**31 or self.compressed_vocab_size >= 2**31:
      raise ValueError(
        "device hashing: expected table sizes and the compressed vocabulary below 2**31, "
        f"got max size {max(sizes)} and V'={self.compressed_vocab_size}"
      )
    return functools.partial(
      _hash_device,
      mults=tuple(int(m) for m in self._mults[layer]),
      sizes=tuple(sizes),
      pad_id=self.pad_id,
      heads_per_ngram=self.heads_per_ngram,
    )
