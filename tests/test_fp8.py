"""Tests of the FP8 block quantization and block-scaled matmul (engram_jax/layers/fp8.py)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from engram_jax.layers import fp8


def test_pow2_ceil_is_exact_at_powers_of_two():
  x = jnp.asarray([0.25, 0.5, 1.0, 3.0, 448.0, 2.0**-20, 1.0 + 2.0**-23], jnp.float32)
  np.testing.assert_array_equal(fp8.pow2_ceil(x), [0.25, 0.5, 1.0, 4.0, 512.0, 2.0**-20, 2.0])


def test_e8m0_to_float32_is_the_exact_power_of_two():
  e = np.arange(256, dtype=np.uint8)  # every E8M0 byte; 0 -> the subnormal 2**-127, 255 -> NaN
  want = np.append(np.float32(2.0 ** (e[:255].astype(np.float64) - 127)), np.float32(np.nan))
  for exponent in (e, e.view(ml_dtypes.float8_e8m0fnu)):
    got = np.asarray(fp8.e8m0_to_float32(jnp.asarray(exponent)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_quantize_blocks():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 96)).astype(np.float32) * np.array([1e-7, 1.0, 300.0])[:, None]
  x[1, :32] = 0.0  # an all-zero block: amax is floored at 1e-4
  x[2, 32] = 448.0 * 4  # a block whose amax / 448 is a power of two
  codes, scales = fp8.quantize_blocks(jnp.asarray(x))
  assert codes.dtype == jnp.float8_e4m3fn and codes.shape == (3, 96) and scales.shape == (3, 3)
  s = np.asarray(scales)
  np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))  # powers of two
  assert s[1, 0] == np.float32(2.0 ** np.ceil(np.log2(1e-4 / 448)))
  assert s[2, 1] == 4.0 and np.asarray(codes, np.float32)[2, 32] == 448.0
  back = np.asarray(codes, np.float32).reshape(3, 3, 32) * s[..., None]
  err = np.abs(back.reshape(3, 96) - x)
  assert np.all(err <= np.abs(x) * 2.0**-4 + np.repeat(s, 32, axis=1) * 2.0**-10)
  with pytest.raises(ValueError, match="divisible by 32"):
    fp8.quantize_blocks(jnp.zeros((2, 40)))


def test_block_matmul_follows_the_formula():
  rng = np.random.default_rng(1)
  o, k = 70, 96  # O not a multiple of 32: the last weight tile is partial
  x = rng.standard_normal((2, 5, k)).astype(np.float32)
  w = (rng.standard_normal((o, k)) * 50).astype(ml_dtypes.float8_e4m3fn)
  w_scale = rng.integers(120, 130, size=(3, 3)).astype(np.uint8)
  got = np.asarray(fp8.block_fp8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_scale)))
  # float64: sum over blocks b of (codes_x[b] . codes_w[:, b]) * scale_x[b] * scale_w[o // 32, b]
  codes, scales = (np.asarray(a, np.float64) for a in fp8.quantize_blocks(jnp.asarray(x)))
  ws = np.ldexp(1.0, w_scale.astype(np.int64) - 127)
  want = np.zeros((2, 5, o))
  for b in range(3):
    cols = slice(32 * b, 32 * b + 32)
    dot = codes[..., cols] @ w.astype(np.float64)[:, cols].T  # [2, 5, O]
    want += dot * scales[..., b, None] * np.repeat(ws[:, b], 32)[:o]
  np.testing.assert_allclose(got.astype(np.float64), want, rtol=2.0**-8)  # bf16 output
  with pytest.raises(ValueError, match="block_fp8_matmul: expected"):
    fp8.block_fp8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_scale[:2]))
