"""The model's configuration: Engram, MoE and the transformer around them.

Every config is a frozen dataclass that checks its invariants in `__post_init__` and raises
`ValueError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from engram_jax.config.checks import check as _check

MOE_DISPATCHES = ("auto", "ragged", "blocks")
EXPERT_EXCHANGES = ("all_to_all", "replicated")
ENGRAM_FORMS = ("demo", "v41")
ENGRAM_GATINGS = ("multi", "shared", "none")
V41_GATE_EPS = 1e-20  # DeepSeek-V4.1's `norm_eps`
# What a block keeps for its backward pass: everything ('none'), nothing but its inputs
# ('full': the forward runs again), or the results of matmuls without batch dimensions
# ('dots_saveable', jax's `checkpoint_policies.dots_with_no_batch_dims_saveable`).
REMAT_POLICIES = ("none", "full", "dots_saveable")


def check_engram_args(
  *,
  max_ngram_size: int,
  heads_per_ngram: int,
  table_bases: Sequence[int],
  layer_ids: Sequence[int],
  embed_per_ngram: int | None = None,
) -> None:
  """Validates the arguments shared by `EngramConfig` and `NgramHasher`.

  Raises:
    ValueError: naming the field and what was expected.
  """
  _check(
    isinstance(max_ngram_size, int) and max_ngram_size >= 2,
    "max_ngram_size",
    "an int >= 2 (bigrams at least)",
    max_ngram_size,
  )
  _check(
    isinstance(heads_per_ngram, int) and heads_per_ngram >= 1,
    "heads_per_ngram",
    "an int >= 1",
    heads_per_ngram,
  )
  bases = tuple(table_bases)
  _check(
    len(bases) == max_ngram_size - 1,
    "table_bases",
    f"one base per n-gram order 2..{max_ngram_size} ({max_ngram_size - 1} values)",
    bases,
  )
  for b in bases:
    _check(
      isinstance(b, (int,)) and not isinstance(b, bool) and b >= 2,
      "table_bases",
      "every base an int >= 2",
      bases,
    )
  ids = tuple(layer_ids)
  _check(len(ids) >= 1, "layer_ids", "at least one layer id", ids)
  for i in ids:
    _check(
      isinstance(i, int) and not isinstance(i, bool) and i >= 0,
      "layer_ids",
      "non-negative int layer ids",
      ids,
    )
  _check(len(set(ids)) == len(ids), "layer_ids", "distinct layer ids", ids)
  if embed_per_ngram is not None:
    _check(
      isinstance(embed_per_ngram, int) and embed_per_ngram >= 1,
      "embed_per_ngram",
      "an int >= 1",
      embed_per_ngram,
    )
    _check(
      embed_per_ngram % heads_per_ngram == 0,
      "embed_per_ngram",
      f"a multiple of heads_per_ngram={heads_per_ngram}",
      embed_per_ngram,
    )


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Settings of the Engram memory (paper §2; spec §1-5).

  Attributes:
    max_ngram_size: Ng, the largest n-gram order hashed (orders 2..Ng).
    heads_per_ngram: Hn, hash heads per order.
    embed_per_ngram: width of all Hn heads of one order together; one head row is
      `embed_per_ngram // Hn` wide and the memory vector `(Ng - 1) * embed_per_ngram`.
    table_bases: one base per order (2..Ng); every head's table size is a distinct prime
      above its order's base.
    layer_ids: 0-based indices of the transformer blocks that carry an Engram module.
    kernel_size: taps of the short depthwise causal convolution (dilation = Ng).
    pad_token_id: raw tokenizer id used for positions before the sequence start; the
      hasher receives its compressed id.
    seed: seed of the hash multipliers (layer `l` uses `seed + 10007 * l`).
    form: the layer's form: 'demo' (the paper's demo: short convolution, projection bias,
      query and key norm weights) or 'v41' (DeepSeek-V4.1: none of those; a q_weight * k_weight
      gate with weightless norms; `layers.engram`).
    gate_eps: eps of the gate's norms; None: the form's own (float32 machine epsilon for
      'demo', V4.1's 1e-20 for 'v41').
    gating: 'multi' (one context-aware gate per residual stream, the paper's), 'shared' (one
      gate for all streams, from their mean and one key: the ablation without multi-branch
      gating) or 'none' (the gate fixed to 1: without context-aware gating).
    short_conv: the short causal convolution of form 'demo' (False: the ablation without it).
    compress_tokens: hash compressed token ids (False: raw ids, the ablation without
      tokenizer compression).
  """

  max_ngram_size: int = 3
  heads_per_ngram: int = 8
  embed_per_ngram: int = 512
  table_bases: tuple[int, ...] = (129280 * 5, 129280 * 5)
  layer_ids: tuple[int, ...] = (1, 15)
  kernel_size: int = 4
  pad_token_id: int = 2
  seed: int = 0
  form: str = "demo"
  gate_eps: float | None = None
  gating: str = "multi"
  short_conv: bool = True
  compress_tokens: bool = True

  def __post_init__(self):
    _check(self.form in ENGRAM_FORMS, "form", f"one of {ENGRAM_FORMS}", self.form)
    _check(self.gating in ENGRAM_GATINGS, "gating", f"one of {ENGRAM_GATINGS}", self.gating)
    for name in ("short_conv", "compress_tokens"):
      _check(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
    _check(
      self.gate_eps is None or (isinstance(self.gate_eps, float) and self.gate_eps > 0),
      "gate_eps",
      "None or a positive float",
      self.gate_eps,
    )
    object.__setattr__(self, "table_bases", tuple(self.table_bases))
    object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
    check_engram_args(
      max_ngram_size=self.max_ngram_size,
      heads_per_ngram=self.heads_per_ngram,
      table_bases=self.table_bases,
      layer_ids=self.layer_ids,
      embed_per_ngram=self.embed_per_ngram,
    )
    _check(
      isinstance(self.kernel_size, int) and self.kernel_size >= 1,
      "kernel_size",
      "an int >= 1",
      self.kernel_size,
    )
    _check(
      isinstance(self.pad_token_id, int) and self.pad_token_id >= 0,
      "pad_token_id",
      "a non-negative raw token id",
      self.pad_token_id,
    )

  @property
  def resolved_gate_eps(self) -> float:
    """The gate norms' eps: `gate_eps`, or the form's own."""
    if self.gate_eps is not None:
      return self.gate_eps
    return V41_GATE_EPS if self.form == "v41" else float(np.finfo(np.float32).eps)

  @property
  def num_heads(self) -> int:
    """H: hash heads per Engram layer, all orders together."""
    return (self.max_ngram_size - 1) * self.heads_per_ngram

  @property
  def head_dim(self) -> int:
    """Dh: width of one head's row."""
    return self.embed_per_ngram // self.heads_per_ngram

  @property
  def memory_dim(self) -> int:
    """Dm: width of the concatenated memory vector e_t."""
    return self.num_heads * self.head_dim


# ---------------------------------------------------------------------------------------------
# Engram memory presets (paper §3-4, spec §6).
# ---------------------------------------------------------------------------------------------


def engram_27b_memory() -> EngramConfig:
  """Engram-27B: Ng=3, Hn=8, d_mem=1280, 2,262,400 rows per head at blocks 2 and 15 (1-based)."""
  return EngramConfig(
    max_ngram_size=3,
    heads_per_ngram=8,
    embed_per_ngram=640,
    table_bases=(2_262_400, 2_262_400),
    layer_ids=(1, 14),
    kernel_size=4,
    pad_token_id=2,
    seed=0,
  )


def engram_40b_memory() -> EngramConfig:
  """Engram-40B: as Engram-27B with 7,239,680 rows per head (18.5B table parameters)."""
  return dataclasses.replace(engram_27b_memory(), table_bases=(7_239_680, 7_239_680))


# ---------------------------------------------------------------------------------------------
# The language model.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE settings (shared + fine-grained routed experts, aux-loss-free balancing).

  Attributes:
    num_experts: E, routed experts per MoE layer.
    num_shared: always-on shared experts.
    top_k: routed experts per token.
    expert_hidden: F, hidden width of one expert.
    routed_scaling: factor on the normalised routed gates.
    balance_rate: gamma, the per-step bias update of aux-loss-free balancing.
    dispatch: how the routed experts run: 'ragged' (`jax.lax.ragged_dot`, native on GPU/TPU),
      'blocks' (one batched matmul over blocks of one expert each: XLA:CPU lowers ragged_dot
      densely, E times the work) or 'auto' (ragged on GPU/TPU, blocks elsewhere). Every choice
      gives the same outputs and gradients to float rounding.
    capacity_slack: with expert parallelism (a mesh `expert` axis), each device runs its
      experts on at most slack x its even share of the assignments; a device with more takes
      the overflow path, all of its token's assignments, so no token is dropped.
    expert_exchange: how the tokens of an expert group reach the experts under expert
      parallelism: 'all_to_all' (each device sends its share of the tokens to the experts'
      devices and gets the outputs back, in buckets of `capacity_slack` x the even share, with
      the 'replicated' path when a bucket overflows) or 'replicated' (every device runs its
      experts on all of the group's tokens and the group sums the outputs).
    block_gather_mib: the 'blocks' dispatch gathers each block's expert weights; when one
      matrix's gather would exceed this many MiB, the blocks run as a loop over chunks that
      stay under it (`lax.map`), so a paper-size layer does not hold a copy of its expert
      weights per block. Memory only: the outputs are the same.
  """

  num_experts: int = 8
  num_shared: int = 1
  top_k: int = 2
  expert_hidden: int = 64
  routed_scaling: float = 1.0
  balance_rate: float = 1e-3
  dispatch: str = "auto"
  capacity_slack: float = 2.0
  expert_exchange: str = "all_to_all"
  block_gather_mib: float = 256.0

  def __post_init__(self):
    _check(self.block_gather_mib > 0, "block_gather_mib", "MiB > 0", self.block_gather_mib)
    _check(self.capacity_slack > 0, "capacity_slack", "a factor > 0", self.capacity_slack)
    _check(
      self.expert_exchange in EXPERT_EXCHANGES,
      "expert_exchange",
      f"one of {EXPERT_EXCHANGES}",
      self.expert_exchange,
    )
    _check(
      isinstance(self.num_experts, int) and self.num_experts >= 1,
      "num_experts",
      "an int >= 1",
      self.num_experts,
    )
    _check(
      isinstance(self.num_shared, int) and self.num_shared >= 0,
      "num_shared",
      "an int >= 0",
      self.num_shared,
    )
    _check(
      isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
      "top_k",
      f"an int in [1, num_experts={self.num_experts}]",
      self.top_k,
    )
    _check(
      isinstance(self.expert_hidden, int) and self.expert_hidden >= 1,
      "expert_hidden",
      "an int >= 1",
      self.expert_hidden,
    )
    _check(self.balance_rate >= 0, "balance_rate", "a rate >= 0", self.balance_rate)
    _check(self.dispatch in MOE_DISPATCHES, "dispatch", f"one of {MOE_DISPATCHES}", self.dispatch)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The transformer: embedding -> M streams -> blocks -> merge -> norm -> untied head.

  Block i (0-based) is dense (SwiGLU of width `ffn_hidden`) when `i < num_dense_layers` or
  `moe is None`, DeepSeekMoE otherwise; it starts with an Engram read when `engram` lists i in
  its `layer_ids`.

  Attributes:
    vocab_size: V, raw tokenizer ids.
    d_model: D.
    num_layers: blocks.
    num_heads: attention query heads.
    num_kv_heads: key/value heads (GQA; = num_heads for MHA).
    head_dim: width of one attention head.
    ffn_hidden: hidden width of the dense SwiGLU layers.
    num_dense_layers: leading blocks that use the dense FFN even in an MoE model.
    moe: MoE settings, or None for a dense model.
    engram: Engram memory settings, or None for no Engram.
    streams: M, mHC residual streams (1 = a plain pre-norm residual stream).
    sinkhorn_iters: Sinkhorn-Knopp iterations of mHC's residual mixing.
    rope_theta: RoPE base.
    norm_eps: RMSNorm eps of the backbone.
    dtype: compute dtype name ('float32' or 'bfloat16'); parameters are float32.
    engram_init_std: standard deviation of the Engram tables' initial rows. Small, so the
      memory starts close to silent and the block close to its attention/FFN path (the
      reference demo's `nn.Embedding` uses 1.0; on `cpu_small` 1.0 ended 0.03 nats worse, see
      docs/results.md).
    remat: rematerialisation of every block (`REMAT_POLICIES`): activation memory against
      recomputation; the same mathematics either way.
    scan_layers: run each run of two or more consecutive blocks of one kind (no Engram; all
      dense or all MoE) under `nn.scan`, its parameters stacked on a leading "layers" axis
      (`model.scan_groups`): one compiled block per run instead of one per layer. Training
      only; `model.stack_blocks` / `unstack_blocks` convert parameters and checkpoints.
  """

  vocab_size: int = 8192
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  ffn_hidden: int = 128
  num_dense_layers: int = 1
  moe: MoEConfig | None = None
  engram: EngramConfig | None = None
  streams: int = 1
  sinkhorn_iters: int = 20
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  engram_init_std: float = 0.02
  remat: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "ffn_hidden",
      "streams",
      "sinkhorn_iters",
    ):
      value = getattr(self, name)
      _check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
    _check(self.remat in REMAT_POLICIES, "remat", f"one of {REMAT_POLICIES}", self.remat)
    _check(isinstance(self.scan_layers, bool), "scan_layers", "a bool", self.scan_layers)
    _check(
      self.num_heads % self.num_kv_heads == 0,
      "num_kv_heads",
      f"a divisor of num_heads={self.num_heads}",
      self.num_kv_heads,
    )
    _check(
      isinstance(self.num_dense_layers, int) and self.num_dense_layers >= 0,
      "num_dense_layers",
      "an int >= 0",
      self.num_dense_layers,
    )
    _check(self.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", self.dtype)
    if self.engram is not None:
      bad = [i for i in self.engram.layer_ids if i >= self.num_layers]
      _check(
        not bad,
        "engram.layer_ids",
        f"0-based block indices below num_layers={self.num_layers}",
        self.engram.layer_ids,
      )

  def is_moe_layer(self, i: int) -> bool:
    return self.moe is not None and i >= self.num_dense_layers

  @property
  def engram_layers(self) -> tuple[int, ...]:
    return () if self.engram is None else self.engram.layer_ids
