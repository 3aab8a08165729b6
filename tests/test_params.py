"""Tests for engram_jax/params.py."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from engram_jax import params as params_lib
from engram_jax.config import EngramConfig, ModelConfig, MoEConfig, engram_27b_memory
from engram_jax.hashing import table_sizes_for_layers
from engram_jax.memory.table import TableLayout
from engram_jax.model import EngramLM

_MEMORY = EngramConfig(
  max_ngram_size=3,
  heads_per_ngram=2,
  embed_per_ngram=16,
  table_bases=(211, 101),
  layer_ids=(1, 2),
  kernel_size=3,
  pad_token_id=0,
)
_DENSE = ModelConfig(
  vocab_size=97,
  d_model=32,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  ffn_hidden=48,
)
_MOE = dataclasses.replace(
  _DENSE, moe=MoEConfig(num_experts=8, num_shared=1, top_k=2, expert_hidden=24)
)
CONFIGS = {
  "dense": _DENSE,
  "moe": _MOE,
  "engram_moe_m1": dataclasses.replace(_MOE, engram=_MEMORY),
  "engram_moe_m4": dataclasses.replace(_MOE, engram=_MEMORY, streams=4),
}


def _paper_moe() -> ModelConfig:
  """A MoE-27B-like model (spec §6); only ever counted, never allocated."""
  return ModelConfig(
    vocab_size=129_280,
    d_model=2560,
    num_layers=30,
    num_heads=32,
    num_kv_heads=32,
    head_dim=80,
    ffn_hidden=12_288,
    num_dense_layers=1,
    moe=MoEConfig(num_experts=72, num_shared=2, top_k=6, expert_hidden=1536),
    streams=4,
  )


def _real_params(cfg: ModelConfig) -> dict:
  """{path: size} of the "params" of EngramLM(cfg), from shapes only."""
  b, t = 2, 5
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  rows = {}
  if cfg.engram is not None:
    e = cfg.engram
    rows = {
      i: jax.ShapeDtypeStruct((b, t, e.num_heads, e.head_dim), jnp.float32) for i in e.layer_ids
    }
  variables = jax.eval_shape(EngramLM(cfg).init, jax.random.key(0), tokens, rows)
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(variables["params"]))[0]
  return {"/".join(k.key for k in path): leaf.size for path, leaf in flat}


def _real_tables(cfg: ModelConfig) -> int:
  if cfg.engram is None:
    return 0
  e = cfg.engram
  sizes = table_sizes_for_layers(e.table_bases, e.heads_per_ngram, e.layer_ids)
  return sum(TableLayout.from_sizes(s, e.head_dim).num_params for s in sizes.values())


def _sum(sizes: dict, pred) -> int:
  return sum(n for path, n in sizes.items() if pred(path))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counts_match_the_real_parameter_tree(name):
  cfg = CONFIGS[name]
  sizes = _real_params(cfg)
  counts = params_lib.count_params(cfg)
  tables = _real_tables(cfg)
  assert counts.total == sum(sizes.values()) + tables
  assert counts.embedding == sizes["embedding"] == cfg.vocab_size * cfg.d_model
  assert counts.lm_head == sizes["lm_head"]
  assert counts.engram_tables == tables
  assert counts.engram_dense == _sum(sizes, lambda p: "/engram/" in p)
  routed = _sum(sizes, lambda p: "/moe/w_" in p)
  assert counts.routed_experts == routed
  assert counts.p_tot == counts.total - sizes["embedding"] - sizes["lm_head"]
  # Activated: every backbone param except the unused share of the routed experts, plus the
  # rows read (H * Dh per Engram layer).
  unused = routed * (cfg.moe.num_experts - cfg.moe.top_k) // cfg.moe.num_experts if cfg.moe else 0
  rows_read = cfg.engram.memory_dim * len(cfg.engram.layer_ids) if cfg.engram else 0
  assert counts.engram_rows_read == rows_read
  assert counts.p_act == counts.p_tot - tables - unused + rows_read
  assert counts.p_sparse == counts.p_tot - counts.p_act
  if name != "dense":
    assert counts.p_sparse > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flops_per_token(name):
  cfg, seq_len = CONFIGS[name], 7
  sizes = _real_params(cfg)
  attention = {"w_q", "w_k", "w_v", "w_o"}
  matmul_names = attention | {"w_gate", "w_up", "w_down", "router", "kernel", "lm_head"}
  matmul_names |= {"kv_kernel", "conv_kernel"}  # Engram's projection and conv taps

  def weight(path):
    if path.split("/")[-1] not in matmul_names:
      return 0
    if "/moe/w_" in path:  # a token runs top_k of the E routed experts
      return sizes[path] * cfg.moe.top_k // cfg.moe.num_experts
    return sizes[path]

  matmul = sum(weight(p) for p in sizes)
  # Causal: position t attends t + 1 keys; scores and values each 2 * Q * Da per key.
  keys = sum(t + 1 for t in range(seq_len)) / seq_len
  scores_values = cfg.num_layers * 2 * (2 * cfg.num_heads * cfg.head_dim * keys)
  got = params_lib.count_params(cfg, seq_len).flops_per_token
  assert got == 2 * matmul + scores_values
  assert params_lib.count_params(cfg, 2 * seq_len).flops_per_token > got


def test_rho_one_returns_the_moe_config():
  assert params_lib.iso_param_engram(_MOE, 1.0, _MEMORY) is _MOE
  assert params_lib.iso_param_engram(_MOE, 1, _MEMORY) is _MOE


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.01, float("nan"), True, "0.5"])
def test_invalid_rho_names_rho(rho):
  with pytest.raises(ValueError, match="rho"):
    params_lib.iso_param_engram(_MOE, rho, _MEMORY)


def test_config_with_engram_or_without_moe_is_rejected():
  with pytest.raises(ValueError, match="engram"):
    params_lib.iso_param_engram(CONFIGS["engram_moe_m1"], 0.5, _MEMORY)
  with pytest.raises(ValueError, match="moe"):
    params_lib.iso_param_engram(_DENSE, 0.5, _MEMORY)


def test_rho_too_close_to_one_to_fund_engram():
  # 0.95 keeps all 6 unused experts of every layer: nothing is freed.
  with pytest.raises(ValueError, match="rho"):
    params_lib.iso_param_engram(_MOE, 0.95, _MEMORY)


def _small_moe() -> ModelConfig:
  return ModelConfig(
    vocab_size=512,
    d_model=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=16,
    ffn_hidden=128,
    num_dense_layers=1,
    moe=MoEConfig(num_experts=32, num_shared=1, top_k=4, expert_hidden=64),
    streams=4,
  )


@pytest.mark.parametrize(
  "moe_cfg, engram",
  [
    (_small_moe(), dataclasses.replace(_MEMORY, layer_ids=(1, 2))),
    (_paper_moe(), engram_27b_memory()),
  ],
  ids=["small", "paper"],
)
@pytest.mark.parametrize("rho", [0.9, 0.75, 0.5])
def test_iso_param(moe_cfg, engram, rho):
  cfg = params_lib.iso_param_engram(moe_cfg, rho, engram)
  moe, new = params_lib.count_params(moe_cfg), params_lib.count_params(cfg)
  e, e_new = moe_cfg.moe.num_experts, cfg.moe.num_experts
  top_k = moe_cfg.moe.top_k
  assert e_new == top_k + round(rho * (e - top_k)) < e
  assert cfg.moe.top_k == top_k and cfg.moe.expert_hidden == moe_cfg.moe.expert_hidden
  assert cfg.engram.layer_ids == engram.layer_ids
  assert cfg.engram.head_dim == engram.head_dim
  assert len(set(cfg.engram.table_bases)) == 1
  assert dataclasses.replace(cfg, moe=moe_cfg.moe, engram=None) == moe_cfg
  # Routed experts keep about rho of the unused-expert budget P_sparse(moe).
  kept = (e_new - top_k) / (e - top_k)
  assert abs(kept - rho) <= 0.5 / (e - top_k)
  assert abs(new.p_tot - moe.p_tot) <= 0.005 * moe.p_tot
  # The largest equal base that fits: one more and P_tot would exceed the MoE's.
  assert new.p_tot <= moe.p_tot
  bigger = tuple(b + 1 for b in cfg.engram.table_bases)
  over = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, table_bases=bigger))
  assert params_lib.count_params(over).p_tot > moe.p_tot
  moe_layers = sum(moe_cfg.is_moe_layer(i) for i in range(moe_cfg.num_layers))
  router_shrink = moe_cfg.d_model * (e - e_new) * moe_layers
  assert new.p_act - moe.p_act == new.engram_dense + new.engram_rows_read - router_shrink
  assert new.engram_rows_read == len(engram.layer_ids) * engram.memory_dim
  if moe_cfg.d_model == 2560:
    # At the paper's size that difference is below 1%: P_act equal to the paper's precision
    # (it reports 3.8B activated for both MoE-27B and Engram-27B).
    assert abs(new.p_act - moe.p_act) < 0.01 * moe.p_act


def test_paper_size_allocation_matches_engram_27b():
  """72 -> 55 experts (rho = 49/66) frees about the Engram-27B table: 2,262,400 rows a head."""
  cfg = params_lib.iso_param_engram(_paper_moe(), 49 / 66, engram_27b_memory())
  counts = params_lib.count_params(cfg)
  assert cfg.moe.num_experts == 55
  assert math.isclose(cfg.engram.table_bases[0], 2_262_400, rel_tol=0.01)
  assert math.isclose(counts.engram_tables, 5.7e9, rel_tol=0.03)
  assert math.isclose(counts.total, 27e9 + 2 * counts.embedding, rel_tol=0.1)
