"""Configuration dataclasses and named presets.

Every config is a frozen dataclass that checks its invariants in `__post_init__` and raises
`ValueError` naming the offending field. Presets are plain functions returning a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def _check(cond: bool, field: str, expected: str, got) -> None:
  if not cond:
    raise ValueError(f"{field}: expected {expected}, got {got!r}")


def check_engram_args(
    *,
    max_ngram_size: int,
    heads_per_ngram: int,
    table_bases: Sequence[int],
    layer_ids: Sequence[int],
    embed_per_ngram: int | None = None,
) -> None:
  """Validates the arguments shared by `EngramConfig` and `NgramHasher`.

  Raises:
    ValueError: naming the field and what was expected.
  """
  _check(
      isinstance(max_ngram_size, int) and max_ngram_size >= 2,
      "max_ngram_size", "an int >= 2 (bigrams at least)", max_ngram_size,
  )
  _check(
      isinstance(heads_per_ngram, int) and heads_per_ngram >= 1,
      "heads_per_ngram", "an int >= 1", heads_per_ngram,
  )
  bases = tuple(table_bases)
  _check(
      len(bases) == max_ngram_size - 1,
      "table_bases",
      f"one base per n-gram order 2..{max_ngram_size} ({max_ngram_size - 1} values)",
      bases,
  )
  for b in bases:
    _check(
        isinstance(b, (int,)) and not isinstance(b, bool) and b >= 2,
        "table_bases", "every base an int >= 2", bases,
    )
  ids = tuple(layer_ids)
  _check(len(ids) >= 1, "layer_ids", "at least one layer id", ids)
  for i in ids:
    _check(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0,
        "layer_ids", "non-negative int layer ids", ids,
    )
  _check(len(set(ids)) == len(ids), "layer_ids", "distinct layer ids", ids)
  if embed_per_ngram is not None:
    _check(
        isinstance(embed_per_ngram, int) and embed_per_ngram >= 1,
        "embed_per_ngram", "an int >= 1", embed_per_ngram,
    )
    _check(
        embed_per_ngram % heads_per_ngram == 0,
        "embed_per_ngram",
        f"a multiple of heads_per_ngram={heads_per_ngram}",
        embed_per_ngram,
    )


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Settings of the Engram memory (paper §2; spec §1-5).

  Attributes:
    max_ngram_size: N, the largest n-gram order hashed (orders 2..N).
    heads_per_ngram: K, hash heads per order.
    embed_per_ngram: width of all K heads of one order together; one head row is
      `embed_per_ngram // K` wide and the memory vector `(N - 1) * embed_per_ngram`.
    table_bases: one base per order (2..N); every head's table size is a distinct prime
      above its order's base.
    layer_ids: 0-based indices of the transformer blocks that carry an Engram module.
    kernel_size: taps of the short depthwise causal convolution (dilation = N).
    pad_token_id: raw tokenizer id used for positions before the sequence start; the
      hasher receives its compressed id.
    seed: seed of the hash multipliers (layer `l` uses `seed + 10007 * l`).
  """

  max_ngram_size: int = 3
  heads_per_ngram: int = 8
  embed_per_ngram: int = 512
  table_bases: tuple[int, ...] = (129280 * 5, 129280 * 5)
  layer_ids: tuple[int, ...] = (1, 15)
  kernel_size: int = 4
  pad_token_id: int = 2
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "table_bases", tuple(self.table_bases))
    object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
    check_engram_args(
        max_ngram_size=self.max_ngram_size,
        heads_per_ngram=self.heads_per_ngram,
        table_bases=self.table_bases,
        layer_ids=self.layer_ids,
        embed_per_ngram=self.embed_per_ngram,
    )
    _check(
        isinstance(self.kernel_size, int) and self.kernel_size >= 1,
        "kernel_size", "an int >= 1", self.kernel_size,
    )
    _check(
        isinstance(self.pad_token_id, int) and self.pad_token_id >= 0,
        "pad_token_id", "a non-negative raw token id", self.pad_token_id,
    )

  @property
  def num_heads(self) -> int:
    """H: hash heads per Engram layer, all orders together."""
    return (self.max_ngram_size - 1) * self.heads_per_ngram

  @property
  def head_dim(self) -> int:
    """Dh: width of one head's row."""
    return self.embed_per_ngram // self.heads_per_ngram

  @property
  def memory_dim(self) -> int:
    """Dm: width of the concatenated memory vector e_t."""
    return self.num_heads * self.head_dim


# ---------------------------------------------------------------------------------------------
# Engram memory presets (paper §3-4, spec §6).
# ---------------------------------------------------------------------------------------------


def engram_27b_memory() -> EngramConfig:
  """Engram-27B: N=3, K=8, d_mem=1280, 2,262,400 rows per head at blocks 2 and 15 (1-based)."""
  return EngramConfig(
      max_ngram_size=3,
      heads_per_ngram=8,
      embed_per_ngram=640,
      table_bases=(2_262_400, 2_262_400),
      layer_ids=(1, 14),
      kernel_size=4,
      pad_token_id=2,
      seed=0,
  )


def engram_40b_memory() -> EngramConfig:
  """Engram-40B: as Engram-27B with 7,239,680 rows per head (18.5B table parameters)."""
  return dataclasses.replace(engram_27b_memory(), table_bases=(7_239_680, 7_239_680))


def tiny_memory() -> EngramConfig:
  """A memory small enough for unit tests: two layers, N=3, K=2, 16-wide heads."""
  return EngramConfig(
      max_ngram_size=3,
      heads_per_ngram=2,
      embed_per_ngram=32,
      table_bases=(1009, 503),
      layer_ids=(0, 1),
      kernel_size=4,
      pad_token_id=0,
      seed=0,
  )


MEMORY_PRESETS = {
    "tiny": tiny_memory,
    "engram_27b": engram_27b_memory,
    "engram_40b": engram_40b_memory,
}
