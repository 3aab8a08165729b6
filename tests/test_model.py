"""Tests for engram_jax/model.py: block layout, causality, Engram wiring."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import presets
from engram_jax.model import EngramLM

B, T = 2, 12


def _setup(model_cfg, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, model_cfg.vocab_size, size=(B, T)), jnp.int32)
  e = model_cfg.engram
  rows = (
    {}
    if e is None
    else {
      layer: jnp.asarray(rng.normal(size=(B, T, e.num_heads, e.head_dim)), jnp.float32)
      for layer in e.layer_ids
    }
  )
  model = EngramLM(model_cfg)
  variables = nn.unbox(model.init(jax.random.key(seed), tokens, rows))
  return model, variables, tokens, rows


@pytest.fixture(scope="module")
def tiny_cfg():
  return dataclasses.replace(presets.tiny().model, vocab_size=97)


def test_shapes_and_layout(tiny_cfg):
  model, variables, tokens, rows = _setup(tiny_cfg)
  logits, load = model.apply(variables, tokens, rows)
  chex.assert_shape(logits, (B, T, 97))
  chex.assert_shape(load, (1, 4))  # one MoE block (block 1), four experts
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
  params = variables["params"]
  assert "engram" in params["block_1"] and "engram" not in params["block_0"]
  assert "ffn" in params["block_0"] and "moe" in params["block_1"]
  assert "expert_bias" in variables["balance"]["block_1"]["moe"]


def test_causal_in_tokens_and_rows(tiny_cfg):
  model, variables, tokens, rows = _setup(tiny_cfg)
  t = 6
  g_rows = jax.grad(lambda r: model.apply(variables, tokens, {1: r})[0][:, t].sum())(rows[1])
  assert np.all(np.asarray(g_rows[:, t + 1 :]) == 0)
  assert np.any(np.asarray(g_rows[:, : t + 1]) != 0)
  # Changing a future token leaves the logits at t unchanged.
  future = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 97)
  np.testing.assert_array_equal(
    model.apply(variables, tokens, rows)[0][:, : t + 1],
    model.apply(variables, future, rows)[0][:, : t + 1],
  )


def test_engram_changes_the_output(tiny_cfg):
  model, variables, tokens, rows = _setup(tiny_cfg)
  a = model.apply(variables, tokens, rows)[0]
  b = model.apply(variables, tokens, {1: rows[1] * 2.0})[0]
  assert not np.allclose(a, b)


def test_missing_rows_and_bad_tokens(tiny_cfg):
  model, variables, tokens, rows = _setup(tiny_cfg)
  with pytest.raises(ValueError, match="missing"):
    model.apply(variables, tokens, {})
  with pytest.raises(ValueError, match=r"tokens: expected \[B, T\]"):
    model.apply(variables, tokens[0], rows)


def test_single_stream_dense_model_without_engram():
  cfg = dataclasses.replace(presets.tiny().model, vocab_size=50, streams=1, moe=None, engram=None)
  model, variables, tokens, _ = _setup(cfg)
  logits, load = model.apply(variables, tokens)
  chex.assert_shape(logits, (B, T, 50))
  assert load.shape == (0, 0)
  assert "hc_attn" not in variables["params"]["block_0"]


def test_bfloat16_compute(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
  model, variables, tokens, rows = _setup(cfg)
  logits, _ = model.apply(variables, tokens, rows)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
