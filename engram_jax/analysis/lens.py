"""LogitLens (paper Fig. 4a): how far each block's output is from the model's final prediction.

Block i's output streams h_i [B, T, M, D] are read out exactly as the model reads out its last
block: merge the M streams (their mean), the final RMSNorm, the LM head. The divergence
KL(p_final || p_i) between the model's next-token distribution and that readout, averaged over
tokens, falls to 0 at the last block; a model whose early blocks are already close to the final
prediction (Engram's claim: the memory frees the early blocks from reconstructing static
n-grams) has lower values there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import ModelConfig
from engram_jax.layers.mhc import merge_streams
from engram_jax.layers.norms import rms_norm
from engram_jax.model import _dtype

if TYPE_CHECKING:
  from engram_jax.analysis.forward import AnalysisModel


def readout(model_cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
  """The model's head applied to streams h: merge, final RMSNorm, LM head.

  Args:
    model_cfg: the model.
    params: its (unscanned, unboxed) parameters; `final_norm` and `lm_head` are read.
    h: [B, T, M, D] streams (a block's output).

  Returns:
    [B, T, V] float32 logits.
  """
  x = merge_streams(h)  # [B, T, M, D] -> [B, T, D]
  x = rms_norm(x, params["final_norm"]["scale"], model_cfg.norm_eps)
  dtype = _dtype(model_cfg.dtype)
  # [B, T, D] x [D, V] -> [B, T, V]
  logits = jnp.einsum("btd,dv->btv", x.astype(dtype), params["lm_head"].astype(dtype))
  return logits.astype(jnp.float32)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(p || q) per position of two logit arrays [..., V] -> [...] (float32, in nats)."""
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def logit_lens(model: AnalysisModel, batches: Iterable[np.ndarray]) -> np.ndarray:
  """Mean KL(final || block i) over every token of `batches`.

  Args:
    model: the model.
    batches: raw token arrays [B, T].

  Returns:
    [L] float64: one mean KL per block (the last is 0).

  Raises:
    ValueError: no tokens.
  """
  total, count = None, 0
  for tokens in batches:
    kl = model.forward(tokens).lens_kl.astype(np.float64)  # [L, B, T]
    kl = kl.reshape(kl.shape[0], -1).sum(axis=1)  # [L, B, T] -> [L]
    total = kl if total is None else total + kl
    count += int(np.prod(np.shape(tokens)))
  if total is None or count == 0:
    raise ValueError("batches: expected at least one token")
  return total / count
