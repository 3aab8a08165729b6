"""DeepSeek-V4.1's Engram (engram_jax/interop/v41.py) against vectors made by DeepSeek's own V4.1
inference code (tests/data/v41: a small config in V4.1's key names, the module weights in V4.1's
tensor names and dtypes, and the reference's inputs, intermediates and outputs)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from engram_jax import presets
from engram_jax.hashing import NgramHasher
from engram_jax.interop import safetensors
from engram_jax.interop.v41 import DEAD_IF, V41Config, V41Engram, table_shapes, v41_flash_engram
from engram_jax.layers import fp8
from engram_jax.memory import storage

V41 = "tests/data/v41"
TOKENIZER = "tests/data/demo_vectors_tokenizer.json"
CASES = {"": "main", "short_": "T = 3 < N", "img_": "a 10-token image span"}


@pytest.fixture(scope="module")
def vectors():
  return dict(np.load(f"{V41}/vectors.npz"))


@pytest.fixture(scope="module")
def engram():
  return V41Engram.from_checkpoint(f"{V41}/config.json", f"{V41}/engram.safetensors", TOKENIZER)


def _types(vectors, prefix):
  return vectors["img_token_types"] if prefix == "img_" else None


def _within_one_bf16_ulp(got, want):
  """Elementwise relative error <= 2**-7 and fewer than 0.01% of elements differing."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  nonzero = want != 0
  rel = np.abs(got - want)[nonzero] / np.abs(want[nonzero])
  assert rel.max(initial=0) <= 2.0**-7
  assert np.all(got[~nonzero] == 0)
  assert np.mean(got != want) < 1e-4


def test_compression_multipliers_sizes_and_offsets(engram, vectors):
  np.testing.assert_array_equal(engram.compressor(np.arange(6000)), vectors["lookup"])
  assert engram.compressor.num_compressed == int(vectors["num_compressed"])
  assert engram.hasher.pad_id == int(vectors["pad_compressed"])
  for layer in (1, 3):
    np.testing.assert_array_equal(engram.hasher.multipliers(layer), vectors[f"mult_layer{layer}"])
    np.testing.assert_array_equal(engram.hasher.table_sizes(layer), vectors[f"sizes_layer{layer}"])
    np.testing.assert_array_equal(engram.layouts[layer].offsets, vectors[f"offsets_layer{layer}"])


@pytest.mark.parametrize("prefix", list(CASES))
def test_hash_ids_equal_the_reference(engram, vectors, prefix):
  ids = engram.hash_ids(vectors[f"{prefix}input_ids"], _types(vectors, prefix))
  for layer in (1, 3):
    got = np.asarray(engram.layouts[layer].row_ids(ids[layer]))  # the vectors add the offsets
    np.testing.assert_array_equal(got, vectors[f"{prefix}hash_layer{layer}"])


def test_incremental_hashing_equals_one_shot(engram, vectors):
  tokens, prefill = vectors["input_ids"], int(vectors["decode_prefill_len"])
  context = engram.config.max_ngram_size - 1
  steps = [engram.hash_ids(tokens[:, :prefill])]
  for t in range(prefill, tokens.shape[1]):  # one token at a time, with N - 1 of context
    window = engram.hash_ids(tokens[:, max(0, t - context) : t + 1])
    steps.append({layer: ids[:, -1:] for layer, ids in window.items()})
  for i, layer in enumerate((1, 3)):
    got = np.concatenate([s[layer] for s in steps], axis=1)
    got = np.asarray(engram.layouts[layer].row_ids(got))
    np.testing.assert_array_equal(got, vectors["decode_hash_ids"][:, :, i])


@pytest.mark.parametrize("prefix", list(CASES))
def test_decoded_rows_are_exact(engram, vectors, prefix):
  ids = engram.hash_ids(vectors[f"{prefix}input_ids"], _types(vectors, prefix))
  for layer in (1, 3):
    rows = np.asarray(engram.rows(layer, ids[layer]))
    assert rows.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(rows.astype(np.float32), vectors[f"{prefix}emb_layer{layer}"])


def test_activation_codes_are_exact(vectors):
  for layer in (1, 3):
    rows = vectors[f"emb_layer{layer}"]  # [B, T, H, Dh]
    codes, scales = fp8.quantize_blocks(jnp.asarray(rows.reshape(*rows.shape[:2], -1)))
    np.testing.assert_array_equal(np.asarray(codes, np.float32), vectors[f"actq_layer{layer}"])
    np.testing.assert_array_equal(np.asarray(scales), vectors[f"acts_layer{layer}"])


@pytest.mark.parametrize("prefix", list(CASES))
def test_outputs_within_one_bf16_ulp(engram, vectors, prefix):
  types = _types(vectors, prefix)
  for layer in (1, 3):
    hidden = vectors[f"{prefix}hidden_layer{layer}"]
    out = engram(hidden, vectors[f"{prefix}input_ids"], layer, types)
    assert out.shape == hidden.shape and out.dtype == jnp.bfloat16
    _within_one_bf16_ulp(out, vectors[f"{prefix}out_layer{layer}"])
    if types is not None:  # dead positions: the gate is 0, the output is the input
      dead = DEAD_IF(types)
      np.testing.assert_array_equal(np.asarray(out, np.float32)[dead], hidden[dead])
      gates = np.asarray(engram.gates(hidden, vectors[f"{prefix}input_ids"], layer, types))
      assert np.all(gates[dead] == 0) and np.all(gates[~dead] > 0)


