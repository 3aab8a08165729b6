"""Table diagnostics: which rows of each hash head a corpus reads, and what they hold.

`table_usage` hashes a corpus exactly as training does (each window on its own, the pad id before
its start) and keeps, per hash head, the reads of every row and the map row -> the distinct
(compressed) n-grams that hashed to it, each with the raw tokens of its first occurrence.
`table_diagnostics` summarises it per head: rows touched, collisions (distinct n-grams per
touched row), the row-norm distribution of touched and untouched rows, and the most-read rows
decoded back to their n-grams. Head j of a layer hashes the n-grams of order
n = 2 + j // heads_per_ngram (order-major, as `NgramHasher` lays them out).
"""

from __future__ import annotations

import dataclasses
import os

import matplotlib
import numpy as np
import tokenizers

from engram_jax.hashing import EngramHashing

matplotlib.use("Agg")
import matplotlib.pyplot as plt

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# Raw-token marker of the positions before a window's start (the hash reads the pad id there).
BEFORE_START = -1
_START_TEXT = "<start>"


@dataclasses.dataclass(frozen=True)
class HeadUsage:
  """What a corpus reads from one hash head.

  Attributes:
    layer: the Engram layer.
    head: j, the head's index within the layer.
    order: n, the n-gram order it hashes.
    offset: its first row in the layer's flat table.
    reads: [size] int64, reads of each of the head's rows (positions that hashed to it).
    ngram_rows: [K] the head row of each distinct (row, n-gram) pair, sorted by row.
    ngrams: [K, n] those n-grams' compressed ids (the pad id before a window's start).
    ngram_reads: [K] positions that read each pair.
    ngram_raw: [K, n] the raw token ids of each pair's first occurrence (-1 before the start).
  """

  layer: int
  head: int
  order: int
  offset: int
  reads: np.ndarray
  ngram_rows: np.ndarray
  ngrams: np.ndarray
  ngram_reads: np.ndarray
  ngram_raw: np.ndarray

  @property
  def size(self) -> int:
    return int(self.reads.size)

  @property
  def rows_touched(self) -> int:
    return int(np.count_nonzero(self.reads))

  def ngrams_per_row(self) -> np.ndarray:
    """[size] int64: distinct n-grams that hashed to each row."""
    return np.bincount(self.ngram_rows, minlength=self.size)


def suffix_ngrams(ids: np.ndarray, order: int, fill: int) -> np.ndarray:
  """The n-gram ending at every position: ids [N, T] -> [N, T, n], `fill` before the start.

  Entry k of position t is ids[t - n + 1 + k].
  """
  n_seq, t = ids.shape
  out = np.full((n_seq, t, order), fill, np.int64)
  for k in range(order):
    lag = order - 1 - k
    if lag < t:
      out[:, lag:, k] = ids[:, : t - lag]  # [N, T - lag] -> positions lag..T-1
  return out


def table_usage(hashing: EngramHashing, tokens: np.ndarray) -> list[HeadUsage]:
  """Hashes raw token windows [N, T] and records every head's row reads and row -> n-grams.

  Raises:
    ValueError: tokens that are not [N, T] ids of the tokenizer.
  """
  tokens = np.asarray(tokens, np.int64)
  if tokens.ndim != 2:
    raise ValueError(f"tokens: expected windows [N, T], got shape {tokens.shape}")
  hasher = hashing.hasher
  compressed = hashing.compressor(tokens)  # [N, T]
  hash_ids = hasher.hash_all(compressed)  # {layer: [N, T, H]}
  grams, raws = {}, {}
  for n in range(2, hasher.max_ngram_size + 1):
    # [N, T, n] -> [P, n], P = N * T positions
    grams[n] = suffix_ngrams(compressed, n, hasher.pad_id).reshape(-1, n)
    raws[n] = suffix_ngrams(tokens, n, BEFORE_START).reshape(-1, n)
  usage = []
  for layer, layout in sorted(hashing.layouts.items()):
    for j, size in enumerate(layout.sizes):
      n = 2 + j // hasher.heads_per_ngram
      rows = hash_ids[layer][..., j].reshape(-1)  # [N, T] -> [P]
      pairs = np.concatenate([rows[:, None], grams[n]], axis=1)  # [P, 1 + n]
      uniq, first, counts = np.unique(pairs, axis=0, return_index=True, return_counts=True)
      usage.append(
        HeadUsage(
          layer=layer,
          head=j,
          order=n,
          offset=int(layout.offsets[j]),
          reads=np.bincount(rows, minlength=size).astype(np.int64),
          ngram_rows=uniq[:, 0],
          ngrams=uniq[:, 1:],
          ngram_reads=counts.astype(np.int64),
          ngram_raw=raws[n][first],
        )
      )
  return usage


