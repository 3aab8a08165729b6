"""Tests for engram_jax/layers/engram.py."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.layers.engram import Engram, causal_depthwise_conv

B, T, M, D, H, DH = 2, 11, 4, 16, 4, 8


def _inputs(seed=0, m=M):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (B, T, m, D)), jax.random.normal(k2, (B, T, H, DH))


def _gated_value(params, hidden, rows):
  """Spec §4 written out with NumPy, without the convolution."""
  p = {k: np.asarray(v) for k, v in params.items()}
  e = np.asarray(rows).reshape(B, T, H * DH)
  kv = np.einsum("btc,cjd->btjd", e, p["kv_kernel"]) + p["kv_bias"]
  eps = np.finfo(np.float32).eps

  def norm(x, w):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * w

  k = norm(kv[:, :, :M], p["key_norm"])
  q = norm(np.asarray(hidden), p["query_norm"])
  s = (q * k).sum(-1) / np.sqrt(D)
  s = np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))
  gate = 1 / (1 + np.exp(-s))
  return gate[..., None] * kv[:, :, M][:, :, None, :]


class EngramTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_init_output_is_gated_value(self):
    hidden, rows = _inputs()
    layer = Engram(max_ngram_size=3, kernel_size=4)
    params = nn.unbox(layer.init(jax.random.key(1), hidden, rows))["params"]
    out = self.variant(layer.apply)({"params": params}, hidden, rows)
    chex.assert_shape(out, (B, T, M, D))
    np.testing.assert_allclose(out, _gated_value(params, hidden, rows), rtol=1e-4, atol=1e-5)

  def test_single_stream_shape(self):
    hidden, rows = _inputs(m=1)
    layer = Engram()
    variables = layer.init(jax.random.key(1), hidden[:, :, 0], rows)
    out = layer.apply(variables, hidden[:, :, 0], rows)
    chex.assert_shape(out, (B, T, D))
    np.testing.assert_allclose(out, layer.apply(variables, hidden, rows)[:, :, 0], rtol=1e-6)

  def test_causal_in_rows(self):
    hidden, rows = _inputs()
    layer = Engram(max_ngram_size=2, kernel_size=3)
    params = nn.unbox(layer.init(jax.random.key(1), hidden, rows))["params"]
    params["conv_kernel"] = jax.random.normal(jax.random.key(2), params["conv_kernel"].shape)
    t = 5
    grad = jax.grad(lambda r: layer.apply({"params": params}, hidden, r)[:, t].sum())(rows)
    assert np.all(np.asarray(grad[:, t + 1 :]) == 0)
    assert np.any(np.asarray(grad[:, t]) != 0) and np.any(np.asarray(grad[:, t - 2]) != 0)

  def test_bfloat16_compute_close_to_float32(self):
    hidden, rows = _inputs()
    f32 = Engram()
    params = f32.init(jax.random.key(1), hidden, rows)
    out32 = f32.apply(params, hidden, rows)
    out16 = Engram(dtype=jnp.bfloat16).apply(params, hidden, rows)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, out32, atol=0.1, rtol=0.05)

  def test_params_carry_logical_axes(self):
    hidden, rows = _inputs()
    variables = Engram().init(jax.random.key(1), hidden, rows)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["kv_kernel"]) == ("engram_memory", "engram_kv", "embed")
    assert tuple(specs["conv_kernel"]) == ("conv_taps", "engram_channels")
    assert np.all(np.asarray(nn.unbox(variables)["params"]["conv_kernel"]) == 0)

  def test_gate_is_sown(self):
    hidden, rows = _inputs()
    layer = Engram()
    variables = layer.init(jax.random.key(1), hidden, rows)
    _, state = layer.apply(variables, hidden, rows, mutable=["intermediates"])
    (gate,) = state["intermediates"]["gate"]
    chex.assert_shape(gate, (B, T, M))
    assert np.all((np.asarray(gate) > 0) & (np.asarray(gate) < 1))

  def test_shape_mismatch_errors(self):
    hidden, rows = _inputs()
    layer = Engram()
    with pytest.raises(ValueError, match=r"same \[B, T\]"):
      layer.init(jax.random.key(0), hidden, rows[:, :-1])
    with pytest.raises(ValueError, match=r"rows: expected \[B, T, H, Dh\]"):
      layer.init(jax.random.key(0), hidden, rows[..., 0])
    with pytest.raises(ValueError, match="hidden: expected"):
      layer.init(jax.random.key(0), hidden[..., 0, 0], rows)


def test_causal_depthwise_conv_matches_direct_sum():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 13, 5)).astype(np.float32)
  kernel = rng.normal(size=(4, 5)).astype(np.float32)
  dil = 3
  want = np.zeros_like(x)
  for t in range(13):
    for i in range(4):
      src = t - (3 - i) * dil
      if src >= 0:
        want[:, t] += kernel[i] * x[:, src]
  got = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kernel), dil)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _v41_layer_inputs(layer: int):
  """The V4.1 reference's hidden streams and rows, and the layer's weights as float params of
  the trainable form (the FP8 key/value weight dequantized: codes x tile exponents)."""
  from engram_jax.interop import safetensors

  ckpt = safetensors.Checkpoint.open("tests/data/v41/engram.safetensors")
  vectors = np.load("tests/data/v41/vectors.npz")
  codes = np.asarray(ckpt.array(f"layers.{layer}.engram.wkv.weight"), np.float32)  # [O, Dm]
  tiles = np.ldexp(1.0, ckpt.array(f"layers.{layer}.engram.wkv.scale").astype(np.int64) - 127)
  w = codes * np.repeat(np.repeat(tiles, 32, axis=0), 32, axis=1)[: codes.shape[0]]
  m, d = 4, 128
  params = {
    "kv_kernel": w.T.reshape(-1, m + 1, d),  # [Dm, (M+1) D] -> [Dm, M+1, D]
    "q_weight": np.asarray(ckpt.array(f"layers.{layer}.engram.q_weight"), np.float32),
    "k_weight": np.asarray(ckpt.array(f"layers.{layer}.engram.k_weight"), np.float32),
  }
  return params, vectors[f"hidden_layer{layer}"], vectors[f"emb_layer{layer}"], vectors


def test_v41_form_has_the_released_parameters_and_formula():
  params, hidden, rows, _ = _v41_layer_inputs(1)
  layer = Engram(max_ngram_size=4, qk_eps=1e-20, form="v41")
  init = nn.unbox(layer.init(jax.random.key(0), jnp.asarray(hidden), jnp.asarray(rows)))
  assert set(init["params"]) == {"kv_kernel", "q_weight", "k_weight"}  # no conv, bias, norms
  assert layer.conv_state_length == 0
  y = np.asarray(layer.apply({"params": params}, jnp.asarray(hidden), jnp.asarray(rows)))
  # float64 NumPy: s = sum(x w k) rsqrt(mean x^2 + eps) rsqrt(mean k^2 + eps) / sqrt(D).
  e = rows.reshape(*rows.shape[:2], -1).astype(np.float64)
  kv = np.einsum("btc,cjd->btjd", e, params["kv_kernel"])
  key, value = kv[:, :, :4], kv[:, :, 4]
  w = params["q_weight"] * params["k_weight"]
  x = hidden.astype(np.float64)
  r = lambda a: 1 / np.sqrt(np.mean(a * a, axis=-1) + 1e-20)
  s = np.sum(x * w * key, axis=-1) * r(x) * r(key) / np.sqrt(128)
  gate = 1 / (1 + np.exp(-np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))))
  np.testing.assert_allclose(y, gate[..., None] * value[:, :, None], rtol=2e-4, atol=2e-4)


def test_v41_form_is_the_released_layer_up_to_its_fp8_activations():
  """With the released weights, h + Y of the trainable form is V4.1's output but for the FP8
  quantization of the projection's input (the released layer's; `interop.v41` has it)."""
  for layer_id in (1, 3):
    params, hidden, rows, vectors = _v41_layer_inputs(layer_id)
    layer = Engram(max_ngram_size=4, qk_eps=1e-20, form="v41")
    y = layer.apply({"params": params}, jnp.asarray(hidden), jnp.asarray(rows))
    out = np.asarray(hidden + y)
    want = vectors[f"out_layer{layer_id}"]
    assert np.abs(out - want).max() < 0.05 * np.abs(want).max()
    assert np.mean(np.abs(out - want)) < 0.01 * np.mean(np.abs(want))


def test_v41_form_dead_positions_and_decoding():
  params, hidden, rows, _ = _v41_layer_inputs(3)
  layer = Engram(max_ngram_size=4, qk_eps=1e-20, form="v41")
  dead = np.zeros(hidden.shape[:2], bool)
  dead[:, 5:9] = True
  y = np.asarray(
    layer.apply({"params": params}, jnp.asarray(hidden), jnp.asarray(rows), dead=jnp.asarray(dead))
  )
  assert np.all(y[dead] == 0) and np.all(y[~dead] != 0)
  state = jnp.zeros((hidden.shape[0], 0, 4 * 128))  # no convolution: an empty decoding state
  y2, state2 = layer.apply({"params": params}, jnp.asarray(hidden), jnp.asarray(rows), state)
  assert state2.shape == state.shape
  np.testing.assert_array_equal(y2, layer.apply({"params": params}, hidden, rows))
  with pytest.raises(ValueError, match="form: expected one of"):
    Engram(form="v5").init(jax.random.key(0), jnp.asarray(hidden), jnp.asarray(rows))


def _ablation_inputs():
  rng = np.random.default_rng(7)
  hidden = jnp.asarray(rng.standard_normal((2, 6, 3, 16)), jnp.float32)  # [B, T, M, D]
  rows = jnp.asarray(rng.standard_normal((2, 6, 4, 8)), jnp.float32)  # [B, T, H, Dh]
  return hidden, rows


def _gates_and_params(**options):
  hidden, rows = _ablation_inputs()
  layer = Engram(max_ngram_size=3, **options)
  variables = nn.unbox(layer.init(jax.random.key(1), hidden, rows))
  y, state = layer.apply(variables, hidden, rows, mutable=["intermediates"])
  (gate,) = state["intermediates"]["gate"]
  shapes = {k: tuple(v.shape) for k, v in variables["params"].items()}
  return np.asarray(y), np.asarray(gate), shapes, variables, layer


def test_ablation_shared_gate_is_one_gate_for_every_stream():
  _, multi, multi_shapes, _, _ = _gates_and_params()
  _, shared, shapes, _, _ = _gates_and_params(gating="shared")
  assert multi_shapes["kv_kernel"] == (32, 4, 16) and shapes["kv_kernel"] == (32, 2, 16)
  assert shapes["key_norm"] == shapes["query_norm"] == (1, 16)  # one key, one query
  np.testing.assert_array_equal(shared, np.broadcast_to(shared[..., :1], shared.shape))
  assert not np.allclose(multi, np.broadcast_to(multi[..., :1], multi.shape))


def test_ablation_without_context_aware_gating_fixes_the_gate_to_one():
  _, rows = _ablation_inputs()
  y, gate, shapes, variables, _ = _gates_and_params(gating="none")
  np.testing.assert_array_equal(gate, 1.0)
  assert shapes["kv_kernel"] == (32, 1, 16) and "key_norm" not in shapes  # value only
  # The conv starts at zero: Y is the value on every stream.
  value = jnp.einsum("btc,cd->btd", rows.reshape(2, 6, 32), variables["params"]["kv_kernel"][:, 0])
  np.testing.assert_allclose(
    y, np.broadcast_to(np.asarray(value)[:, :, None], y.shape), rtol=1e-5, atol=1e-6
  )


def test_ablation_without_the_short_conv():
  y, gate, shapes, variables, layer = _gates_and_params(short_conv=False)
  assert "conv_kernel" not in shapes and "conv_norm" not in shapes and layer.conv_state_length == 0
  hidden, rows = _ablation_inputs()
  # With the conv taps nonzero, the full layer differs from u = gate * value; without, Y = u.
  full_vars = nn.unbox(Engram(max_ngram_size=3).init(jax.random.key(1), hidden, rows))
  kv = jnp.einsum("btc,cjd->btjd", rows.reshape(2, 6, 32), variables["params"]["kv_kernel"])
  u = gate[..., None] * np.asarray(kv[:, :, 3])[:, :, None]
  np.testing.assert_allclose(y, u, rtol=1e-5, atol=1e-6)
  assert set(full_vars["params"]) - set(shapes) == {"conv_kernel", "conv_norm"}


def test_ablation_without_tokenizer_compression(demo_tokenizer_path):
  from engram_jax.config import EngramConfig
  from engram_jax.hashing import EngramHashing

  cfg = EngramConfig(table_bases=(101, 101), layer_ids=(1,), embed_per_ngram=32, heads_per_ngram=2)
  compressed = EngramHashing.from_file(cfg, demo_tokenizer_path)
  raw = EngramHashing.from_file(
    dataclasses.replace(cfg, compress_tokens=False), demo_tokenizer_path
  )
  ids = np.arange(compressed.compressor.vocab_size)
  np.testing.assert_array_equal(raw.compressor(ids), ids)  # the raw vocabulary reaches the hasher
  assert raw.hasher.compressed_vocab_size == compressed.compressor.vocab_size
  assert compressed.hasher.compressed_vocab_size < raw.hasher.compressed_vocab_size
  with pytest.raises(ValueError, match="gating: expected one of"):
    EngramConfig(gating="single")
