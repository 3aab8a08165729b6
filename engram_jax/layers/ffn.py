"""Dense SwiGLU feed-forward block (no biases)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# fan-in scaled normal; the expert weights of `moe.py` use the same rule per expert.
_KERNEL_INIT = nn.initializers.lecun_normal()


class FeedForward(nn.Module):
  """SwiGLU: `(silu(x W_gate) * (x W_up)) W_down`.

  Params (logical axis names): `w_gate`, `w_up` [D, F] ("embed", "mlp"); `w_down` [F, D]
  ("mlp", "embed").

  Attributes:
    hidden_dim: F, the hidden width.
    dtype: compute dtype (the output has this dtype); params stay `param_dtype`.
    param_dtype: dtype of the weights.
  """

  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to every position independently.

    Shapes: B batch, T sequence, D model width, F hidden width.

    Args:
      x: [B, T, D] inputs.

    Returns:
      [B, T, D] outputs in `dtype`.
    """
    d = x.shape[-1]
    w_gate = self.param(
      "w_gate",
      nn.with_logical_partitioning(_KERNEL_INIT, ("embed", "mlp")),
      (d, self.hidden_dim),
      self.param_dtype,
    )
    w_up = self.param(
      "w_up",
      nn.with_logical_partitioning(_KERNEL_INIT, ("embed", "mlp")),
      (d, self.hidden_dim),
      self.param_dtype,
    )
    w_down = self.param(
      "w_down",
      nn.with_logical_partitioning(_KERNEL_INIT, ("mlp", "embed")),
      (self.hidden_dim, d),
      self.param_dtype,
    )
    x = x.astype(self.dtype)
    # [B, T, D] -> [B, T, F]
    gate = jnp.einsum("btd,df->btf", x, w_gate.astype(self.dtype))
    # [B, T, D] -> [B, T, F]
    up = jnp.einsum("btd,df->btf", x, w_up.astype(self.dtype))
    hidden = jax.nn.silu(gate) * up
    # [B, T, F] -> [B, T, D]
    return jnp.einsum("btf,fd->btd", hidden, w_down.astype(self.dtype))
