"""RMSNorm (float32 statistics, learnable scale starting at one)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's `nn.RMSNorm(eps=None)` uses the float32 machine epsilon; the Engram demo's q/k norms
# rely on that default.
FLOAT32_EPS = float(jnp.finfo(jnp.float32).eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Normalises the last axis by its root mean square (computed in float32), then scales."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  # [..., D] scale (e.g. [M, D] per branch) aligned to the trailing axes of x.
  scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - scale.ndim) + scale.shape)
  return (x32 * inv * scale).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis.

  Attributes:
    eps: added to the mean square.
    dtype: output dtype (statistics are always float32).
    param_dtype: dtype of the scale.
    axis_name: logical axis name of the scale.
  """

  eps: float = 1e-6
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D]."""
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
      (x.shape[-1],),
      self.param_dtype,
    )
    y = rms_norm(x, scale, self.eps)
    return y.astype(self.dtype) if self.dtype is not None else y
