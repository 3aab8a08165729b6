"""The language model: embedding -> M streams -> blocks (Engram at chosen layers) -> head.

Block i (0-based) runs, in order (paper §2.3):
    H <- H + Engram(H, rows_i)                  if i is an Engram layer (all M streams)
    H <- mHC_attn(H, RMSNorm -> attention)      (plain pre-norm residual when M = 1)
    H <- mHC_ffn(H, RMSNorm -> SwiGLU or DeepSeekMoE)

The Engram tables are not parameters of this module: the caller fetches `rows[i]` [B, T, H, Dh]
from a memory backend with the hash ids that came with the batch and passes them in, so the
gradient w.r.t. the rows can drive a sparse table update.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.config import ModelConfig
from engram_jax.layers.attention import CausalSelfAttention
from engram_jax.layers.engram import Engram
from engram_jax.layers.ffn import FeedForward
from engram_jax.layers.mhc import HyperConnection, expand_streams, merge_streams
from engram_jax.layers.moe import MoE
from engram_jax.layers.norms import RMSNorm


def _dtype(name: str):
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


class Block(nn.Module):
  """One transformer block over M streams.

  Attributes:
    cfg: the model settings (for widths and heads).
    layer: this block's 0-based index (decides MoE vs dense and Engram).
  """

  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, h: jax.Array, rows: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Shapes: B batch, T sequence, M streams, D width, H hash heads, Dh head row width, E experts.

    Args:
      h: [B, T, M, D] streams.
      rows: [B, T, H, Dh] fetched Engram rows for this block, or None.

    Returns:
      (h [B, T, M, D], load [E] of the MoE layer or None).
    """
    cfg = self.cfg
    dtype = _dtype(cfg.dtype)
    if self.layer in cfg.engram_layers:
      if rows is None:
        raise ValueError(f"rows: block {self.layer} is an Engram layer but got no rows")
      engram = Engram(
        max_ngram_size=cfg.engram.max_ngram_size,
        kernel_size=cfg.engram.kernel_size,
        dtype=dtype,
        name="engram",
      )
      h = h + engram(h, rows).astype(h.dtype)

    hc_attn = HyperConnection(
      streams=cfg.streams, sinkhorn_iters=cfg.sinkhorn_iters, eps=cfg.norm_eps, name="hc_attn"
    )
    x, ctx = hc_attn.pre(h)
    attn = CausalSelfAttention(
      num_heads=cfg.num_heads,
      num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      rope_theta=cfg.rope_theta,
      dtype=dtype,
      name="attn",
    )
    y = attn(RMSNorm(eps=cfg.norm_eps, name="attn_norm")(x))
    h = hc_attn.post(ctx, y.astype(h.dtype))

    hc_ffn = HyperConnection(
      streams=cfg.streams, sinkhorn_iters=cfg.sinkhorn_iters, eps=cfg.norm_eps, name="hc_ffn"
    )
    x, ctx = hc_ffn.pre(h)
    x = RMSNorm(eps=cfg.norm_eps, name="ffn_norm")(x)
    load = None
    if cfg.is_moe_layer(self.layer):
      moe = cfg.moe
      y, load = MoE(
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        expert_hidden=moe.expert_hidden,
        num_shared=moe.num_shared,
        routed_scaling=moe.routed_scaling,
        dtype=dtype,
        name="moe",
      )(x)
    else:
      y = FeedForward(hidden_dim=cfg.ffn_hidden, dtype=dtype, name="ffn")(x)
    h = hc_ffn.post(ctx, y.astype(h.dtype))
    return h, load


class EngramLM(nn.Module):
  """Decoder-only language model with optional Engram memory, mHC and DeepSeekMoE.

  Attributes:
    cfg: the model settings.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self, tokens: jax.Array, rows: Mapping[int, jax.Array] | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Next-token logits.

    Args:
      tokens: [B, T] raw token ids.
      rows: {engram layer id: [B, T, H, Dh]} rows fetched for the batch's hash ids.

    Returns:
      (logits [B, T, V] float32, load [L_moe, E] per-expert load of every MoE block, or an
      empty [0, 0] array for a model without MoE).
    """
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ValueError(f"tokens: expected [B, T], got shape {tokens.shape}")
    rows = dict(rows or {})
    missing = [i for i in cfg.engram_layers if i not in rows]
    if missing:
      raise ValueError(
        f"rows: expected rows for every Engram layer {cfg.engram_layers}, missing {missing}"
      )
    embed = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
      (cfg.vocab_size, cfg.d_model),
      jnp.float32,
    )
    x = jnp.take(embed, tokens, axis=0)  # [B, T] -> [B, T, D]
    h = expand_streams(x, cfg.streams)  # [B, T, D] -> [B, T, M, D]
    loads = []
    for i in range(cfg.num_layers):
      h, load = Block(cfg, i, name=f"block_{i}")(h, rows.get(i))
      if load is not None:
        loads.append(load)
    x = RMSNorm(eps=cfg.norm_eps, name="final_norm")(merge_streams(h))  # [B, T, M, D] -> [B, T, D]
    head = self.param(
      "lm_head",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
      (cfg.d_model, cfg.vocab_size),
      jnp.float32,
    )
    dtype = _dtype(cfg.dtype)
    # [B, T, D] x [D, V] -> [B, T, V]
    logits = jnp.einsum("btd,dv->btv", x.astype(dtype), head.astype(dtype))
    load = jnp.stack(loads) if loads else jnp.zeros((0, 0), jnp.float32)
    return logits.astype(jnp.float32), load
