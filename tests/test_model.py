"""Tests for engram_jax/model.py: block layout, causality, Engram wiring."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import presets
from engram_jax.model import EngramLM, init_decode_cache, scan_groups, stack_blocks, unstack_blocks

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
  # Jitted: op-by-op execution of the model takes many times longer on CPU.
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed), tokens, rows))
  return model, variables, tokens, rows


@pytest.fixture(scope="module")
def tiny_cfg():
  return dataclasses.replace(presets.tiny().model, vocab_size=97)


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
  """(model, variables, tokens, rows, jitted apply), shared: compiling dominates these tests."""
  return (*_setup(tiny_cfg), jax.jit(EngramLM(tiny_cfg).apply))


def test_shapes_and_layout(tiny):
  _, variables, tokens, rows, apply = tiny
  logits, load = apply(variables, tokens, rows)
  chex.assert_shape(logits, (B, T, 97))
  chex.assert_shape(load, (1, 4))  # one MoE block (block 1), four experts
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
  params = variables["params"]
  assert "engram" in params["block_1"] and "engram" not in params["block_0"]
  assert "ffn" in params["block_0"] and "moe" in params["block_1"]
  assert "expert_bias" in variables["balance"]["block_1"]["moe"]


def test_causal_in_tokens_and_rows(tiny):
  model, variables, tokens, rows, apply = tiny
  t = 6
  g_rows = jax.jit(jax.grad(lambda r: model.apply(variables, tokens, {1: r})[0][:, t].sum()))(
    rows[1]
  )
  assert np.all(np.asarray(g_rows[:, t + 1 :]) == 0)
  assert np.any(np.asarray(g_rows[:, : t + 1]) != 0)
  # Changing a future token leaves the logits at t unchanged.
  future = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 97)
  np.testing.assert_array_equal(
    apply(variables, tokens, rows)[0][:, : t + 1],
    apply(variables, future, rows)[0][:, : t + 1],
  )


def test_engram_changes_the_output(tiny):
  _, variables, tokens, rows, apply = tiny
  a = apply(variables, tokens, rows)[0]
  b = apply(variables, tokens, {1: rows[1] * 2.0})[0]
  assert not np.allclose(a, b)


def test_prefill_then_decode_equals_the_full_forward(tiny_cfg, tiny):
  model, variables, tokens, rows, apply = tiny
  # The Engram convolution starts at zero; give it taps so its decoding state matters.
  variables = jax.tree.map(lambda x: x, variables)  # a copy: the fixture is shared
  params = variables["params"]
  conv = params["block_1"]["engram"]["conv_kernel"]
  params["block_1"]["engram"]["conv_kernel"] = jax.random.normal(jax.random.key(5), conv.shape)
  full, _ = apply(variables, tokens, rows)
  step = jax.jit(
    lambda tok, r, pos, cache: model.apply(variables, tok, r, positions=pos, cache=cache)
  )
  cache = init_decode_cache(tiny_cfg, B, length=16)
  p = 5
  positions = jnp.broadcast_to(jnp.arange(p)[None], (B, p))
  logits, _, cache = step(tokens[:, :p], {1: rows[1][:, :p]}, positions, cache)
  got = [logits]
  for t in range(p, T):
    pos = jnp.full((B, 1), t)
    logits, _, cache = step(tokens[:, t : t + 1], {1: rows[1][:, t : t + 1]}, pos, cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=2e-5, atol=2e-5)
  assert cache[0].conv is None and cache[1].conv.shape == (B, 9, 2 * tiny_cfg.d_model)
  with pytest.raises(ValueError, match="positions"):
    model.apply(variables, tokens, rows, cache=cache)


def test_missing_rows_and_bad_tokens(tiny):
  model, variables, tokens, rows, _ = tiny
  with pytest.raises(ValueError, match="missing"):
    model.apply(variables, tokens, {})
  with pytest.raises(ValueError, match=r"tokens: expected \[B, T\]"):
    model.apply(variables, tokens[0], rows)


def test_single_stream_dense_model_without_engram():
  cfg = dataclasses.replace(presets.tiny().model, vocab_size=50, streams=1, moe=None, engram=None)
  model, variables, tokens, _ = _setup(cfg)
  logits, load = jax.jit(model.apply)(variables, tokens)
  chex.assert_shape(logits, (B, T, 50))
  assert load.shape == (0, 0)
  assert "hc_attn" not in variables["params"]["block_0"]


def test_bfloat16_compute(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
  model, variables, tokens, rows = _setup(cfg)
  logits, _ = jax.jit(model.apply)(variables, tokens, rows)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


def _remat_loss(m, variables, tokens, rows):
  def loss(params, rows):
    logits, _ = m.apply({**variables, "params": params}, tokens, rows, mutable=False)
    return jnp.mean(logits**2)

  return loss


@pytest.fixture(scope="module")
def no_remat_gradients(tiny):
  """The loss and its gradients without rematerialisation, shared by every remat policy."""
  model, variables, tokens, rows, _ = tiny
  loss = _remat_loss(model, variables, tokens, rows)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], rows)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_keeps_params_outputs_and_gradients(tiny_cfg, tiny, no_remat_gradients, policy):
  _, variables, tokens, rows, _ = tiny
  remat = EngramLM(dataclasses.replace(tiny_cfg, remat=policy))
  loss = _remat_loss(remat, variables, tokens, rows)
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], rows)
  # The same parameter tree (checkpoints serve every policy), values and gradients.
  chex.assert_trees_all_close(got, no_remat_gradients, rtol=1e-5, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda p: loss(p, rows))(variables["params"]))
  assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= tiny_cfg.num_layers
  with pytest.raises(ValueError, match="remat"):
    dataclasses.replace(tiny_cfg, remat="some")


def _deep_cfg(tiny_cfg, num_layers=4, num_dense_layers=1):
  """Blocks 0 dense, 1 Engram + MoE, 2.. MoE: blocks 2..num_layers-1 repeat."""
  return dataclasses.replace(tiny_cfg, num_layers=num_layers, num_dense_layers=num_dense_layers)


def test_scan_groups_are_runs_of_one_kind(tiny_cfg):
  scan = lambda **kw: scan_groups(dataclasses.replace(_deep_cfg(tiny_cfg, **kw), scan_layers=True))
  assert scan() == [(2, 4)]
  assert scan(num_layers=6, num_dense_layers=3) == [(3, 6)]  # 0 | 1 Engram | 2 | 3-5
  assert scan(num_layers=3) == []  # 2 stands alone
  assert scan_groups(_deep_cfg(tiny_cfg)) == []  # scan_layers off


def test_scanned_blocks_compute_what_the_unscanned_do(tiny_cfg):
  cfg = _deep_cfg(tiny_cfg)
  model, variables, tokens, rows = _setup(cfg)
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  stacked = stack_blocks(variables, scan_cfg)
  assert stacked["params"]["blocks_2_4"]["attn"]["w_q"].shape[0] == 2
  assert "block_3" not in stacked["params"] and "block_1" in stacked["params"]
  chex.assert_trees_all_equal(unstack_blocks(stacked, scan_cfg), variables)
  # The layers axis is named for the sharding rules.
  boxed = jax.eval_shape(EngramLM(scan_cfg).init, jax.random.key(0), tokens, rows)
  assert nn.get_partition_spec(boxed)["params"]["blocks_2_4"]["attn"]["w_q"][0] == "layers"

  def loss(m, params, v):
    logits, load = m.apply({**v, "params": params}, tokens, rows, mutable=False)
    return jnp.mean(logits**2) + jnp.sum(load), (logits, load)

  grad = lambda m, v: jax.jit(jax.grad(lambda p: loss(m, p, v), has_aux=True))(v["params"])
  (g, (logits, load)), (gs, (logits_s, load_s)) = (
    grad(model, variables),
    grad(EngramLM(scan_cfg), stacked),
  )
  np.testing.assert_allclose(logits_s, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(load_s, load, rtol=1e-6)  # [L_moe, E], in block order
  chex.assert_trees_all_close(unstack_blocks(gs, scan_cfg), g, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="decoding runs unscanned blocks"):
    EngramLM(scan_cfg).apply(
      stacked, tokens, rows, jnp.zeros_like(tokens), init_decode_cache(scan_cfg, B, T)
    )


def test_the_v41_engram_form_in_the_model(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, engram=dataclasses.replace(tiny_cfg.engram, form="v41"))
  assert cfg.engram.resolved_gate_eps == 1e-20 and tiny_cfg.engram.resolved_gate_eps > 1e-8
  model, variables, tokens, rows = _setup(cfg)
  assert set(variables["params"]["block_1"]["engram"]) == {"kv_kernel", "q_weight", "k_weight"}
  full, _ = jax.jit(model.apply)(variables, tokens, rows)
  cache = init_decode_cache(cfg, B, length=16)
  assert cache[1].conv.shape == (B, 0, 2 * cfg.d_model)  # no convolution state
  step = jax.jit(lambda tok, r, pos, c: model.apply(variables, tok, r, positions=pos, cache=c))
  got = []
  for t in range(T):
    logits, _, cache = step(
      tokens[:, t : t + 1], {1: rows[1][:, t : t + 1]}, jnp.full((B, 1), t), cache
    )
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="form: expected one of"):
    dataclasses.replace(cfg.engram, form="v5")
