"""Centered kernel alignment (paper Fig. 4b-c): which blocks of two models compute alike.

Linear CKA (Kornblith et al. 2019) of representations X [N, D1] and Y [N, D2] of the same N
tokens, after centering each column:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It is invariant to orthogonal transforms and isotropic scaling of either side, and 1 for
representations that differ only by those. `cka_matrix` compares every block of one model with
every block of another; `soft_alignment` summarises where each block of the second model finds
its match in the first (the paper's reading: Engram's early blocks align with deeper blocks of
the MoE baseline, i.e. Engram adds effective depth).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from engram_jax.analysis.forward import AnalysisModel


def _centered(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected [N, D], got shape {x.shape}")
  return x - x.mean(axis=0, keepdims=True)


def linear_cka(x, y) -> float:
  """Centered linear CKA of x [N, D1] and y [N, D2] (float64).

  Raises:
    ValueError: inputs that are not [N, D] with the same N >= 2, or a constant input (whose
      centered Gram matrix is zero, so CKA is undefined).
  """
  x, y = _centered(x, "x"), _centered(y, "y")
  if x.shape[0] != y.shape[0] or x.shape[0] < 2:
    raise ValueError(f"x, y: expected the same N >= 2 rows, got {x.shape[0]} and {y.shape[0]}")
  cross = np.linalg.norm(y.T @ x) ** 2  # [D2, N] x [N, D1] -> [D2, D1]
  norm_x = np.linalg.norm(x.T @ x)  # [D1, D1]
  norm_y = np.linalg.norm(y.T @ y)  # [D2, D2]
  if norm_x == 0 or norm_y == 0:
    raise ValueError("x, y: expected non-constant representations, got a constant one")
  return float(cross / (norm_x * norm_y))


def cka_matrix(reps_a: Sequence[np.ndarray], reps_b: Sequence[np.ndarray]) -> np.ndarray:
  """CKA of every representation of `reps_a` with every one of `reps_b`.

  Args:
    reps_a: La arrays [N, Da], e.g. the block outputs of one model over N tokens.
    reps_b: Lb arrays [N, Db] over the same N tokens.

  Returns:
    [La, Lb] float64.
  """
  if not reps_a or not reps_b:
    raise ValueError(
      f"reps_a, reps_b: expected non-empty lists, got {len(reps_a)} and {len(reps_b)}"
    )
  out = np.empty((len(reps_a), len(reps_b)))
  for i, a in enumerate(reps_a):
    for j, b in enumerate(reps_b):
      out[i, j] = linear_cka(a, b)
  return out


def soft_alignment(cka: np.ndarray, top_k: int = 3) -> np.ndarray:
  """For each column j (a block of model B), the CKA-weighted mean index of its `top_k` most
  similar rows (blocks of model A): sum_i S_ij i / sum_i S_ij over those rows.

  A value above j means that block j of B matches deeper blocks of A.

  Args:
    cka: [La, Lb] CKA matrix.
    top_k: rows averaged per column (at most La).

  Returns:
    [Lb] float64.
  """
  cka = np.asarray(cka, np.float64)
  if cka.ndim != 2 or top_k < 1:
    raise ValueError(f"cka, top_k: expected [La, Lb] and top_k >= 1, got {cka.shape}, {top_k}")
  k = min(top_k, cka.shape[0])
  top = np.argsort(-cka, axis=0, kind="stable")[:k]  # [k, Lb] row indices
  weights = np.take_along_axis(cka, top, axis=0)  # [k, Lb]
  return (weights * top).sum(axis=0) / weights.sum(axis=0)


def block_representations(model: AnalysisModel, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Each block's output, its streams merged (the mean, as the model's head reads them), over
  all tokens of `batches`.

  Args:
    model: the model.
    batches: raw token arrays [B, T].

  Returns:
    L arrays [N, D] float32, N the number of tokens.
  """
  per_block: list[list[np.ndarray]] = []
  for tokens in batches:
    # L x [B, T, M, D] -> L x [B * T, D]
    reps = [h.mean(axis=2).reshape(-1, h.shape[-1]) for h in model.forward(tokens).block_outputs]
    per_block = per_block or [[] for _ in reps]
    for acc, r in zip(per_block, reps, strict=True):
      acc.append(r)
  if not per_block:
    raise ValueError("batches: expected at least one batch")
  return [np.concatenate(acc) for acc in per_block]
