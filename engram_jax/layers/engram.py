"""The Engram layer: context-aware gating of fetched memory rows and a short convolution.

Paper §2.3-2.4 (spec §4-5). The layer does not own the hash tables: rows arrive already fetched
by a memory backend (`engram_jax.memory`), so the same layer serves device, sharded and
host-offloaded tables.

    e      = concat of the H fetched rows                         [B, T, Dm]
    k_m    = RMSNorm_k,m(W_K,m e + b_K,m),  q_m = RMSNorm_q,m(h_m)  [B, T, M, D]
    s_m    = <q_m, k_m> / sqrt(D);  alpha_m = sigmoid(sign(s) sqrt(max(|s|, 1e-6)))
    u_m    = alpha_m * (W_V e + b_V)                               [B, T, M, D]
    Y      = u + SiLU(CausalDepthwiseConv_dilation=Ng(RMSNorm_m(u)))  (eq. 5)

The M key projections and the value projection are one fused matmul. The conv starts at zero,
so at initialisation the layer outputs exactly the gated value `u`.

`form='v41'` is the variant of the released DeepSeek-V4.1 (spec V4.1 §5): no short convolution,
no projection bias, and the gate from one weight per stream, `w_m = q_weight_m * k_weight_m`,
with weightless RMS norms of eps `qk_eps` (1e-20 there):

    s_m = sum_d h_m w_m k_m * rsqrt(mean(h_m^2) + eps) * rsqrt(mean(k_m^2) + eps) / sqrt(D)
    Y   = alpha_m * (W_V e)       (0 at dead positions: V4.1's image tokens)

V4.1 adds Y to the streams inside its layer (`h + Y` in bfloat16); here the block adds it, the
same sum. The released layer's FP8 projection is `interop.v41`'s; this trainable form keeps a
float kernel.

The paper's ablations are options too: `gating='shared'` (one gate for all streams, from their
mean and one key projection), `gating='none'` (the gate fixed to 1: no key projection, no
norms) and `short_conv=False` (Y = u).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.config import ENGRAM_FORMS, ENGRAM_GATINGS
from engram_jax.layers.norms import FLOAT32_EPS, rms_norm

# The gate's signed square root keeps a floor on |s| so its gradient stays finite at 0.
GATE_FLOOR = 1e-6
FORMS = ENGRAM_FORMS
GATINGS = ENGRAM_GATINGS


def signed_sqrt(s: jax.Array, floor: float = GATE_FLOOR) -> jax.Array:
  """sign(s) * sqrt(max(|s|, floor)), the gate's compression of its logits s [...] (same shape)."""
  return jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), floor))


