"""Causal self-attention with rotary position embeddings (MHA or GQA), plus a KV-cache path."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# Large negative finite logit for masked keys: unlike -inf it cannot produce NaN gradients.
_MASKED = float(jnp.finfo(jnp.float32).min)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Rotation cosines and sines for each position (float32).

  Args:
    positions: [B, T] integer positions.
    head_dim: Da, must be even (channel i is paired with channel i + Da/2).
    theta: base of the inverse frequencies.

  Returns:
    (cos, sin), each [B, T, Da/2] float32.
  """
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  # [B, T] x [Da/2] -> [B, T, Da/2]
  angles = jnp.einsum("bt,a->bta", positions.astype(jnp.float32), inv_freq)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates channel pairs (i, i + Da/2) of every head by the position's angles.

  Args:
    x: [B, T, Q, Da] queries or keys (any float dtype).
    cos: [B, T, Da/2] from `rope_angles`.
    sin: [B, T, Da/2] from `rope_angles`.

  Returns:
    [B, T, Q, Da] rotated, in the dtype of `x` (the rotation itself runs in float32).
  """
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  # [B, T, Da/2] -> [B, T, 1, Da/2]: one angle per position, shared by all heads.
  cos = cos[:, :, None, :]
  sin = sin[:, :, None, :]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class KVCache(NamedTuple):
  """Keys and values of every position seen so far; slot s holds absolute position s.

  Attributes:
    k: [B, S, G, Da] rotated keys.
    v: [B, S, G, Da] values.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(
    cls, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype
  ) -> KVCache:
    """An empty cache of `length` slots."""
    shape = (batch, length, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def _attend(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: jnp.dtype
) -> jax.Array:
  """Masked softmax attention with query heads grouped over shared key/value heads.

  Args:
    q: [B, T, G, Qg, Da] queries, Qg query heads per key/value head.
    k: [B, S, G, Da] keys.
    v: [B, S, G, Da] values.
    mask: [B, T, S] True where query t may attend to key s.
    dtype: dtype of the probabilities fed to the value product.

  Returns:
    [B, T, G, Qg, Da] attention outputs in `dtype`.
  """
  scale = q.shape[-1] ** -0.5
  # [B, T, G, Qg, Da] x [B, S, G, Da] -> [B, G, Qg, T, S], accumulated in float32.
  logits = jnp.einsum("btgra,bsga->bgrts", q, k, preferred_element_type=jnp.float32) * scale
  # [B, T, S] -> [B, 1, 1, T, S]: the same mask for every head.
  logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  # [B, G, Qg, T, S] x [B, S, G, Da] -> [B, T, G, Qg, Da]
  return jnp.einsum("bgrts,bsga->btgra", probs, v.astype(dtype))


class CausalSelfAttention(nn.Module):
  """Causal self-attention, RoPE on queries and keys, grouped key/value heads, no biases.

  Query head q uses key/value head `q // (num_heads // num_kv_heads)`; `num_kv_heads ==
  num_heads` is plain multi-head attention. Softmax runs in float32 whatever `dtype` is.

  Params (logical axis names): `w_q` [D, Q, Da] ("embed", "heads", "head_dim"); `w_k`, `w_v`
  [D, G, Da] ("embed", "kv_heads", "head_dim"); `w_o` [Q, Da, D] ("heads", "head_dim", "embed").

  Attributes:
    num_heads: Q, query heads.
    num_kv_heads: G, key/value heads; must divide `num_heads`.
    head_dim: Da, width of one head; must be even (RoPE rotates channel pairs).
    rope_theta: base of the RoPE frequencies.
    dtype: compute dtype (projections, value product, output).
    param_dtype: dtype of the weights.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _weight(self, name: str, shape: tuple[int, ...], names: tuple[str, ...], in_axis, out_axis):
    init = nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis)
    w = self.param(name, nn.with_logical_partitioning(init, names), shape, self.param_dtype)
    return w.astype(self.dtype)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Attends each position to itself and the positions before it.

    Shapes: B batch, T sequence (new tokens), S key/value sequence (cache slots), D model
    width, Q query heads, G key/value heads, Qg = Q // G, Da head width.

    Without a cache, position t attends to inputs 0..t of `x` (mask by index; `positions` only
    sets the RoPE angles). With a cache, the new keys/values are written to the slots named by
    `positions` and a query at position p attends to slots 0..p: prefill with T tokens at
    positions 0..T-1, then decode one token at a time.

    Args:
      x: [B, T, D] inputs.
      positions: [B, T] integer positions; defaults to 0..T-1. Required with a cache.
      cache: optional `KVCache` with S >= the largest position + 1.

    Returns:
      [B, T, D] outputs in `dtype`; with a cache, the tuple (outputs, updated cache).
    """
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    b, t, d = x.shape
    q_heads, kv_heads, da = self.num_heads, self.num_kv_heads, self.head_dim
    if positions is None:
      if cache is not None:
        raise ValueError("positions are required when decoding with a cache")
      # [T] -> [B, T]
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))

    w_q = self._weight("w_q", (d, q_heads, da), ("embed", "heads", "head_dim"), 0, (1, 2))
    w_k = self._weight("w_k", (d, kv_heads, da), ("embed", "kv_heads", "head_dim"), 0, (1, 2))
    w_v = self._weight("w_v", (d, kv_heads, da), ("embed", "kv_heads", "head_dim"), 0, (1, 2))
    w_o = self._weight("w_o", (q_heads, da, d), ("heads", "head_dim", "embed"), (0, 1), 2)

    x = x.astype(self.dtype)
    # [B, T, D] -> [B, T, Q, Da]
    q = jnp.einsum("btd,dqa->btqa", x, w_q)
    # [B, T, D] -> [B, T, G, Da]
    k = jnp.einsum("btd,dga->btga", x, w_k)
    # [B, T, D] -> [B, T, G, Da]
    v = jnp.einsum("btd,dga->btga", x, w_v)
    cos, sin = rope_angles(positions, da, self.rope_theta)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    if cache is None:
      # Causal by index: query t sees keys s <= t.
      causal = jnp.tril(jnp.ones((t, t), dtype=bool))
      # [T, S] -> [B, T, S]
      mask = jnp.broadcast_to(causal[None, :, :], (b, t, t))
    else:
      rows = jnp.arange(b)[:, None]
      # [B, T, G, Da] written into slots `positions` of [B, S, G, Da]
      cache = KVCache(
        k=cache.k.at[rows, positions].set(k.astype(cache.k.dtype)),
        v=cache.v.at[rows, positions].set(v.astype(cache.v.dtype)),
      )
      k, v = cache.k, cache.v
      slots = jnp.arange(k.shape[1], dtype=positions.dtype)
      # [B, T, 1] >= [1, 1, S] -> [B, T, S]: slots after the query position are unwritten.
      mask = positions[:, :, None] >= slots[None, None, :]

    # [B, T, Q, Da] -> [B, T, G, Qg, Da]: consecutive query heads share a key/value head.
    q = q.reshape(b, t, kv_heads, q_heads // kv_heads, da)
    out = _attend(q, k.astype(self.dtype), v, mask, self.dtype)
    # [B, T, G, Qg, Da] -> [B, T, Q, Da]
    out = out.reshape(b, t, q_heads, da)
    # [B, T, Q, Da] -> [B, T, D]
    y = jnp.einsum("btqa,qad->btd", out, w_o)
    return y if cache is None else (y, cache)
