"""Parameter accounting (paper §3.1) and the iso-parameter Engram builder.

All counts are analytic, from the config alone, so they work for paper-size models without
allocating anything; the tests check them against `jax.eval_shape` of `EngramLM`.

Definitions (paper §3.1):
- P_tot: every parameter except the vocabulary embedding and the LM head, Engram tables
  included.
- P_act: the parameters one token uses: attention, dense FFNs, shared experts, its top-k routed
  experts, the routers, norms, mHC, the Engram modules' gating / projection / conv parameters,
  and the Engram rows it reads (H rows of Dh per Engram layer). The embedding and the LM head are
  outside P_tot, so outside P_act too.
- P_sparse = P_tot - P_act: the routed experts a token does not use plus the table rows it
  does not read.
"""

from __future__ import annotations

import dataclasses

from engram_jax.config import EngramConfig, ModelConfig
from engram_jax.hashing import table_sizes_for_layers


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts of one model (all plain ints).

  Attributes:
    total: every model parameter plus the Engram tables.
    embedding: the vocabulary embedding [V, D].
    lm_head: the LM head [D, V].
    p_tot: `total` without the embedding and the LM head.
    p_act: parameters activated per token (see the module docstring).
    p_sparse: `p_tot - p_act`.
    engram_tables: rows x Dh summed over the Engram layers' tables.
    engram_dense: the Engram modules' own parameters (projections, biases, norms, conv).
    engram_rows_read: table parameters one token reads, H * Dh per Engram layer.
    routed_experts: all routed experts' weights (not the routers, not the shared experts).
    flops_per_token: forward-pass matmul FLOPs per token, see `count_params`.
  """

  total: int
  embedding: int
  lm_head: int
  p_tot: int
  p_act: int
  p_sparse: int
  engram_tables: int
  engram_dense: int
  engram_rows_read: int
  routed_experts: int
  flops_per_token: int


def _attention(cfg: ModelConfig) -> int:
  # w_q [D, Q, Da] + w_o [Q, Da, D] + w_k, w_v [D, G, Da]
  return 2 * cfg.d_model * cfg.head_dim * (cfg.num_heads + cfg.num_kv_heads)


def _hyper_connection_proj(cfg: ModelConfig) -> int:
  """mHC's projection [M*D, 2M + M*M] (none for a plain residual stream, M = 1)."""
  m = cfg.streams
  return 0 if m == 1 else m * cfg.d_model * (2 * m + m * m)


def _hyper_connection(cfg: ModelConfig) -> int:
  """One mHC module: projection, biases b_pre [M], b_post [M], b_res [M, M], three gains."""
  m = cfg.streams
  return 0 if m == 1 else _hyper_connection_proj(cfg) + 2 * m + m * m + 3


def engram_module_params(cfg: ModelConfig) -> int:
  """One Engram module's own parameters (0 without Engram).

  kv_kernel [Dm, M+1, D] and kv_bias [M+1, D]; key/query/conv norms [M, D] each; conv kernel
  [W, M*D].
  """
  e = cfg.engram
  if e is None:
    return 0
  m, d = cfg.streams, cfg.d_model
  return (e.memory_dim + 1) * (m + 1) * d + 3 * m * d + e.kernel_size * m * d


def engram_table_rows(engram: EngramConfig) -> dict[int, int]:
  """{layer id: R}, rows of each Engram layer's table (the sum of its heads' prime sizes)."""
  sizes = table_sizes_for_layers(engram.table_bases, engram.heads_per_ngram, engram.layer_ids)
  return {layer: sum(s) for layer, s in sizes.items()}


def count_params(cfg: ModelConfig, seq_len: int = 4096) -> ParamCounts:
  """Counts the parameters of `EngramLM(cfg)` and its tables, and the FLOPs per token.

  flops_per_token = 2 * (matmul weights one token uses) + attention, where the matmul weights
  are attention's w_q/w_k/w_v/w_o, the dense FFNs, shared and top-k routed experts, the
  routers, mHC's projections, Engram's kv_kernel and conv taps (one multiply-add per tap and
  channel) and the LM head; each weight costs one multiply and one add. The embedding and the
  table rows are lookups. Attention adds, per layer, 2 * Q * Da FLOPs per attended key for
  the scores and as many for the values; causal position t attends t + 1 keys, on average
  (seq_len + 1) / 2, hence 2 * Q * Da * (seq_len + 1) per layer. Norms, activations, the
  gates and mHC's O(M^2 D) stream mixing are left out.

  Args:
    cfg: the model.
    seq_len: T, sets the attention term of `flops_per_token` only.

  Returns:
    The `ParamCounts`.
  """
  d, v = cfg.d_model, cfg.vocab_size
  attention = _attention(cfg)
  # Per block: attention, its two norm scales, two mHC modules.
  common = attention + 2 * d + 2 * _hyper_connection(cfg)
  matmul_common = attention + 2 * _hyper_connection_proj(cfg)

  backbone = d  # final_norm
  active = d
  matmul = d * v  # the LM head is a matmul; the embedding a lookup
  routed_experts = 0
  for i in range(cfg.num_layers):
    backbone += common
    active += common
    matmul += matmul_common
    if cfg.is_moe_layer(i):
      moe = cfg.moe
      expert = 3 * d * moe.expert_hidden  # w_gate, w_up [D, F] and w_down [F, D]
      router = d * moe.num_experts
      shared = moe.num_shared * expert
      routed_experts += moe.num_experts * expert
      backbone += router + shared + moe.num_experts * expert
      active += router + shared + moe.top_k * expert
      matmul += router + shared + moe.top_k * expert
    else:
      ffn = 3 * d * cfg.ffn_hidden
      backbone += ffn
      active += ffn
      matmul += ffn

  engram_tables = engram_dense = rows_read = 0
  if cfg.engram is not None:
    e, layers = cfg.engram, len(cfg.engram_layers)
    engram_tables = sum(engram_table_rows(e).values()) * e.head_dim
    engram_dense = layers * engram_module_params(cfg)
    rows_read = layers * e.memory_dim
    m = cfg.streams
    matmul += layers * (e.memory_dim * (m + 1) * d + e.kernel_size * m * d)

  p_tot = backbone + engram_dense + engram_tables
  p_act = active + engram_dense + rows_read
  attention_flops = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * (seq_len + 1)
  return ParamCounts(
    total=p_tot + 2 * v * d,
    embedding=v * d,
    lm_head=d * v,
    p_tot=p_tot,
    p_act=p_act,
    p_sparse=p_tot - p_act,
    engram_tables=engram_tables,
    engram_dense=engram_dense,
    engram_rows_read=rows_read,
    routed_experts=routed_experts,
    flops_per_token=2 * matmul + attention_flops,
  )


