"""Tests for engram_jax/train/optimizer.py: Muon + AdamW for the backbone and the schedules."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax.config import EngramConfig, ModelConfig, MoEConfig, OptimConfig
from engram_jax.model import EngramLM
from engram_jax.train import optimizer as opt

_MEMORY = EngramConfig(
  max_ngram_size=3,
  heads_per_ngram=2,
  embed_per_ngram=16,
  table_bases=(211, 101),
  layer_ids=(0,),
  kernel_size=3,
  pad_token_id=0,
)
# Block 0: Engram + dense FFN; block 1: MoE with a shared expert; four mHC streams.
_MODEL = ModelConfig(
  vocab_size=64,
  d_model=16,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  ffn_hidden=24,
  num_dense_layers=1,
  moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_hidden=8),
  engram=_MEMORY,
  streams=4,
)
_B, _T = 2, 6


def _flat(tree, is_leaf=None) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def _param_shapes():
  """The tiny model's "params" as shape structs (traced, never run)."""
  e = _MEMORY
  tokens = jax.ShapeDtypeStruct((_B, _T), jnp.int32)
  rows = {0: jax.ShapeDtypeStruct((_B, _T, e.num_heads, e.head_dim), jnp.float32)}
  variables = jax.eval_shape(EngramLM(_MODEL).init, jax.random.key(0), tokens, rows)
  return nn.unbox(variables["params"])


def _random_like(shapes, seed):
  # NumPy draws: one jax.random call per shape would compile once per shape.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), shapes)


# --- schedules ------------------------------------------------------------------------------


def test_learning_rate_schedule():
  cfg = OptimConfig(lr=2.0, warmup_steps=10, decay_points=(0.8, 0.9), decay_factor=0.316)
  sched = opt.learning_rate_schedule(cfg, total_steps=100)
  expected = {
    0: 0.0,
    5: 1.0,
    10: 2.0,
    50: 2.0,
    79: 2.0,  # warm-up, plateau
    80: 2.0 * 0.316,
    89: 2.0 * 0.316,  # after 80%
    90: 2.0 * 0.316**2,
    99: 2.0 * 0.316**2,  # after 90%
  }
  for step, lr in expected.items():
    np.testing.assert_allclose(sched(step), lr, rtol=1e-6, err_msg=f"step {step}")
  np.testing.assert_allclose(jax.jit(sched)(jnp.int32(85)), 2.0 * 0.316, rtol=1e-6)
  np.testing.assert_allclose(opt.table_lr(cfg, 100)(50), 2.0 * cfg.engram_lr_mult, rtol=1e-6)
  no_warmup = opt.learning_rate_schedule(dataclasses.replace(cfg, warmup_steps=0), 100)
  np.testing.assert_allclose(no_warmup(0), 2.0, rtol=1e-6)


# --- labels ---------------------------------------------------------------------------------

_MUON_PATHS = {
  f"block_{i}/{name}"
  for i in (0, 1)
  for name in (
    "attn/w_q",
    "attn/w_k",
    "attn/w_v",
    "attn/w_o",
    "hc_attn/proj/kernel",
    "hc_ffn/proj/kernel",
  )
} | {
  "block_0/engram/kv_kernel",
  "block_0/ffn/w_gate",
  "block_0/ffn/w_up",
  "block_0/ffn/w_down",
  "block_1/moe/router",
  "block_1/moe/w_gate",
  "block_1/moe/w_up",
  "block_1/moe/w_down",
  "block_1/moe/shared/w_gate",
  "block_1/moe/shared/w_up",
  "block_1/moe/shared/w_down",
}
_ADAMW_PATHS = (
  {
    "embedding",
    "lm_head",
    "final_norm/scale",
    "block_0/engram/kv_bias",
    "block_0/engram/key_norm",
    "block_0/engram/query_norm",
    "block_0/engram/conv_norm",
    "block_0/engram/conv_kernel",
  }
  | {f"block_{i}/{name}" for i in (0, 1) for name in ("attn_norm/scale", "ffn_norm/scale")}
  | {
    f"block_{i}/{hc}/{name}"
    for i in (0, 1)
    for hc in ("hc_attn", "hc_ffn")
    for name in ("b_pre", "b_post", "b_res", "alpha_pre", "alpha_post", "alpha_res")
  }
)


def test_param_labels():
  params = _param_shapes()
  labels = _flat(opt.param_labels(params))
  assert set(labels) == _MUON_PATHS | _ADAMW_PATHS
  assert {p for p, lab in labels.items() if lab == opt.MUON} == _MUON_PATHS
  assert {p for p, lab in labels.items() if lab == opt.ADAMW} == _ADAMW_PATHS
  assert set(_flat(opt.param_labels(params, use_muon=False)).values()) == {opt.ADAMW}
  decayed = {p for p, d in _flat(opt.weight_decay_mask(params)).items() if d}
  assert decayed == _MUON_PATHS | {"lm_head"}


