"""Tests for engram_jax/hashing/: bit-exact to the official demo, primes, the wiring."""

import concurrent.futures

import numpy as np
import pytest

from engram_jax import hashing
from engram_jax.config import EngramConfig
from engram_jax.hashing import EngramHashing, NgramHasher
from engram_jax.interop import demo_engram_config
from engram_jax.tokenization import TokenizerCompressor, load_tokenizer


def reference_hash(x, mults, sizes, pad_id, n_max, k):
  """The demo's structure: pad-shift, multiply, XOR, one modulo per head."""
  t = x.shape[1]
  shifts = [x] + [
    np.pad(x, ((0, 0), (s, 0)), constant_values=pad_id)[:, :t] for s in range(1, n_max)
  ]
  out = []
  for n in range(2, n_max + 1):
    mix = shifts[0] * mults[0]
    for s in range(1, n):
      mix = np.bitwise_xor(mix, shifts[s] * mults[s])
    out += [mix % sizes[(n - 2) * k + j] for j in range(k)]
  return np.stack(out, axis=2)


@pytest.fixture(scope="module")
def demo(demo_vectors, demo_tokenizer_path):
  config, _, arrays = demo_vectors
  comp = TokenizerCompressor.from_file(demo_tokenizer_path)
  hasher = NgramHasher(
    comp.num_compressed,
    config["engram_vocab_size"],
    config["max_ngram_size"],
    config["n_head_per_ngram"],
    config["layer_ids"],
    int(comp.lookup[config["pad_id"]]),
    config["seed"],
  )
  return config, arrays, comp, hasher


def test_bit_exact_to_demo(demo):
  config, arrays, comp, hasher = demo
  ids = comp(arrays["input_ids"])
  assert hasher.pad_id == int(arrays["pad_compressed"])
  all_ids = hasher.hash_all(ids)
  for layer in config["layer_ids"]:
    np.testing.assert_array_equal(hasher.multipliers(layer), arrays[f"mult_layer{layer}"])
    np.testing.assert_array_equal(hasher.table_sizes(layer), arrays[f"sizes_layer{layer}"])
    got = hasher(ids, layer)
    assert got.dtype == np.int64 and got.shape == (*ids.shape, 8)
    np.testing.assert_array_equal(got, arrays[f"hash_layer{layer}"])
    np.testing.assert_array_equal(all_ids[layer], got)


def test_wiring_equals_demo(demo_vectors, demo_tokenizer_path):
  config, _, arrays = demo_vectors
  wiring = EngramHashing.from_file(demo_engram_config(config), demo_tokenizer_path, init_std=0.5)
  assert wiring.hasher.pad_id == int(arrays["pad_compressed"])
  got = wiring.hash_ids(arrays["input_ids"])
  assert sorted(got) == sorted(wiring.layouts) == sorted(config["layer_ids"])
  for layer in config["layer_ids"]:
    np.testing.assert_array_equal(got[layer], arrays[f"hash_layer{layer}"])
    layout = wiring.layouts[layer]
    assert layout.sizes == tuple(arrays[f"sizes_layer{layer}"])
    assert layout.dim == config["n_embed_per_ngram"] // config["n_head_per_ngram"]
    assert layout.init_std == 0.5


def test_wiring_hash_ids_from_threads(demo_tokenizer_path):
  cfg = EngramConfig(
    max_ngram_size=3,
    heads_per_ngram=2,
    embed_per_ngram=8,
    table_bases=(9_001, 101),
    layer_ids=(0, 2),
    pad_token_id=0,
  )
  wiring = EngramHashing.from_tokenizer(cfg, load_tokenizer(demo_tokenizer_path))
  rng = np.random.default_rng(4)
  batches = [rng.integers(0, wiring.compressor.vocab_size, size=(4, 300)) for _ in range(16)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(wiring.hash_ids, batches))
  for tokens, ids in zip(batches, got, strict=True):
    compressed = wiring.compressor(tokens)
    for layer in (0, 2):
      np.testing.assert_array_equal(ids[layer], wiring.hasher(compressed, layer))


def test_wiring_rejects_pad_outside_vocabulary(demo_tokenizer_path):
  tok = load_tokenizer(demo_tokenizer_path)
  cfg = EngramConfig(table_bases=(11, 13), pad_token_id=tok.get_vocab_size() + 5)
  with pytest.raises(ValueError, match="vocabulary size"):
    EngramHashing.from_tokenizer(cfg, tok)