def _check_rho(rho) -> None:
  ok = isinstance(rho, (int, float)) and not isinstance(rho, bool) and 0 < rho <= 1
  if not ok:
    raise ValueError(f"rho: expected an allocation ratio in (0, 1], got {rho!r}")


def iso_param_engram(moe_cfg: ModelConfig, rho: float, engram: EngramConfig) -> ModelConfig:
  """The Engram model with the same P_tot as `moe_cfg` at allocation ratio rho (paper §3.1).

  rho is the share of the MoE's P_sparse (its unused routed experts) that stays with routed
  experts. Each MoE layer keeps top_k + round(rho * (E - top_k)) experts; top_k, expert width,
  shared experts, attention and everything else stay as they are. The parameters freed (the
  removed experts and the routers' columns for them) pay for the Engram modules' dense
  parameters first; the rest becomes table rows: every order of every Engram layer gets the
  same base b (about b rows per head), the largest base whose prime-sized tables fit. So
  P_tot(engram) <= P_tot(moe), short by less than what raising b by one would add.

  P_act changes by exactly
      P_act(engram) - P_act(moe) = engram_dense + engram_rows_read - D * (E - E') * L_moe
  (the routed top-k experts and everything else activated are unchanged; a token now also
  uses the Engram modules and reads H rows of Dh per Engram layer; each router [D, E] loses
  the columns of the removed experts; L_moe = MoE layers).

  Args:
    moe_cfg: a pure-MoE model (`moe` set, `engram` None).
    rho: in (0, 1]; 1 returns `moe_cfg` unchanged.
    engram: the Engram settings to use (Ng, Hn, head width, layer ids, kernel, ...); its
      `table_bases` are replaced.

  Returns:
    The iso-parameter Engram-MoE config.

  Raises:
    ValueError: for rho outside (0, 1], a config without MoE or already with Engram, or a rho
      so close to 1 that the freed parameters cannot pay for the Engram modules and tables.
  """
  _check_rho(rho)
  if moe_cfg.moe is None:
    raise ValueError("moe_cfg.moe: expected an MoE config to take experts from, got None")
  if moe_cfg.engram is not None:
    raise ValueError(f"moe_cfg.engram: expected a pure-MoE config, got {moe_cfg.engram!r}")
  if rho == 1:
    return moe_cfg
  moe = moe_cfg.moe
  experts = moe.top_k + round(rho * (moe.num_experts - moe.top_k))
  reduced = dataclasses.replace(moe_cfg, moe=dataclasses.replace(moe, num_experts=experts))
  freed = count_params(moe_cfg).p_tot - count_params(reduced).p_tot

  with_engram = dataclasses.replace(reduced, engram=engram)
  budget = freed - len(engram.layer_ids) * engram_module_params(with_engram)

  def table_params(base: int) -> int:
    bases = (base,) * (engram.max_ngram_size - 1)
    rows = engram_table_rows(dataclasses.replace(engram, table_bases=bases))
    return sum(rows.values()) * engram.head_dim

  # Every head has at least `base` rows, so no base above `high` fits; the table size only
  # grows with the base (all heads take the first primes >= base), so bisect.
  low, high = 2, budget // (len(engram.layer_ids) * engram.num_heads * engram.head_dim)
  if high < low or table_params(low) > budget:
    raise ValueError(
      f"rho: {rho!r} frees {freed} parameters, too few for the Engram modules and tables"
    )
  while low < high:
    mid = (low + high + 1) // 2
    low, high = (mid, high) if table_params(mid) <= budget else (low, mid - 1)
  bases = (low,) * (engram.max_ngram_size - 1)
  return dataclasses.replace(reduced, engram=dataclasses.replace(engram, table_bases=bases))
