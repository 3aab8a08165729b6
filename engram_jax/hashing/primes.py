"""Prime table sizes and per-layer multipliers of the n-gram hash (spec §2).

Every (layer, order, head) of a model gets its own prime table size, distinct across the whole
model; every layer gets its own odd multipliers, seeded by the layer index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max
# Layer seeds are spaced by this prime (spec §2).
_LAYER_SEED_STRIDE = 10007
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
