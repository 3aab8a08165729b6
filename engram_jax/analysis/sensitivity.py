"""Sensitivity to removing Engram (paper Fig. 7 / §6.4): the loss with the memory switched off.

The validation loss is measured twice, with the model as trained and with every Engram layer's
output zeroed at inference (`forward.engram_zeroed`: the branch removed, not zero rows, see
there), and broken down by token: a target that completes a frequent n-gram of the training
text (the `order - 1` tokens before it plus itself occur at least `min_count` times) against
the rest. The paper's reading is that Engram holds static, local patterns: removing it should
hurt the frequent n-gram continuations most.

The n-gram is read inside the model's window (the context Engram's hashing sees), so the first
`order - 2` positions of every window, lacking the context, count as "other".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from engram_jax.analysis.forward import AnalysisModel

FREQUENT = "frequent_ngram"
OTHER = "other"
ALL = "all"


def _codes(grams: np.ndarray, vocab_size: int) -> np.ndarray:
  """n-grams [..., n] -> int64 [...] mixed-radix codes (base V)."""
  codes = np.zeros(grams.shape[:-1], np.int64)
  for k in range(grams.shape[-1]):
    codes = codes * vocab_size + grams[..., k].astype(np.int64)
  return codes


@dataclasses.dataclass(frozen=True)
class NgramCounts:
  """How often each n-gram of one order occurs in a token stream.

  Attributes:
    order: n.
    vocab_size: V; n-grams are coded base V, so V ** n must fit in int64.
    codes: sorted distinct n-gram codes.
    counts: their occurrence counts.
  """

  order: int
  vocab_size: int
  codes: np.ndarray
  counts: np.ndarray

  @classmethod
  def from_tokens(cls, tokens, order: int, vocab_size: int) -> NgramCounts:
    """Counts the n-grams of a 1-D token stream [N].

    Raises:
      ValueError: order < 2, V ** order too large for int64 codes, or tokens not 1-D in [0, V).
    """
    if order < 2 or vocab_size**order >= 2**63:
      raise ValueError(
        f"order: expected an int >= 2 with vocab_size ** order < 2**63, got {order} "
        f"(vocab_size {vocab_size})"
      )
    tokens = np.asarray(tokens, np.int64)
    if tokens.ndim != 1 or (tokens.size and not 0 <= tokens.min() <= tokens.max() < vocab_size):
      raise ValueError(f"tokens: expected a 1-D stream of ids in [0, {vocab_size})")
    n = tokens.size - order + 1
    if n <= 0:
      return cls(order, vocab_size, np.zeros(0, np.int64), np.zeros(0, np.int64))
    grams = np.stack([tokens[k : k + n] for k in range(order)], axis=-1)  # [N - n + 1, n]
    codes, counts = np.unique(_codes(grams, vocab_size), return_counts=True)
    return cls(order, vocab_size, codes, counts.astype(np.int64))

  def count(self, grams: np.ndarray) -> np.ndarray:
    """Occurrences of each n-gram [..., n] -> int64 [...] (0 for unseen ones)."""
    codes = _codes(np.asarray(grams), self.vocab_size)
    if self.codes.size == 0:
      return np.zeros(codes.shape, np.int64)
    at = np.minimum(np.searchsorted(self.codes, codes), self.codes.size - 1)
    return np.where(self.codes[at] == codes, self.counts[at], 0)


def frequent_mask(
  tokens: np.ndarray, targets: np.ndarray, counts: NgramCounts, min_count: int
) -> np.ndarray:
  """Which targets complete a frequent n-gram.

  Args:
    tokens: [B, T] inputs.
    targets: [B, T] next tokens.
    counts: n-gram counts of order n.
    min_count: the threshold K.

  Returns:
    [B, T] bools: (tokens[t - n + 2 .. t], targets[t]) occurs >= K times (False for t < n - 2).
  """
  n = counts.order
  b, t = tokens.shape
  mask = np.zeros((b, t), bool)
  if t <= n - 2:
    return mask
  # [B, T - n + 2, n]: the n - 1 tokens ending at t (t >= n - 2), then the target.
  context = [tokens[:, k : t - n + 2 + k] for k in range(n - 1)]
  grams = np.stack([*context, targets[:, n - 2 :]], axis=-1)
  mask[:, n - 2 :] = counts.count(grams) >= min_count
  return mask


def token_losses(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Cross-entropy per token: logits [B, T, V], targets [B, T] -> [B, T] float64 nats."""
  x = np.asarray(logits, np.float64)
  top = x.max(axis=-1, keepdims=True)
  log_z = np.log(np.exp(x - top).sum(axis=-1)) + top[..., 0]  # [B, T]
  picked = np.take_along_axis(x, np.asarray(targets)[..., None], axis=-1)[..., 0]  # [B, T]
  return log_z - picked


def sensitivity(
  model: AnalysisModel,
  windows: Iterable[np.ndarray],
  counts: NgramCounts,
  min_count: int,
) -> dict:
  """Validation loss with and without Engram, overall and per token category.

  Args:
    model: a model with Engram.
    windows: batches of windows [B, T + 1] (inputs `w[:, :-1]`, targets `w[:, 1:]`).
    counts: n-gram counts of the training text.
    min_count: K, the count from which an n-gram is frequent.

  Returns:
    {"order", "min_count", "categories": {"all" | "frequent_ngram" | "other": {"tokens",
    "loss", "loss_engram_zeroed", "loss_increase"}}}; losses in nats per token (None for an
    empty category).

  Raises:
    ValueError: a model without Engram, or no windows.
  """
  if not model.has_engram:
    raise ValueError("model: expected a model with Engram layers, got one without")
  sums = {c: np.zeros(3) for c in (ALL, FREQUENT, OTHER)}  # tokens, loss, zeroed loss
  for w in windows:
    w = np.asarray(w)
    tokens, targets = w[:, :-1], w[:, 1:]  # [B, T + 1] -> [B, T] each
    full = token_losses(model.forward(tokens).logits, targets)
    zeroed = token_losses(model.forward(tokens, zero_engram=True).logits, targets)
    frequent = frequent_mask(tokens, targets, counts, min_count)
    for name, mask in ((ALL, np.ones_like(frequent)), (FREQUENT, frequent), (OTHER, ~frequent)):
      sums[name] += (mask.sum(), full[mask].sum(), zeroed[mask].sum())
  if sums[ALL][0] == 0:
    raise ValueError("windows: expected at least one window")
  categories = {
    name: {
      "tokens": int(n),
      "loss": float(full / n) if n else None,
      "loss_engram_zeroed": float(zeroed / n) if n else None,
      "loss_increase": float((zeroed - full) / n) if n else None,
    }
    for name, (n, full, zeroed) in sums.items()
  }
  return {"order": counts.order, "min_count": int(min_count), "categories": categories}