def check_engram_inputs(hidden_shape, rows_shape) -> None:
  """Raises ValueError unless hidden [B, T, M, D] / [B, T, D] and rows [B, T, H, Dh] agree."""
  if len(hidden_shape) not in (3, 4):
    raise ValueError(
      f"hidden: expected [B, T, M, D] (or [B, T, D] for M = 1), got shape {tuple(hidden_shape)}"
    )
  if len(rows_shape) != 4:
    raise ValueError(f"rows: expected [B, T, H, Dh], got shape {tuple(rows_shape)}")
  if tuple(hidden_shape[:2]) != tuple(rows_shape[:2]):
    raise ValueError(
      f"rows: expected the same [B, T] as hidden {tuple(hidden_shape[:2])}, "
      f"got {tuple(rows_shape[:2])}"
    )


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Depthwise causal convolution with left padding only.

  Args:
    x: [B, T, C] input.
    kernel: [W, C] taps; tap W - 1 multiplies the current position, tap i the position
      (W - 1 - i) * dilation steps back.
    dilation: spacing of the taps.

  Returns:
    [B, T, C].
  """
  w, t = kernel.shape[0], x.shape[1]
  y = jnp.zeros_like(x)
  for i in range(w):
    lag = (w - 1 - i) * dilation
    if lag >= t:
      continue
    # [B, T - lag, C] -> [B, T, C]: positions before the start read zeros.
    shifted = jnp.pad(x[:, : t - lag], ((0, 0), (lag, 0), (0, 0)))
    y = y + shifted * kernel[i][None, None, :]
  return y


class Engram(nn.Module):
  """Gated Engram memory read plus short convolution (returns the branch update Y).

  Attributes:
    max_ngram_size: Ng; the convolution's dilation.
    kernel_size: W, taps of the short convolution.
    conv_eps: eps of the convolution's per-branch RMSNorms (1e-5 in the reference).
    qk_eps: eps of the query/key RMSNorms (float32 machine epsilon in the reference; V4.1's
      `norm_eps`, 1e-20, for form 'v41').
    form: 'demo' (the paper's demo) or 'v41' (DeepSeek-V4.1: no convolution, no bias, the
      q_weight * k_weight gate; see the module docstring).
    gating: 'multi' (a gate per stream), 'shared' (one gate for all) or 'none' (gate = 1).
    short_conv: the short convolution (form 'demo' only; V4.1 has none).
    dtype: compute dtype; norms, the gate and the residual sum run in float32.
    param_dtype: parameter dtype.
  """

  max_ngram_size: int = 3
  kernel_size: int = 4
  conv_eps: float = 1e-5
  qk_eps: float = FLOAT32_EPS
  form: str = "demo"
  gating: str = "multi"
  short_conv: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def conv_state_length(self) -> int:
    """(W - 1) * Ng: past positions the convolution reads (the decoding state; 0 without one)."""
    return (self.kernel_size - 1) * self.max_ngram_size if self._has_conv else 0

  @property
  def _has_conv(self) -> bool:
    return self.form == "demo" and self.short_conv

  @nn.compact
  def __call__(
    self,
    hidden: jax.Array,
    rows: jax.Array,
    conv_state: jax.Array | None = None,
    dead: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Computes Y for every residual branch.

    Args:
      hidden: [B, T, M, D] branch hidden states (or [B, T, D] for M = 1).
      rows: [B, T, H, Dh] memory rows fetched for this layer's hash ids.
      conv_state: for incremental decoding, [B, (W-1)*Ng, C] convolution inputs (C = M*D) of
        the `conv_state_length` positions before these T (zeros before the sequence start: a
        prefill from zeros equals the plain call).
      dead: [B, T] bools, positions whose gate is 0 (form 'v41'; None: none).

    Returns:
      [B, T, M, D] float32 (the caller adds it to the residual streams); [B, T, D] when
      `hidden` was given as [B, T, D]. With `conv_state`, the tuple (Y, the next state
      [B, (W-1)*Ng, C]: the last (W - 1) * Ng convolution inputs).
    """
    check_engram_inputs(hidden.shape, rows.shape)
    if self.form not in FORMS:
      raise ValueError(f"form: expected one of {FORMS}, got {self.form!r}")
    if self.gating not in GATINGS:
      raise ValueError(f"gating: expected one of {GATINGS}, got {self.gating!r}")
    single_stream = hidden.ndim == 3
    if single_stream:
      hidden = hidden[:, :, None, :]  # [B, T, D] -> [B, T, 1, D]
    b, t, m, d = hidden.shape
    dm = rows.shape[2] * rows.shape[3]
    e = rows.reshape(b, t, dm).astype(self.dtype)  # [B, T, H, Dh] -> [B, T, Dm]

    # Key projections: one per stream, one for all ('shared'), or none ('none').
    keys = {"multi": m, "shared": 1, "none": 0}[self.gating]
    kernel = self.param(
      "kv_kernel",
      nn.with_logical_partitioning(
        nn.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
        ),
        ("engram_memory", "engram_kv", "embed"),
      ),
      (dm, keys + 1, d),
      self.param_dtype,
    )
    # [B, T, Dm] x [Dm, K+1, D] -> [B, T, K+1, D]: the K keys and the shared value in one matmul.
    kv = jnp.einsum("btc,cjd->btjd", e, kernel.astype(self.dtype))
    if self.form == "demo":
      bias = self.param(
        "kv_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, ("engram_kv", "embed")),
        (keys + 1, d),
        self.param_dtype,
      )
      kv = kv + bias.astype(self.dtype)[None, None]
    key, value = kv[:, :, :keys], kv[:, :, keys]  # [B, T, K, D], [B, T, D]

    def branch_scale(name, n=keys):
      return self.param(
        name,
        nn.with_logical_partitioning(nn.initializers.ones, ("streams", "embed")),
        (n, d),
        self.param_dtype,
      )

    if self.gating == "none":
      gate = jnp.ones((b, t, m), jnp.float32)
    else:
      # 'shared': one query from the streams' mean: [B, T, M, D] -> [B, T, 1, D].
      query = hidden if self.gating == "multi" else jnp.mean(hidden, axis=2, keepdims=True)
      if self.form == "v41":
        # Weightless norms; the one weight per stream is q_weight * k_weight.
        w = branch_scale("q_weight") * branch_scale("k_weight")  # [K, D]
        q = rms_norm(query.astype(jnp.float32), w, self.qk_eps)
        k = rms_norm(key.astype(jnp.float32), jnp.ones_like(w), self.qk_eps)
      else:
        k = rms_norm(key.astype(jnp.float32), branch_scale("key_norm"), self.qk_eps)
        q = rms_norm(query.astype(jnp.float32), branch_scale("query_norm"), self.qk_eps)
      s = jnp.sum(q * k, axis=-1) / jnp.sqrt(jnp.float32(d))  # [B, T, K]
      s = signed_sqrt(s)  # [B, T, K]
      gate = jnp.broadcast_to(jax.nn.sigmoid(s), (b, t, m))  # [B, T, K] -> [B, T, M]
    if dead is not None:
      gate = jnp.where(dead[:, :, None], 0.0, gate)
    self.sow("intermediates", "gate", gate)

    # [B, T, M, 1] * [B, T, 1, D] -> [B, T, M, D]
    u = gate[..., None] * value[:, :, None, :].astype(jnp.float32)
    if not self._has_conv:  # Y = u
      out = u[:, :, 0] if single_stream else u
      if conv_state is None:
        return out
      return out, conv_state
    un = rms_norm(u, branch_scale("conv_norm", m), self.conv_eps)
    conv_kernel = self.param(
      "conv_kernel",
      nn.with_logical_partitioning(nn.initializers.zeros, ("conv_taps", "engram_channels")),
      (self.kernel_size, m * d),
      self.param_dtype,
    )
    x = un.reshape(b, t, m * d).astype(self.dtype)  # [B, T, M, D] -> [B, T, C], C = M*D
    if conv_state is not None:
      lag = self.conv_state_length
      if conv_state.shape != (b, lag, m * d):
        raise ValueError(
          f"conv_state: expected [B, (W-1)*Ng, M*D] = {(b, lag, m * d)}, got {conv_state.shape}"
        )
      x = jnp.concatenate([conv_state.astype(self.dtype), x], axis=1)  # [B, (W-1)*Ng + T, C]
    y = causal_depthwise_conv(x, conv_kernel.astype(self.dtype), self.max_ngram_size)
    if conv_state is not None:
      y = y[:, lag:]  # [B, (W-1)*Ng + T, C] -> [B, T, C]
    y = jax.nn.silu(y.astype(jnp.float32)).reshape(b, t, m, d)  # [B, T, C] -> [B, T, M, D]
    out = u + y
    out = out[:, :, 0] if single_stream else out
    if conv_state is None:
      return out
    return out, x[:, x.shape[1] - lag :]  # [B, (W-1)*Ng + T, C] -> [B, (W-1)*Ng, C]
