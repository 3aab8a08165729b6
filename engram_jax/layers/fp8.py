"""FP8 block quantization and the block-scaled FP8 matmul of DeepSeek-V4.1 (spec V4.1 §5.2).

V4.1 stores the Engram key/value projection `wkv` as float8_e4m3fn weights [out, in] with one
E8M0 exponent per 32 x 32 tile, and quantizes its input on the fly, per block of 32 values:

    amax  = max(max |x_block|, 1e-4)
    scale = 2 ** ceil(log2(amax / 448))            (448: e4m3's largest value)
    codes = e4m3(clamp(x / scale, -448, 448))      (round to nearest, ties to even)

The product is then, for every output o and every 32-wide block k of the contraction, an fp32
dot of the codes times both scales, summed in fp32 in block order:

    y[o] = sum_k (codes_x[k] . codes_w[o, k]) * scale_x[k] * scale_w[o // 32, k]

Shapes: ... leading axes, K contraction (in), O outputs (out), Kb = K / 32 blocks, Ob = ceil(O / 32)
weight tiles along the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 32
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def quantize_blocks(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-block e4m3 codes and power-of-two scales of x [..., K] (K a multiple of 32).

  Returns:
    (codes [..., K] float8_e4m3fn, scales [..., K/32] float32).
  """
  *lead, k = x.shape
  if k % BLOCK:
    raise ValueError(f"x: expected a last axis divisible by {BLOCK}, got {k}")
  blocks = x.astype(jnp.float32).reshape(*lead, k // BLOCK, BLOCK)  # [..., Kb, 32]
  amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), AMAX_FLOOR)  # [..., Kb]
  scale = pow2_ceil(amax / E4M3_MAX)  # [..., Kb]
  scaled = jnp.clip(blocks / scale[..., None], -E4M3_MAX, E4M3_MAX)  # exact division
  codes = scaled.astype(jnp.float8_e4m3fn).reshape(*lead, k)  # [..., Kb, 32] -> [..., K]
  return codes, scale


def ceil_log2(x, xp=jnp):
  """ceil(log2(x)) for x > 0 as integers, exactly, from the float's own exponent (a float
  log2 can land a hair above an integer). `xp`: jax.numpy or NumPy (the host storage path)."""
  mantissa, exponent = xp.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
  return xp.where(mantissa == 0.5, exponent - 1, exponent)


def pow2_ceil(x: jax.Array) -> jax.Array:
  """2 ** ceil(log2(x)) for x > 0, exactly."""
  return jnp.ldexp(jnp.ones_like(x), ceil_log2(x))


def e8m0_to_float32(exponent: jax.Array) -> jax.Array:
  """E8M0 exponent bytes (uint8, or float8_e8m0fnu) -> float32 2 ** (e - 127).

  The scale's own value, by the dtype conversion: byte 0 gives the subnormal 2**-127 even on
  XLA:CPU, where `pallas_kernels.common.times_e8m0(1.0, 0)` (a product) flushes it to 0.
  """
  if exponent.dtype != jnp.float8_e8m0fnu:
    exponent = jax.lax.bitcast_convert_type(exponent.astype(jnp.uint8), jnp.float8_e8m0fnu)
  return exponent.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="out_dtype")
def block_fp8_matmul(
  x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, out_dtype=jnp.bfloat16
) -> jax.Array:
  """x [..., K] times the block-scaled FP8 weight [O, K], as V4.1's reference kernel computes.

  Args:
    x: [..., K] activations (quantized here with `quantize_blocks`).
    w_codes: [O, K] float8_e4m3fn weight codes.
    w_scale: [ceil(O / 32), K / 32] E8M0 exponents of the 32 x 32 weight tiles.
    out_dtype: the result's dtype (V4.1: bfloat16).

  Returns:
    [..., O] in `out_dtype`.
  """
  o, k = w_codes.shape
  kb = k // BLOCK
  if x.shape[-1] != k or w_scale.shape != (-(-o // BLOCK), kb):
    raise ValueError(
      f"block_fp8_matmul: expected x [..., {k}] and w_scale [{-(-o // BLOCK)}, {kb}], got "
      f"{tuple(x.shape)} and {tuple(w_scale.shape)}"
    )
  codes, x_scale = quantize_blocks(x)  # [..., K], [..., Kb]
  lead = codes.shape[:-1]
  xq = codes.astype(jnp.float32).reshape(*lead, kb, BLOCK)  # [..., Kb, 32]
  wq = w_codes.astype(jnp.float32).reshape(o, kb, BLOCK)  # [O, Kb, 32]
  # [ceil(O/32), Kb] -> [O, Kb]: each output row takes its tile's exponent.
  w_s = jnp.repeat(e8m0_to_float32(w_scale), BLOCK, axis=0)[:o]
  # [..., Kb, 32] x [O, Kb, 32] -> [..., Kb, O]: one fp32 dot per block (products are exact).
  dots = jnp.einsum("...kc,okc->...ko", xq, wq, precision=jax.lax.Precision.HIGHEST)
  w_s = w_s.reshape(*(1,) * len(lead), o, kb)  # [1, ..., 1, O, Kb], against [..., O]
  acc = jnp.zeros((*lead, o), jnp.float32)
  for b in range(kb):  # fp32, in block order
    acc = acc + dots[..., b, :] * x_scale[..., b, None] * w_s[..., b]  # [..., O]
  return acc.astype(out_dtype)
