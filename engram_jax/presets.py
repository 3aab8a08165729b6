"""Named experiment presets: `tiny`, `cpu_small`, `cpu_study` and the paper's configurations.

`tiny` is for tests (seconds). `cpu_small` is the main job: an Engram-MoE model that learns
visibly on 2 CPU cores in a few minutes, built from its MoE baseline `cpu_small_moe` by the
iso-parameter rule of paper §3.1 (`params.iso_param_engram`), so `--compare_baseline` compares
models with equal total and activated parameters. The paper-size presets are meant for
`jax.eval_shape` here (a 27B model does not fit a laptop); their widths follow spec §6, with
multi-head attention standing in for MLA and the expert width chosen so the MoE-27B backbone
comes out at ~27B parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from engram_jax import params as params_lib
from engram_jax.config import (
  EngramConfig,
  ExperimentConfig,
  ModelConfig,
  MoEConfig,
  OptimConfig,
  TrainConfig,
  engram_27b_memory,
  engram_40b_memory,
)

# DeepSeek-V3's tokenizer; replaced by the actual tokenizer's size when training.
_PAPER_VOCAB = 129_280
_PAPER_TRAIN = TrainConfig(
  steps=50_000,
  batch_size=1280,
  seq_len=4096,
  eval_every=1000,
  checkpoint_every=1000,
  log_every=10,
  eval_batches=64,
)
_PAPER_OPTIM = OptimConfig(lr=4e-4, warmup_steps=2000)


def tiny() -> ExperimentConfig:
  """Two blocks (dense, then MoE with Engram), M = 2 streams: for tests."""
  model = ModelConfig(
    vocab_size=8192,
    d_model=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    ffn_hidden=64,
    num_dense_layers=1,
    moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_hidden=32),
    engram=EngramConfig(
      max_ngram_size=3,
      heads_per_ngram=2,
      embed_per_ngram=32,
      table_bases=(1009, 503),
      layer_ids=(1,),
      pad_token_id=0,
    ),
    streams=2,
  )
  return ExperimentConfig(
    "tiny",
    model,
    OptimConfig(lr=3e-3, warmup_steps=2),
    TrainConfig(
      steps=6,
      batch_size=2,
      seq_len=32,
      eval_every=3,
      eval_batches=2,
      log_every=1,
      checkpoint_every=3,
    ),
  )


def cpu_small_moe() -> ExperimentConfig:
  """The MoE baseline of the main job: 4 blocks, D = 128, 16 routed experts (top-2) + 1
  shared, mHC with M = 4."""
  model = ModelConfig(
    vocab_size=8192,
    d_model=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=32,
    ffn_hidden=384,
    num_dense_layers=1,
    moe=MoEConfig(num_experts=16, num_shared=1, top_k=2, expert_hidden=128, balance_rate=1e-2),
    streams=4,
  )
  return ExperimentConfig(
    "cpu_small_moe",
    model,
    OptimConfig(lr=3e-3, warmup_steps=60),
    TrainConfig(
      steps=600,
      batch_size=16,
      seq_len=64,
      eval_every=100,
      eval_batches=32,
      log_every=10,
      checkpoint_every=100,
    ),
  )


def cpu_small_memory() -> EngramConfig:
  """The main job's Engram: N = 3, K = 4 heads per order, 16-wide rows, at block 1 (0-based;
  the paper's best single layer, block 2 counting from 1). Table bases are set by the
  iso-parameter rule."""
  return EngramConfig(
    max_ngram_size=3,
    heads_per_ngram=4,
    embed_per_ngram=64,
    table_bases=(2, 2),
    layer_ids=(1,),
    kernel_size=4,
    pad_token_id=0,
  )


def cpu_small(rho: float = 0.75) -> ExperimentConfig:
  """The main job: `cpu_small_moe` with (1 - rho) of its routed-expert budget moved into
  Engram tables (paper §3.1; its optimum is near rho = 0.75-0.8)."""
  base = cpu_small_moe()
  model = params_lib.iso_param_engram(base.model, rho, cpu_small_memory())
  return dataclasses.replace(base, name="cpu_small", model=model)


def cpu_study() -> ExperimentConfig:
  """The studies' preset (experiments/allocation.py, ...): `cpu_small`'s model and data at 150
  steps (warm-up 15, one evaluation at the end, a checkpoint every 50 steps), about 1.5 minutes
  a run on 2 CPU cores, so a study of ~20 runs finishes in about half an hour."""
  exp = cpu_small()
  train = dataclasses.replace(exp.train, steps=150, eval_every=150, checkpoint_every=50)
  optim = dataclasses.replace(exp.optim, warmup_steps=15)
  return dataclasses.replace(exp, name="cpu_study", train=train, optim=optim)


def dense_4b() -> ExperimentConfig:
  """A ~4B dense model of the paper's inference study (§6.4): 30 blocks, D = 2560."""
  model = ModelConfig(
    vocab_size=_PAPER_VOCAB,
    d_model=2560,
    num_layers=30,
    num_heads=32,
    num_kv_heads=32,
    head_dim=80,
    ffn_hidden=10_240,
    num_dense_layers=30,
    streams=1,
  )
  return ExperimentConfig("dense_4b", model, _PAPER_OPTIM, _PAPER_TRAIN)


