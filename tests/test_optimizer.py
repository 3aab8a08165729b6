"""Tests for engram_jax/train/optimizer.py."""

import dataclasses

import chex
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

_R, _DH = 40, 4
_CFG = OptimConfig(adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8)


def _dense_adam(table, mu, nu, count, ids, grads, lr):
  """Adam written out in NumPy on the rows in `ids` (duplicates summed first)."""
  table, mu, nu = (np.array(x, np.float32) for x in (table, mu, nu))
  g = np.zeros_like(table)
  np.add.at(g, np.asarray(ids), np.asarray(grads, np.float32))
  touched = np.unique(np.asarray(ids))
  b1, b2 = _CFG.adam_b1, _CFG.adam_b2
  t = count + 1
  mu[touched] = b1 * mu[touched] + (1 - b1) * g[touched]
  nu[touched] = b2 * nu[touched] + (1 - b2) * g[touched] ** 2
  step = lr * (mu[touched] / (1 - b1**t)) / (np.sqrt(nu[touched] / (1 - b2**t)) + _CFG.adam_eps)
  table[touched] -= step
  return table, mu, nu, touched


class SparseAdamTest(chex.TestCase):
  def _check(self, update, dtype, atol):
    key = jax.random.key(3)
    table = jax.random.normal(key, (_R, _DH)).astype(dtype)
    state = opt.init_table_state(table)
    chex.assert_trees_all_equal_dtypes(state.mu, state.nu, jnp.zeros((), jnp.float32))
    # Two steps with different, repeated ids: the second decays only the rows it touches and
    # bias-corrects with the global count.
    steps = [
      (np.array([3, 7, 3, 39, 0, 7, 3, 12], np.int32), 0.1),
      (np.array([7, 5, 5, 20, 7, 0, 31, 31], np.int32), 0.05),
    ]
    for i, (ids, lr) in enumerate(steps):
      grads = jax.random.normal(jax.random.fold_in(key, i), (len(ids), _DH))
      want_t, want_mu, want_nu, touched = _dense_adam(table, state.mu, state.nu, i, ids, grads, lr)
      new_table, new_state = update(table, state, jnp.asarray(ids), grads, lr)
      assert new_table.dtype == dtype and new_state.count == i + 1
      chex.assert_trees_all_equal_dtypes(new_state.mu, new_state.nu, jnp.zeros((), jnp.float32))
      untouched = np.setdiff1d(np.arange(_R), touched)
      for new, old in ((new_table, table), (new_state.mu, state.mu), (new_state.nu, state.nu)):
        np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(old)[untouched])
      np.testing.assert_allclose(new_state.mu[touched], want_mu[touched], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(new_state.nu[touched], want_nu[touched], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(
        np.asarray(new_table.astype(jnp.float32))[touched], want_t[touched], atol=atol
      )
      table, state = new_table, new_state

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_dense_adam_on_touched_rows_only(self):
    update = self.variant(lambda *args: opt.sparse_adam_update(*args, _CFG))
    self._check(update, jnp.float32, atol=1e-6)

  def test_bfloat16_table(self):
    update = jax.jit(lambda *args: opt.sparse_adam_update(*args, _CFG))
    # bfloat16 keeps 8 significant bits: a row value below 4 in magnitude rounds by at most
    # 2**-7 when stored back.
    self._check(update, jnp.bfloat16, atol=2.0**-6)

  def test_repeated_ids_sum_their_gradients(self):
    table = jnp.zeros((_R, _DH))
    state = opt.init_table_state(table)
    ids = jnp.array([9, 9, 9], jnp.int32)
    grads = jnp.array([[1.0, -1.0, 0.5, 0.0]] * 3)
    _, new_state = opt.sparse_adam_update(table, state, ids, grads, 0.1, _CFG)
    np.testing.assert_allclose(new_state.mu[9], (1 - _CFG.adam_b1) * 3 * grads[0], rtol=1e-6)
    assert np.count_nonzero(np.asarray(new_state.mu)) == 3

  def test_rejects_mismatched_grads(self):
    table = jnp.zeros((_R, _DH))
    with pytest.raises(ValueError, match="row_grads"):
      opt.sparse_adam_update(
        table,
        opt.init_table_state(table),
        jnp.zeros((3,), jnp.int32),
        jnp.zeros((3, _DH + 1)),
        0.1,
        _CFG,
      )