def test_muon_sees_stacked_weights_as_matrices():
  params = _param_shapes()
  dims = _flat(
    opt.muon_dimension_numbers(params),
    is_leaf=lambda x: isinstance(x, optax.contrib.MuonDimensionNumbers),
  )
  d, q, da, m = _MODEL.d_model, _MODEL.num_heads, _MODEL.head_dim, _MODEL.streams
  # (batch, rows, cols) after Muon's reshape.
  expected = {
    "block_0/attn/w_q": (1, d, q * da),
    "block_0/attn/w_o": (1, q * da, d),
    "block_0/engram/kv_kernel": (m + 1, _MEMORY.memory_dim, d),
    "block_1/moe/w_up": (4, d, 8),
    "block_1/moe/w_down": (4, 8, d),
    "block_1/moe/router": (1, d, 4),
    "block_1/moe/shared/w_down": (1, 8, d),
  }
  flat_params = _flat(params)
  for path, shape in expected.items():
    x, dim = flat_params[path], dims[path]
    red = np.atleast_1d(dim.reduction_axis)
    out = np.atleast_1d(dim.output_axis)
    rows = np.prod([x.shape[a] for a in red])
    cols = np.prod([x.shape[a] for a in out])
    assert (x.size // (rows * cols), rows, cols) == shape, path
  assert "embedding" not in dims and "block_0/engram/conv_kernel" not in dims


# --- backbone step --------------------------------------------------------------------------


@pytest.mark.parametrize("use_muon", [True, False])
def test_backbone_step(use_muon):
  lr, wd = 0.01, 0.1
  cfg = OptimConfig(lr=lr, warmup_steps=0, weight_decay=wd, use_muon=use_muon, grad_clip=1.0)
  # The optimizer only sees arrays of the model's shapes: random ones keep the test fast.
  shapes = _param_shapes()
  params, grads = _random_like(shapes, 0), _random_like(shapes, 1)
  tx = opt.backbone_optimizer(cfg, 100, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  flat_new, flat_old, flat_up = _flat(new), _flat(params), _flat(updates)
  for path in _MUON_PATHS:
    assert not np.array_equal(flat_new[path], flat_old[path]), path

  # Clipped to global norm 1, then the first AdamW step: -lr * (g / (|g| + eps) + wd * w),
  # weight decay on the matrices only.
  clip = min(1.0, 1.0 / float(optax.tree.norm(grads)))
  flat_g = {p: clip * np.asarray(g) for p, g in _flat(grads).items()}

  def adamw(path, decay):
    g = flat_g[path]
    return -lr * (g / (np.abs(g) + cfg.adam_eps) + decay * wd * np.asarray(flat_old[path]))

  for path, decay in (
    ("final_norm/scale", 0),
    ("embedding", 0),
    ("lm_head", 1),
    ("block_0/engram/conv_kernel", 0),
  ):
    np.testing.assert_allclose(flat_up[path], adamw(path, decay), rtol=1e-5, atol=1e-9)
  if not use_muon:
    np.testing.assert_allclose(
      flat_up["block_0/ffn/w_gate"], adamw("block_0/ffn/w_gate", 1), rtol=1e-5, atol=1e-9
    )
    return
  # Muon: every matrix update (less decoupled weight decay) is orthogonalised, its singular
  # values near lr * 0.2 * sqrt(max(rows, cols)); Newton-Schulz leaves them within roughly
  # [0.7, 1.2] of that. Stacked weights: [batch, rows, cols] as Muon sees them.
  d, q, da = _MODEL.d_model, _MODEL.num_heads, _MODEL.head_dim
  as_matrices = {
    "block_0/ffn/w_gate": lambda x: x[None],
    "block_0/attn/w_q": lambda x: x.reshape(1, d, q * da),
    "block_0/attn/w_o": lambda x: x.reshape(1, q * da, d),
    "block_1/moe/w_up": lambda x: x,
    "block_0/engram/kv_kernel": lambda x: x.transpose(1, 0, 2),
  }
  for path, reshape in as_matrices.items():
    u = reshape(np.asarray(flat_up[path]) + lr * wd * np.asarray(flat_old[path]))
    scale = lr * 0.2 * np.sqrt(max(u.shape[1:]))
    sv = np.linalg.svd(u, compute_uv=False)
    assert 0.5 * scale < sv.min() and sv.max() < 1.5 * scale, (path, sv / scale)


# --- sparse table Adam ----------------------------------------------------------------------


def test_scanned_blocks_matrices_stay_muon_matrices():
  params = {
    "blocks_2_4": {"attn": {"w_q": np.zeros((2, 8, 2, 4)), "w_o": np.zeros((2, 2, 4, 8))}},
    "block_1": {"attn": {"w_q": np.zeros((8, 2, 4))}, "attn_norm": {"scale": np.zeros(8)}},
  }
  labels = opt.param_labels(params)
  assert labels["blocks_2_4"]["attn"] == {"w_q": opt.MUON, "w_o": opt.MUON}
  assert labels["block_1"] == {"attn": {"w_q": opt.MUON}, "attn_norm": {"scale": opt.ADAMW}}
  dims = opt.muon_dimension_numbers(params)
  assert dims["blocks_2_4"]["attn"]["w_o"].reduction_axis == (1, 2)  # the layers axis: a batch
