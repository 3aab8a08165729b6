"""A trained model run for analysis: rows from its tables, block outputs, gates, Engram removed.

`AnalysisModel` holds what a forward pass needs (config, params, balancing biases, Engram hashing
and NumPy tables, as `engram_jax.run.load_run` returns them) and runs the model over raw tokens,
returning the logits, every block's output streams (the model sows them into its "residuals"
collection) and every Engram layer's gate (sown into "intermediates").

A scanned model (`ModelConfig.scan_layers`) is analysed in its unscanned form: `unstack_blocks`
only changes the layout of the parameters, not the function, and the unscanned blocks sow each
output.

Removing Engram (`zero_engram=True`, `engram_zeroed`): every Engram layer's output Y is replaced
by zeros through `nn.intercept_methods`, so each block runs as if it had no Engram branch. This
is not the same as feeding zero rows: with e = 0 the value projection still adds its bias b_V
(and the keys b_K), so the branch would keep writing `alpha * b_V` into the streams. Zeroing Y
is also what forcing every gate to 0 does (u = 0, and the convolution of RMSNorm(0) = 0 gives
SiLU(0) = 0), which the tests check through the layer's own `dead` positions. The model itself
has no switch for it, so the analysis needs no model option that training never uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.analysis import lens
from engram_jax.config import ModelConfig
from engram_jax.hashing import EngramHashing
from engram_jax.layers.engram import Engram
from engram_jax.model import EngramLM, unstack_blocks
from engram_jax.run import LoadedRun


@contextlib.contextmanager
def engram_zeroed():
  """Within this context every `Engram` layer's output Y is zero (the branch removed).

  The layer still runs (its gate is still sown); only what it returns to the block changes.
  Enter it where the model is traced (inside a jitted function), not around a cached call.
  """

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if not (isinstance(context.module, Engram) and context.method_name == "__call__"):
      return out
    if isinstance(out, tuple):  # decoding: (Y, the next convolution state)
      return (jnp.zeros_like(out[0]), *out[1:])
    return jnp.zeros_like(out)

  with nn.intercept_methods(interceptor):
    yield


@dataclasses.dataclass(frozen=True)
class ForwardOutputs:
  """What one forward pass of `AnalysisModel` returns (NumPy).

  Attributes:
    logits: [B, T, V] float32 next-token logits.
    block_outputs: L arrays [B, T, M, D], each block's output streams, in block order.
    lens_kl: [L, B, T] float32, KL(final || block i's readout) per token (`lens.readout`).
    gates: {Engram layer: [B, T, M] gate values}.
  """

  logits: np.ndarray
  block_outputs: tuple[np.ndarray, ...]
  lens_kl: np.ndarray
  gates: dict[int, np.ndarray]


@functools.partial(jax.jit, static_argnames=("model_cfg", "zero_engram"))
def _apply(model_cfg: ModelConfig, params, balance, tokens, rows, zero_engram: bool):
  """(logits [B, T, V], L block outputs [B, T, M, D], lens KL [L, B, T], {layer: gates
  [B, T, M]}).

  The readouts run in the same program as the model: the last block's readout repeats the
  model's own head computation, so its KL is 0 (to rounding, which XLA's merging of the two
  identical computations usually removes).
  """
  model = EngramLM(model_cfg)
  with engram_zeroed() if zero_engram else contextlib.nullcontext():
    (logits, _), state = model.apply(
      {"params": params, "balance": balance},
      tokens,
      rows,
      mutable=["intermediates", "residuals"],
    )
  blocks = tuple(state["residuals"]["block_out"])
  # L x [B, T] -> [L, B, T]
  kl = jnp.stack([lens.kl_divergence(logits, lens.readout(model_cfg, params, h)) for h in blocks])
  gates = {
    layer: state["intermediates"][f"block_{layer}"]["engram"]["gate"][0]
    for layer in model_cfg.engram_layers
  }
  return logits, blocks, kl, gates


@dataclasses.dataclass(frozen=True)
class AnalysisModel:
  """A model with its parameters and Engram tables, run on the host's default device.

  Attributes:
    model_cfg: the model (unscanned: a scanned one is unstacked on construction).
    params: its parameters (unboxed).
    balance: its MoE balancing biases.
    hashing: its Engram wiring, or None for a model without Engram.
    tables: {Engram layer: [R, Dh] NumPy rows}.
  """

  model_cfg: ModelConfig
  params: dict
  balance: dict
  hashing: EngramHashing | None = None
  tables: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.model_cfg.scan_layers:
      params, balance = unstack_blocks((self.params, self.balance), self.model_cfg)
      object.__setattr__(self, "params", params)
      object.__setattr__(self, "balance", balance)
      object.__setattr__(self, "model_cfg", dataclasses.replace(self.model_cfg, scan_layers=False))
    layers = set(self.model_cfg.engram_layers)
    if self.hashing is not None and set(self.hashing.layouts) != layers:
      raise ValueError(
        f"hashing: expected layouts for the Engram layers {sorted(layers)}, got "
        f"{sorted(self.hashing.layouts)}"
      )
    if set(self.tables) != (layers if self.hashing is not None else set()):
      raise ValueError(
        f"tables: expected one table per Engram layer {sorted(layers)}, got {sorted(self.tables)}"
      )

  @classmethod
  def from_run(cls, run: LoadedRun) -> AnalysisModel:
    """The model of a run loaded by `engram_jax.run.load_run`."""
    return cls(run.model_cfg, run.params, run.balance, run.hashing, run.tables)

  @property
  def has_engram(self) -> bool:
    return self.hashing is not None

  def rows(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """{layer: [B, T, H, Dh]} the rows every Engram layer reads for raw tokens [B, T]."""
    if self.hashing is None:
      return {}
    hash_ids = self.hashing.hash_ids(np.asarray(tokens, np.int64))  # {layer: [B, T, H]}
    rows = {}
    for layer, layout in self.hashing.layouts.items():
      row_ids = np.asarray(layout.row_ids(hash_ids[layer]))  # [B, T, H] flat row ids
      rows[layer] = np.asarray(self.tables[layer])[row_ids]  # [B, T, H] -> [B, T, H, Dh]
    return rows

  def forward(self, tokens: np.ndarray, zero_engram: bool = False) -> ForwardOutputs:
    """Runs the model over raw tokens [B, T].

    Args:
      tokens: [B, T] raw token ids.
      zero_engram: replace every Engram layer's output with zeros (see the module docstring).

    Returns:
      The logits, block outputs and gates.

    Raises:
      ValueError: tokens that are not [B, T].
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens: expected [B, T], got shape {tokens.shape}")
    rows = {layer: jnp.asarray(r) for layer, r in self.rows(tokens).items()}
    logits, blocks, kl, gates = _apply(
      self.model_cfg,
      self.params,
      self.balance,
      jnp.asarray(tokens, jnp.int32),
      rows,
      zero_engram=zero_engram,
    )
    return ForwardOutputs(
      np.asarray(logits),
      tuple(np.asarray(h) for h in blocks),
      np.asarray(kl),
      {layer: np.asarray(g) for layer, g in gates.items()},
    )
