"""Backbone layers: one module per file, pure functional Flax Linen."""

from engram_jax.layers.attention import CausalSelfAttention, KVCache, apply_rope, rope_angles
from engram_jax.layers.engram import Engram, causal_depthwise_conv
from engram_jax.layers.ffn import FeedForward
from engram_jax.layers.mhc import (
  HyperConnection,
  StreamContext,
  expand_streams,
  merge_streams,
  sinkhorn_knopp,
)
from engram_jax.layers.moe import MoE, route, update_expert_bias
from engram_jax.layers.norms import RMSNorm, rms_norm

__all__ = [
  "CausalSelfAttention",
  "Engram",
  "FeedForward",
  "HyperConnection",
  "KVCache",
  "MoE",
  "RMSNorm",
  "StreamContext",
  "apply_rope",
  "causal_depthwise_conv",
  "expand_streams",
  "merge_streams",
  "rms_norm",
  "rope_angles",
  "route",
  "sinkhorn_knopp",
  "update_expert_bias",
]