@pytest.mark.parametrize("shape", [(1, 40_000), (7, 5_003), (2, 1), (3, 2), (64, 300)])
def test_chunked_host_path_equals_reference(shape):
  hasher = NgramHasher(100_000, (20_011, 10_007, 5_003), 4, 3, [2, 0], pad_id=17, seed=5)
  x = np.random.default_rng(1).integers(0, 100_000, size=shape)
  got = hasher.hash_all(x)
  for layer in (2, 0):
    want = reference_hash(x, hasher.multipliers(layer), hasher.table_sizes(layer), 17, 4, 3)
    np.testing.assert_array_equal(got[layer], want)


@pytest.mark.parametrize("vocab", [129_280, 2**31 - 1])
def test_float_quotient_edge_equals_reference(vocab):
  # Base 8_180 gives primes 8_191 (< 2**13: integer remainder) and 8_209, 8_219 (float
  # quotient, at its smallest sizes, where the quotient estimate errs most); ids at the
  # vocabulary bound make mixes close to 2**63.
  hasher = NgramHasher(vocab, (8_180, 2**30), 3, 3, [0], pad_id=0, seed=3)
  assert hasher.table_sizes(0)[:3] == [8_191, 8_209, 8_219]
  rng = np.random.default_rng(2)
  x = np.concatenate(
    [rng.integers(vocab - 64, vocab, size=(4, 500)), rng.integers(0, vocab, size=(4, 500))]
  )
  want = reference_hash(x, hasher.multipliers(0), hasher.table_sizes(0), 0, 3, 3)
  np.testing.assert_array_equal(hasher(x, 0), want)


def test_primes_distinct_and_above_bases():
  sizes = hashing.table_sizes_for_layers((7_239_680, 7_239_680), 8, (1, 14))
  flat = [s for layer in (1, 14) for s in sizes[layer]]
  assert len(set(flat)) == 32
  assert all(s > 7_239_679 and hashing.is_prime(s) for s in flat)
  # Heads of one order take consecutive primes: nothing prime lies between them.
  first = sizes[1][:8]
  assert not any(hashing.is_prime(n) for n in range(first[0] + 1, first[1]))


def test_is_prime_matches_trial_division():
  def slow(n):
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))

  assert [n for n in range(3000) if hashing.is_prime(n)] == [n for n in range(3000) if slow(n)]
  assert hashing.is_prime(2**61 - 1) and not hashing.is_prime(2**61 + 1)


def test_bad_ids_and_layers():
  hasher = NgramHasher(100, (11, 13), 3, 2, [0], pad_id=0, seed=0)
  with pytest.raises(ValueError, match="layer_id"):
    hasher(np.zeros((1, 4), np.int64), 5)
  with pytest.raises(ValueError, match=r"rank 2 \[B, T\]"):
    hasher(np.zeros((4,), np.int64), 0)
  with pytest.raises(ValueError, match="integer"):
    hasher.hash_all(np.zeros((1, 4), np.float32))
  with pytest.raises(ValueError, match=r"\[0, 100\)"):
    hasher.hash_all(np.array([[1, 100]]))
  with pytest.raises(ValueError, match=r"\[0, 100\)"):
    hasher.hash_all(np.array([[1, -1]]))


@pytest.mark.parametrize(
  ("kwargs", "field"),
  [
    ({"table_bases": (11,)}, "table_bases"),
    ({"max_ngram_size": 1, "table_bases": ()}, "max_ngram_size"),
    ({"heads_per_ngram": 0}, "heads_per_ngram"),
    ({"layer_ids": [-1]}, "layer_ids"),
    ({"layer_ids": [1, 1]}, "layer_ids"),
    ({"table_bases": (11, 1)}, "table_bases"),
    ({"pad_id": 100}, "pad_id"),
    ({"compressed_vocab_size": 0, "pad_id": 0}, "compressed_vocab_size"),
  ],
)
def test_bad_hasher_arguments(kwargs, field):
  args = dict(
    compressed_vocab_size=100,
    table_bases=(11, 13),
    max_ngram_size=3,
    heads_per_ngram=2,
    layer_ids=[0],
    pad_id=0,
    seed=0,
  )
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    NgramHasher(**args)
