"""The Engram layer of DeepSeek-V4.1 (spec V4.1 §5): the released variant, for inference.

Per token, with the H fetched rows e [B, T, H * Dh] (bfloat16, decoded from MXFP8) and the
residual streams x [B, T, hc, D] (bfloat16):

    kv      = wkv(e)                      block-scaled FP8 matmul (`layers.fp8`), bfloat16
    k_h     = kv[h D : (h + 1) D]         one key per stream; v = kv[hc D :], shared
    s_h     = sum_d x_h w_h k_h * rsqrt(mean(x_h^2) + eps) * rsqrt(mean(k_h^2) + eps) / sqrt(D)
              with w_h = q_weight[h] * k_weight[h] (norms without weights), in float32
    g_h     = sigmoid(sign(s_h) sqrt(max(|s_h|, 1e-6))), 0 at dead positions
    x_h    <- bfloat16(x_h + g_h v)       on every stream: the residual is added here

Unlike the paper's demo (`layers.engram`) there is no short convolution, no projection bias and
no learnable norm weight besides q_weight and k_weight, and eps is 1e-20.

Shapes: B batch, T tokens, hc residual streams, D model width, H heads, Dh row width.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from engram_jax.layers.engram import signed_sqrt
from engram_jax.layers.fp8 import block_fp8_matmul


class V41EngramParams(NamedTuple):
  """One V4.1 Engram layer's weights (as the checkpoint stores them).

  Attributes:
    q_weight: [hc, D] bfloat16.
    k_weight: [hc, D] bfloat16.
    wkv_codes: [(hc + 1) D, H Dh] float8_e4m3fn.
    wkv_scale: [ceil((hc + 1) D / 32), H Dh / 32] E8M0 exponent bytes.
  """

  q_weight: jax.Array
  k_weight: jax.Array
  wkv_codes: jax.Array
  wkv_scale: jax.Array


def _gate_and_value(params: V41EngramParams, hidden, rows, dead, eps: float):
  """(x [B, T, hc, D] float32 streams, gate [B, T, hc], value [B, T, D] float32)."""
  b, t, hc, d = hidden.shape
  e = rows.astype(jnp.bfloat16).reshape(b, t, -1)  # [B, T, H, Dh] -> [B, T, H Dh]
  kv = block_fp8_matmul(e, params.wkv_codes, params.wkv_scale)  # [B, T, (hc + 1) D] bf16
  key = kv[..., : hc * d].reshape(b, t, hc, d).astype(jnp.float32)  # [B, T, hc, D]
  value = kv[..., hc * d :].astype(jnp.float32)  # [B, T, D]
  x = hidden.astype(jnp.bfloat16).astype(jnp.float32)
  w = params.q_weight.astype(jnp.float32) * params.k_weight.astype(jnp.float32)
  w = w[None, None]  # [hc, D] -> [1, 1, hc, D]
  rx = jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + eps)  # [B, T, hc]
  rk = jax.lax.rsqrt(jnp.mean(key * key, axis=-1) + eps)
  s = jnp.sum(x * w * key, axis=-1) * rx * rk / jnp.sqrt(jnp.float32(d))  # [B, T, hc]
  gate = jax.nn.sigmoid(signed_sqrt(s))  # [B, T, hc]
  return x, jnp.where(dead[..., None], 0.0, gate), value


@functools.partial(jax.jit, static_argnames="eps")
def v41_engram(
  params: V41EngramParams, hidden: jax.Array, rows: jax.Array, dead: jax.Array, eps: float
) -> jax.Array:
  """The layer's output streams (the residual included).

  Args:
    params: the layer's weights.
    hidden: [B, T, hc, D] the residual streams.
    rows: [B, T, H, Dh] the fetched, decoded rows.
    dead: [B, T] bools: positions whose gate is 0 (V4.1's image tokens).
    eps: the norms' eps (`norm_eps`, 1e-20 in V4.1).

  Returns:
    [B, T, hc, D] bfloat16.
  """
  x, gate, value = _gate_and_value(params, hidden, rows, dead, eps)
  # [B, T, hc, D] + [B, T, hc, 1] * [B, T, 1, D]
  return (x + gate[..., None] * value[:, :, None, :]).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames="eps")
def v41_gates(params: V41EngramParams, hidden, rows, dead, eps: float) -> jax.Array:
  """[B, T, hc] every stream's gate (for inspection), as `v41_engram` computes it."""
  return _gate_and_value(params, hidden, rows, dead, eps)[1]