def _paper_moe(num_experts: int, engram: EngramConfig | None) -> ModelConfig:
  return ModelConfig(
    vocab_size=_PAPER_VOCAB,
    d_model=2560,
    num_layers=30,
    num_heads=32,
    num_kv_heads=32,
    head_dim=80,
    ffn_hidden=10_240,
    num_dense_layers=1,
    moe=MoEConfig(num_experts=num_experts, num_shared=2, top_k=6, expert_hidden=1536),
    engram=engram,
    streams=4,
  )


def moe_27b() -> ExperimentConfig:
  """MoE-27B: 2 shared + 72 routed experts (top-6), mHC M = 4, one leading dense block."""
  return ExperimentConfig("moe_27b", _paper_moe(72, None), _PAPER_OPTIM, _PAPER_TRAIN)


def engram_27b() -> ExperimentConfig:
  """Engram-27B: MoE-27B with 55 routed experts and 5.7B of Engram at blocks 2 and 15."""
  return ExperimentConfig(
    "engram_27b", _paper_moe(55, engram_27b_memory()), _PAPER_OPTIM, _PAPER_TRAIN
  )


def engram_40b() -> ExperimentConfig:
  """Engram-40B: the Engram-27B backbone with 18.5B of Engram (7,239,680 rows per head)."""
  return ExperimentConfig(
    "engram_40b", _paper_moe(55, engram_40b_memory()), _PAPER_OPTIM, _PAPER_TRAIN
  )


def ablation_12l() -> ExperimentConfig:
  """The ablation setup of §6.2: a 12-block ~3B MoE with 1.6B of Engram at blocks 2 and 6
  (1-based; 1 and 5 here)."""
  engram = EngramConfig(
    max_ngram_size=3,
    heads_per_ngram=8,
    embed_per_ngram=640,
    table_bases=(625_000, 625_000),
    layer_ids=(1, 5),
    pad_token_id=2,
  )
  model = ModelConfig(
    vocab_size=_PAPER_VOCAB,
    d_model=1536,
    num_layers=12,
    num_heads=12,
    num_kv_heads=12,
    head_dim=128,
    ffn_hidden=6144,
    num_dense_layers=1,
    moe=MoEConfig(num_experts=64, num_shared=2, top_k=6, expert_hidden=768),
    engram=engram,
    streams=4,
  )
  return ExperimentConfig("ablation_12l", model, _PAPER_OPTIM, _PAPER_TRAIN)


def v41_flash_engram():
  """The released DeepSeek-V4.1-Flash Engram settings (`interop.v41.V41Config`; an inference
  configuration, not a training experiment, so not in `PRESETS`)."""
  from engram_jax.interop.v41 import v41_flash_engram as released

  return released()


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
  "tiny": tiny,
  "cpu_small": cpu_small,
  "cpu_small_moe": cpu_small_moe,
  "cpu_study": cpu_study,
  "dense_4b": dense_4b,
  "moe_27b": moe_27b,
  "engram_27b": engram_27b,
  "engram_40b": engram_40b,
  "ablation_12l": ablation_12l,
}


def get(name: str) -> ExperimentConfig:
  """The preset called `name`.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in PRESETS:
    raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
  return PRESETS[name]()


def baseline_of(exp: ExperimentConfig) -> ExperimentConfig:
  """The iso-parameter MoE baseline of an Engram experiment.

  The Engram parameters (tables and the modules' own projections) go back into routed experts
  (rounded to whole experts); data, steps, seed and learning-rate schedule stay the same.

  Raises:
    ValueError: `exp` has no Engram or no MoE.
  """
  model = exp.model
  if model.engram is None or model.moe is None:
    raise ValueError(f"{exp.name}: expected an Engram-MoE model to build a baseline for")
  counts = params_lib.count_params(model)
  per_expert = counts.routed_experts / model.moe.num_experts
  extra = round((counts.engram_tables + counts.engram_dense) / per_expert)
  moe = dataclasses.replace(model.moe, num_experts=model.moe.num_experts + extra)
  base = dataclasses.replace(model, engram=None, moe=moe)
  return dataclasses.replace(exp, name=f"{exp.name}_baseline", model=base)