def _decode(tokenizer: tokenizers.Tokenizer | None, raw: np.ndarray) -> dict:
  """{"tokens": each token's text, "text": the n-gram's text} of raw ids (-1: before start)."""
  ids = [int(i) for i in raw]
  if tokenizer is None:
    return {"tokens": [_START_TEXT if i < 0 else str(i) for i in ids], "text": None}
  texts = [_START_TEXT if i < 0 else tokenizer.decode([i]) for i in ids]
  return {"tokens": texts, "text": tokenizer.decode([i for i in ids if i >= 0])}


def _quantiles(x: np.ndarray) -> list[float] | None:
  return [float(v) for v in np.quantile(x, QUANTILES)] if x.size else None


def head_summary(
  usage: HeadUsage,
  table: np.ndarray,
  tokenizer: tokenizers.Tokenizer | None = None,
  top_rows: int = 10,
  ngrams_per_row: int = 5,
) -> dict:
  """The JSON summary of one head (see the module docstring).

  Args:
    usage: the head's usage.
    table: the layer's flat table [R, Dh].
    tokenizer: decodes the n-grams of the most-read rows (None: raw ids only).
    top_rows: how many of the most-read rows to list.
    ngrams_per_row: n-grams listed per row (the most read first).
  """
  rows = np.asarray(table[usage.offset : usage.offset + usage.size], np.float64)  # [size, Dh]
  norms = np.linalg.norm(rows, axis=1)
  touched = usage.reads > 0
  per_row = usage.ngrams_per_row()
  top = np.argsort(-usage.reads, kind="stable")[: min(top_rows, usage.rows_touched)]
  starts = np.searchsorted(usage.ngram_rows, top)  # pairs are sorted by row
  ends = np.searchsorted(usage.ngram_rows, top, side="right")
  listed = []
  for r, a, b in zip(top, starts, ends, strict=True):
    order = a + np.argsort(-usage.ngram_reads[a:b], kind="stable")[:ngrams_per_row]
    listed.append(
      {
        "row": int(usage.offset + r),
        "head_row": int(r),
        "reads": int(usage.reads[r]),
        "distinct_ngrams": int(b - a),
        "ngrams": [
          {**_decode(tokenizer, usage.ngram_raw[k]), "reads": int(usage.ngram_reads[k])}
          for k in order
        ],
      }
    )
  n_touched = usage.rows_touched
  return {
    "head": usage.head,
    "order": usage.order,
    "size": usage.size,
    "offset": usage.offset,
    "reads": int(usage.reads.sum()),
    "rows_touched": n_touched,
    "touched_fraction": n_touched / usage.size,
    "distinct_ngrams": int(usage.ngram_rows.size),
    "ngrams_per_touched_row": usage.ngram_rows.size / n_touched if n_touched else None,
    "rows_with_collisions": int(np.count_nonzero(per_row >= 2)),
    "max_ngrams_per_row": int(per_row.max(initial=0)),
    "row_norms": {
      "quantiles": list(QUANTILES),
      "touched": _quantiles(norms[touched]),
      "untouched": _quantiles(norms[~touched]),
    },
    "top_rows": listed,
  }


def table_diagnostics(
  usage: list[HeadUsage],
  tables: dict[int, np.ndarray],
  tokenizer: tokenizers.Tokenizer | None = None,
  top_rows: int = 10,
  ngrams_per_row: int = 5,
) -> dict:
  """Per Engram layer, the summary of every head (`head_summary`) and the layer's totals.

  Returns:
    {str(layer): {"rows", "rows_touched", "touched_fraction", "heads": [head summaries]}}.
  """
  out = {}
  for layer in sorted({u.layer for u in usage}):
    heads = [
      head_summary(u, tables[layer], tokenizer, top_rows, ngrams_per_row)
      for u in usage
      if u.layer == layer
    ]
    touched = sum(h["rows_touched"] for h in heads)
    rows = sum(h["size"] for h in heads)
    out[str(layer)] = {
      "rows": rows,
      "rows_touched": touched,
      "touched_fraction": touched / rows,
      "heads": heads,
    }
  return out


def write_row_norm_png(
  usage: list[HeadUsage], tables: dict[int, np.ndarray], path: str | os.PathLike
) -> None:
  """Histograms of the row norms of touched and untouched rows, one panel per Engram layer."""
  layers = sorted({u.layer for u in usage})
  fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 4), dpi=110, squeeze=False)
  for ax, layer in zip(axes[0], layers, strict=True):
    norms = np.linalg.norm(np.asarray(tables[layer], np.float64), axis=1)  # [R, Dh] -> [R]
    touched = np.zeros(norms.size, bool)
    for u in usage:
      if u.layer == layer:
        touched[u.offset : u.offset + u.size] = u.reads > 0
    bins = np.linspace(norms.min(), norms.max() + 1e-12, 50)
    ax.hist(norms[~touched], bins=bins, alpha=0.6, label=f"untouched ({np.sum(~touched)})")
    ax.hist(norms[touched], bins=bins, alpha=0.6, label=f"touched ({np.sum(touched)})")
    ax.set_yscale("log")
    ax.set_xlabel("row norm")
    ax.set_ylabel("rows")
    ax.set_title(f"Engram table, block {layer}")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
