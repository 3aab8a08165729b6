"""Tests for engram_jax/presets.py: every preset builds; paper sizes via jax.eval_shape only."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from engram_jax import params, presets
from engram_jax.config import ExperimentConfig, ModelConfig, TrainConfig
from engram_jax.model import EngramLM


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_builds_without_allocating(name):
  exp = presets.get(name)
  cfg = exp.model
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  rows = (
    {}
    if cfg.engram is None
    else {
      layer: jax.ShapeDtypeStruct((1, 16, cfg.engram.num_heads, cfg.engram.head_dim), jnp.float32)
      for layer in cfg.engram.layer_ids
    }
  )
  variables = jax.eval_shape(EngramLM(cfg).init, jax.random.key(0), tokens, rows)
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  counts = params.count_params(cfg)
  assert n == counts.total - counts.engram_tables


def test_paper_sizes():
  moe, eng27, eng40 = (
    params.count_params(presets.get(n).model) for n in ("moe_27b", "engram_27b", "engram_40b")
  )
  assert 26e9 < moe.total < 28.5e9
  assert abs(eng27.engram_tables - 5.792e9) / 5.792e9 < 1e-3
  assert abs(eng40.engram_tables - 18.534e9) / 18.534e9 < 1e-3
  # Engram-27B moves 17 of 72 experts' parameters into the tables: about iso-parameter.
  assert abs(eng27.total - moe.total) / moe.total < 0.01
  dense = params.count_params(presets.get("dense_4b").model)
  assert 3.5e9 < dense.total < 4.5e9
  ablation = params.count_params(presets.get("ablation_12l").model)
  assert abs(ablation.engram_tables - 1.6e9) / 1.6e9 < 0.01


def test_cpu_small_is_iso_parameter_with_its_baseline():
  exp = presets.get("cpu_small")
  base = presets.baseline_of(exp)
  assert base.model.engram is None and base.train == exp.train and base.optim == exp.optim
  assert base.model.moe == presets.cpu_small_moe().model.moe
  a, b = params.count_params(exp.model), params.count_params(base.model)
  assert abs(a.p_tot - b.p_tot) / b.p_tot < 0.01
  assert a.engram_tables > 0 and exp.model.engram.layer_ids == (1,)


def test_unknown_preset_and_impossible_configs():
  with pytest.raises(ValueError, match="preset: expected one of"):
    presets.get("gpt5")
  exp = presets.tiny()
  with pytest.raises(ValueError, match=r"engram\.layer_ids"):
    dataclasses.replace(exp.model, num_layers=1)
  with pytest.raises(ValueError, match="seq_len"):
    dataclasses.replace(exp, train=dataclasses.replace(exp.train, seq_len=2))
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="steps"):
    TrainConfig(steps=0)
  with pytest.raises(ValueError, match=r"expected an Engram-MoE model"):
    presets.baseline_of(ExperimentConfig("x", ModelConfig()))
