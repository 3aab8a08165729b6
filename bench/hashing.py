"""Host hashing throughput: `NgramHasher.hash_all` against the reference demo's structure.

The baseline follows the official demo: pad-shift the ids once per order, multiply, XOR, one
modulo per head, stack the heads. Both run on the same ids, interleaved, in one process; the
script prints tokens/s for each and their ratio (goal: >= 5x).

    python -m bench.hashing [--batch 64 --seq 2048 --repeats 7]
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from bench.common import best_times
from engram_jax.hashing import NgramHasher

_BATCH = flags.DEFINE_integer("batch", 64, "Sequences per batch (B).")
_SEQ = flags.DEFINE_integer("seq", 2048, "Tokens per sequence (T).")
_BASE = flags.DEFINE_integer("base", 2_262_400, "Table base of every order.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads per n-gram order (K).")
_VOCAB = flags.DEFINE_integer("vocab", 98_990, "Compressed vocabulary (DeepSeek-V3: ~99k).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repetitions of each implementation.")


def reference_hash_all(hasher: NgramHasher, x: np.ndarray) -> dict[int, np.ndarray]:
  """The demo's structure, written out with NumPy (the baseline)."""
  t = x.shape[1]
  out = {}
  for layer in hasher.layer_ids:
    mults = hasher.multipliers(layer)
    sizes = hasher.table_sizes(layer)
    shifts = [x] + [
      np.pad(x, ((0, 0), (k, 0)), constant_values=hasher.pad_id)[:, :t]
      for k in range(1, hasher.max_ngram_size)
    ]
    heads = []
    for n in range(2, hasher.max_ngram_size + 1):
      mix = shifts[0] * mults[0]
      for k in range(1, n):
        mix = np.bitwise_xor(mix, shifts[k] * mults[k])
      for j in range(hasher.heads_per_ngram):
        heads.append((mix % sizes[(n - 2) * hasher.heads_per_ngram + j]).astype(np.int64))
    out[layer] = np.stack(heads, axis=2)
  return out


def measure(batch: int, seq: int, base: int, heads: int, vocab: int, repeats: int) -> dict:
  """Times both implementations (interleaved) and checks they agree."""
  hasher = NgramHasher(vocab, (base, base), 3, heads, (1, 14), pad_id=2, seed=0)
  x = np.random.default_rng(0).integers(0, vocab, size=(batch, seq), dtype=np.int64)
  ours, ref = hasher.hash_all(x), reference_hash_all(hasher, x)
  for layer in hasher.layer_ids:
    np.testing.assert_array_equal(ours[layer], ref[layer])
  best = best_times(
    {"hash_all": lambda: hasher.hash_all(x), "reference": lambda: reference_hash_all(hasher, x)},
    repeats,
  )
  tokens = batch * seq
  return {
    "tokens": tokens,
    "hash_all_tok_s": tokens / best["hash_all"],
    "reference_tok_s": tokens / best["reference"],
    "speedup": best["reference"] / best["hash_all"],
  }


def main(argv):
  del argv
  r = measure(_BATCH.value, _SEQ.value, _BASE.value, _HEADS.value, _VOCAB.value, _REPEATS.value)
  print(
    f"tokens per call:      {r['tokens']:,} ({_BATCH.value} x {_SEQ.value}), 2 layers, "
    f"N=3, K={_HEADS.value}, base {_BASE.value:,}"
  )
  print(f"reference structure:  {r['reference_tok_s'] / 1e6:8.2f} M tokens/s")
  print(f"NgramHasher.hash_all: {r['hash_all_tok_s'] / 1e6:8.2f} M tokens/s")
  print(f"speedup:              {r['speedup']:8.2f}x (best of {_REPEATS.value}, interleaved)")


if __name__ == "__main__":
  app.run(main)
