"""The language model: embedding -> M streams -> blocks (Engram at chosen layers) -> head.

Block i (0-based) runs, in order (paper §2.3):
    h <- h + Engram(h, rows_i)                  if i is an Engram layer (all M streams)
    h <- mHC_attn(h, RMSNorm -> attention)      (plain pre-norm residual when M = 1)
    h <- mHC_ffn(h, RMSNorm -> SwiGLU or DeepSeekMoE)

The Engram tables are not parameters of this module: the caller fetches `rows[i]` [B, T, H, Dh]
from a memory backend with the hash ids that came with the batch and passes them in, so the
gradient w.r.t. the rows can drive a sparse table update.

With `ModelConfig.scan_layers`, each run of two or more consecutive blocks of one kind (no
Engram layer; all dense or all MoE; `scan_groups`) is one `nn.scan` over a block whose
parameters (and balancing biases) are stacked on a leading "layers" axis, under the name
`blocks_{first}_{stop}`; `stack_blocks` / `unstack_blocks` convert any tree keyed like the
parameters (parameters, optimizer moments, biases) between the two forms.

Incremental decoding: `init_decode_cache` makes a `DecodeCache` (per block, the attention's
keys/values and, at Engram layers, the convolution's last inputs); calling the model with
`positions` and `cache` runs only the new tokens and returns the updated cache. Everything
else (mHC, MoE, the Engram gate) acts on each token alone, so prefill + one-token steps give
the logits of the full forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.config import ModelConfig
from engram_jax.layers.attention import CausalSelfAttention, KVCache
from engram_jax.layers.engram import Engram
from engram_jax.layers.ffn import FeedForward
from engram_jax.layers.mhc import HyperConnection, expand_streams, merge_streams
from engram_jax.layers.moe import MoE
from engram_jax.layers.norms import RMSNorm


def _dtype(name: str):
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _engram(cfg: ModelConfig, **kwargs) -> Engram:
  """The Engram layer of `cfg` (unbound unless given a name inside a module)."""
  e = cfg.engram
  return Engram(
    max_ngram_size=e.max_ngram_size,
    kernel_size=e.kernel_size,
    qk_eps=e.resolved_gate_eps,
    form=e.form,
    gating=e.gating,
    short_conv=e.short_conv,
    dtype=_dtype(cfg.dtype),
    **kwargs,
  )


class BlockCache(NamedTuple):
  """Decoding state of one block: kv (attention keys/values, [B, S, G, Da] each) and conv
  ([B, (W-1)*Ng, C], C = M*D: the last Engram convolution inputs; None where the block has no
  Engram)."""

  kv: KVCache
  conv: jax.Array | None


DecodeCache = tuple[BlockCache, ...]


def init_decode_cache(cfg: ModelConfig, batch: int, length: int) -> DecodeCache:
  """An empty decoding cache for sequences of up to `length` tokens (S = length)."""
  dtype = _dtype(cfg.dtype)
  lag = _engram(cfg).conv_state_length if cfg.engram else 0
  return tuple(
    BlockCache(
      KVCache.zeros(batch, length, cfg.num_kv_heads, cfg.head_dim, dtype),
      jnp.zeros((batch, lag, cfg.streams * cfg.d_model), dtype) if i in cfg.engram_layers else None,
    )
    for i in range(cfg.num_layers)
  )


class Block(nn.Module):
  """One transformer block over M streams.

  Attributes:
    cfg: the model settings (for widths and heads).
    layer: this block's 0-based index (decides MoE vs dense and Engram).
  """

  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(
    self,
    h: jax.Array,
    rows: jax.Array | None,
    positions: jax.Array | None = None,
    cache: BlockCache | None = None,
  ) -> tuple[jax.Array, jax.Array | None] | tuple[jax.Array, jax.Array | None, BlockCache]:
    """Shapes: B batch, T sequence, M streams, D width, H hash heads, Dh head row width, E experts.

    Args:
      h: [B, T, M, D] streams.
      rows: [B, T, H, Dh] fetched Engram rows for this block, or None.
      positions: [B, T] positions of the tokens (decoding).
      cache: this block's decoding state; then `positions` is required.

    Returns:
      (h [B, T, M, D], load [E] of the MoE layer or None), plus the new `BlockCache` when
      decoding.
    """
    cfg = self.cfg
    dtype = _dtype(cfg.dtype)
    conv = None
    if self.layer in cfg.engram_layers:
      if rows is None:
        raise ValueError(f"rows: block {self.layer} is an Engram layer but got no rows")
      engram = _engram(cfg, name="engram")
      if cache is None:
        y = engram(h, rows)
      else:
        y, conv = engram(h, rows, cache.conv)
      h = h + y.astype(h.dtype)

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
    x = RMSNorm(eps=cfg.norm_eps, name="attn_norm")(x)
    if cache is None:
      y = attn(x)
    else:
      y, kv = attn(x, positions, cache.kv)
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
        dispatch=moe.dispatch,
        capacity_slack=moe.capacity_slack,
        expert_exchange=moe.expert_exchange,
        block_gather_mib=moe.block_gather_mib,
        name="moe",
      )(x)
    else:
      y = FeedForward(hidden_dim=cfg.ffn_hidden, dtype=dtype, name="ffn")(x)
    h = hc_ffn.post(ctx, y.astype(h.dtype))
    if cache is None:
      return h, load
    return h, load, BlockCache(kv, conv)


def scan_groups(cfg: ModelConfig) -> list[tuple[int, int]]:
  """The [first, stop) runs of blocks `scan_layers` scans (empty without it): two or more
  consecutive blocks that are not Engram layers and are all MoE or all dense."""
  if not cfg.scan_layers:
    return []
  groups, i = [], 0
  while i < cfg.num_layers:
    stop = i + 1
    if i not in cfg.engram_layers:
      while (
        stop < cfg.num_layers
        and stop not in cfg.engram_layers
        and cfg.is_moe_layer(stop) == cfg.is_moe_layer(i)
      ):
        stop += 1
    if stop - i >= 2:
      groups.append((i, stop))
    i = stop
  return groups


# Scanned blocks are named `blocks_{first}_{stop}`.
SCANNED_PREFIX = "blocks_"


def group_name(first: int, stop: int) -> str:
  """The name of the scanned blocks [first, stop)."""
  return f"{SCANNED_PREFIX}{first}_{stop}"


def _map_dicts(tree, fn):
  """`fn` applied to every dict of a pytree of dicts, lists, tuples and NamedTuples (optax
  states), innermost first."""
  if isinstance(tree, dict):
    return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_map_dicts(v, fn) for v in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_map_dicts(v, fn) for v in tree)
  return tree


def stack_blocks(tree, cfg: ModelConfig):
  """`tree` (keyed like an unscanned model's parameters: params, optimizer moments, biases)
  with the blocks of every `scan_groups(cfg)` run stacked: block_i, ... -> blocks_{a}_{b},
  each leaf [L_group, ...]."""

  def stack(d: dict) -> dict:
    for a, b in scan_groups(cfg):
      names = [f"block_{i}" for i in range(a, b)]
      if all(n in d for n in names):
        d = {k: v for k, v in d.items() if k not in names} | {
          group_name(a, b): jax.tree.map(lambda *xs: jnp.stack(xs), *[d[n] for n in names])
        }
    return d

  return _map_dicts(tree, stack)


def unstack_blocks(tree, cfg: ModelConfig):
  """The inverse of `stack_blocks`: blocks_{a}_{b} -> block_a, ..., block_{b-1}."""

  def unstack(d: dict) -> dict:
    for a, b in scan_groups(cfg):
      if group_name(a, b) in d:
        group = d[group_name(a, b)]
        d = {k: v for k, v in d.items() if k != group_name(a, b)} | {
          f"block_{i}": jax.tree.map(lambda x, j=i - a: x[j], group) for i in range(a, b)
        }
    return d

  return _map_dicts(tree, unstack)


def _rematerialised(policy: str) -> type[Block]:
  """`Block`, or `Block` under `nn.remat` with the policy of `ModelConfig.remat` (the
  parameters keep their names: a checkpoint serves every policy)."""
  if policy == "none":
    return Block
  policies = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  return nn.remat(Block, policy=policies[policy])


class EngramLM(nn.Module):
  """Decoder-only language model with optional Engram memory, mHC and DeepSeekMoE.

  Attributes:
    cfg: the model settings.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    rows: Mapping[int, jax.Array] | None = None,
    positions: jax.Array | None = None,
    cache: DecodeCache | None = None,
  ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, DecodeCache]:
    """Next-token logits.

    Args:
      tokens: [B, T] raw token ids.
      rows: {engram layer id: [B, T, H, Dh]} rows fetched for the batch's hash ids.
      positions: [B, T] positions of the tokens, with `cache` (prefill: 0..T-1, then one
        token at a time, in order: the Engram convolution state assumes consecutive calls).
      cache: a `DecodeCache` from `init_decode_cache` or a previous call.

    Returns:
      (logits [B, T, V] float32, load [L_moe, E] per-expert load of every MoE block, or an
      empty [0, 0] array for a model without MoE); with `cache`, also the updated cache.
    """
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ValueError(f"tokens: expected [B, T], got shape {tokens.shape}")
    if cache is not None:
      if positions is None or positions.shape != tokens.shape:
        raise ValueError(
          f"positions: expected [B, T] = {tokens.shape} when decoding with a cache, got "
          f"{None if positions is None else positions.shape}"
        )
      if len(cache) != cfg.num_layers:
        raise ValueError(
          f"cache: expected one BlockCache per block ({cfg.num_layers}), got {len(cache)}"
        )
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
    loads, new_cache = [], []
    block_cls = _rematerialised(cfg.remat)
    groups = dict(scan_groups(cfg))  # first block -> stop
    if groups and cache is not None:
      raise ValueError(
        "cache: decoding runs unscanned blocks; serve with scan_layers=False and "
        "`unstack_blocks` parameters (engram_jax.run.load_run does both)"
      )
    i = 0
    while i < cfg.num_layers:
      if i in groups:
        stop = groups[i]
        scanned = nn.scan(
          block_cls,
          variable_axes={"params": 0, "balance": 0},
          split_rngs={"params": True},
          length=stop - i,
          metadata_params={nn.PARTITION_NAME: "layers"},
        )
        # The carry is h; each step's input is "no rows". Loads: [L_group, E] or None.
        h, load = scanned(cfg, i, name=group_name(i, stop))(h, None)
        loads.extend([] if load is None else list(load))
        i = stop
        continue
      block = block_cls(cfg, i, name=f"block_{i}")
      if cache is None:
        h, load = block(h, rows.get(i))
      else:
        h, load, block_cache = block(h, rows.get(i), positions, cache[i])
        new_cache.append(block_cache)
      if load is not None:
        loads.append(load)
      # Each unscanned block's output streams [B, T, M, D], in block order, for the analysis
      # library's logit lens and CKA: a collection of its own, so training's "intermediates"
      # hold the Engram gates alone, and not sown by `init` (whose variables stay as they were).
      if not self.is_initializing():
        self.sow("residuals", "block_out", h)
      i += 1
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
    if cache is None:
      return logits.astype(jnp.float32), load
    return logits.astype(jnp.float32), load, tuple(new_cache)