def test_rows_straight_from_the_mapped_file(engram, vectors):
  mapped = V41Engram.from_checkpoint(
    f"{V41}/config.json", f"{V41}/engram.safetensors", TOKENIZER, cache_fraction=0.0
  )
  assert isinstance(mapped.tables[1].parts["values"], np.memmap)  # mapped, not read
  hidden, ids = vectors["hidden_layer3"], vectors["input_ids"]
  np.testing.assert_array_equal(
    np.asarray(mapped(hidden, ids, 3), np.float32), np.asarray(engram(hidden, ids, 3), np.float32)
  )


def test_the_key_value_projection_is_exact(engram, vectors):
  ckpt = safetensors.Checkpoint.open(f"{V41}/engram.safetensors")
  for layer in (1, 3):
    rows = vectors[f"emb_layer{layer}"]
    kv = fp8.block_fp8_matmul(
      jnp.asarray(rows.reshape(*rows.shape[:2], -1), jnp.bfloat16),
      jnp.asarray(ckpt.array(f"layers.{layer}.engram.wkv.weight")),
      jnp.asarray(ckpt.array(f"layers.{layer}.engram.wkv.scale")),
    )
    kv = np.asarray(kv, np.float32)
    d = engram.config.dim
    np.testing.assert_array_equal(
      kv[..., : 4 * d].reshape(*kv.shape[:2], 4, d), vectors[f"key_layer{layer}"]
    )
    np.testing.assert_array_equal(kv[..., 4 * d :], vectors[f"value_layer{layer}"])


def test_the_hf_config_form_and_bad_inputs(tmp_path, vectors):
  raw = json.loads(pathlib.Path(f"{V41}/config.json").read_text())
  hf = {
    "text_config": {
      **{k: v for k, v in raw.items() if k != "engram_pad_id"},
      "engram_pad_token_id": 2,
    }
  }
  assert V41Config.from_dict(hf) == V41Config.from_dict(raw)
  with pytest.raises(ValueError, match=r"missing keys \['engram_layer_ids', 'engram_vocab_size'"):
    V41Config.from_dict({"dim": 128, "hc_mult": 4, "norm_eps": 1e-20})
  wrong = dict(raw, engram_compressed_vocab_size=4818)
  with pytest.raises(ValueError, match=r"compression gives 4819 ids.*4818"):
    V41Engram.from_checkpoint(wrong, f"{V41}/engram.safetensors", TOKENIZER)
  # A checkpoint without one tensor, and one with a tensor of the wrong dtype.
  ckpt = safetensors.Checkpoint.open(f"{V41}/engram.safetensors")
  names = [n for n in ckpt.names if n != "layers.3.engram.embed.scale"]
  safetensors.write(
    tmp_path / "missing.safetensors",
    {n: np.asarray(ckpt.array(n)) for n in names},
    dtypes={n: ckpt.info(n).dtype for n in names},
  )
  with pytest.raises((KeyError, ValueError), match=r"layers\.3\.engram\.embed\.scale"):
    V41Engram.from_checkpoint(raw, tmp_path / "missing.safetensors", TOKENIZER)
  tensors = {n: np.asarray(ckpt.array(n)) for n in ckpt.names}
  dtypes = {n: ckpt.info(n).dtype for n in ckpt.names}
  tensors["layers.1.engram.q_weight"] = tensors["layers.1.engram.q_weight"].astype(np.float32)
  dtypes["layers.1.engram.q_weight"] = "F32"
  safetensors.write(tmp_path / "dtype.safetensors", tensors, dtypes=dtypes)
  with pytest.raises(ValueError, match=r"layers\.1\.engram\.q_weight: expected dtype BF16"):
    V41Engram.from_checkpoint(raw, tmp_path / "dtype.safetensors", TOKENIZER)


def test_the_released_preset():
  cfg = v41_flash_engram()
  assert presets.v41_flash_engram() == cfg
  assert cfg.num_heads == 24 and cfg.num_embeddings == (384_006_168, 384_016_682)
  shapes = table_shapes(cfg)
  nbytes = {k: sum(x.size * x.dtype.itemsize for x in v.values()) for k, v in shapes.items()}
  assert nbytes[1] == 384_006_168 * 264 and nbytes[14] == 384_016_682 * 264
  assert round(sum(nbytes.values()) / 2**30, 1) == 188.8  # GiB, as released
  # The row counts are what the hasher's prime search gives (multipliers need no tokenizer).
  hasher = NgramHasher(99_092, [16_000_000] * 3, 4, 8, [1, 14], pad_id=2, seed=0)
  for layer, rows in zip(cfg.layer_ids, cfg.num_embeddings, strict=True):
    assert sum(hasher.table_sizes(layer)) == rows
  # The decoded tables' shapes, without allocating 188.8 GiB.
  decoded = jax.eval_shape(lambda parts: storage.decode(parts, "mxfp8", jnp.bfloat16), shapes[14])
  assert decoded.shape == (384_016_682, 256) and decoded.dtype == jnp.bfloat16
