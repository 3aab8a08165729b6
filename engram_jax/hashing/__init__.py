"""Multi-head n-gram hashing of Engram (paper §2.2 eq. 1; spec §2), on the host.

- `primes`: prime table sizes, distinct across the model, and the per-layer multipliers;
- `kernel`: the compiled (Numba) hash kernel and the thread pool that runs it in blocks;
- `hasher`: `NgramHasher`, compressed ids [B, T] -> hash ids [B, T, H] of every Engram layer;
- `wiring`: `EngramHashing`, a model's tokenizer compression -> hasher -> table layouts.
"""

from engram_jax.hashing.hasher import NgramHasher
from engram_jax.hashing.primes import (
  is_prime,
  layer_multipliers,
  next_prime,
  table_sizes_for_layers,
)
from engram_jax.hashing.wiring import EngramHashing

__all__ = [
  "EngramHashing",
  "NgramHasher",
  "is_prime",
  "layer_multipliers",
  "next_prime",
  "table_sizes_for_layers",
]
