"""Tokenizer compression: the surjective map P: V -> V' of paper §2.2 (spec §1).

Raw token ids that decode to the same text after normalisation (NFKC, NFD, accent stripping,
lower-casing, whitespace collapsing, stripping) share one compressed id, so the n-gram hash sees
"Apple", " apple" and "APPLE" as one token. The map is built once, offline, from any Hugging Face
`tokenizer.json`; applying it is a NumPy table lookup on the host.

Run `python -m engram_jax.tokenization TOKENIZER.json` for the compression ratio and the
largest merged groups (as in the paper's Table 6).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys

import numpy as np
import tokenizers
from tokenizers import Regex, normalizers

# A private-use code point stands in for "the whole text was one space" so that `Strip` does not
# erase it; it is turned back into a space afterwards.
_SENTINEL = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"


def _normalizer() -> normalizers.Normalizer:
  return normalizers.Sequence(
    [
      normalizers.NFKC(),
      normalizers.NFD(),
      normalizers.StripAccents(),
      normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), _SENTINEL),
      normalizers.Strip(),
      normalizers.Replace(_SENTINEL, " "),
    ]
  )


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """Loads a Hugging Face `tokenizer.json`.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not a tokenizer.json.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path!r} (expected a tokenizer.json)")
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed files.
    raise ValueError(
      f"{path!r} is not a Hugging Face tokenizer.json (expected the JSON written by "
      f"`tokenizers.Tokenizer.save`): {e}"
    ) from e


def token_key(tok: tokenizers.Tokenizer, norm: normalizers.Normalizer, tid: int) -> str:
  """The normalised text that decides which compressed id raw id `tid` gets."""
  text = tok.decode([tid], skip_special_tokens=False)
  if _REPLACEMENT_CHAR in text:
    # A partial UTF-8 sequence: keep byte-level tokens apart by their raw token string.
    return tok.id_to_token(tid)
  return norm.normalize_str(text) or text


@dataclasses.dataclass(frozen=True)
class TokenizerCompressor:
  """Maps raw token ids to compressed ids.

  Attributes:
    lookup: int64 [V], raw id -> compressed id.
    num_compressed: V', the number of compressed ids.
    keys: the normalised text of each compressed id, in id order.
  """

  lookup: np.ndarray
  num_compressed: int
  keys: tuple[str, ...] = ()

  @classmethod
  def from_tokenizer(cls, tok: tokenizers.Tokenizer) -> TokenizerCompressor:
    """Builds the map from a loaded tokenizer (spec §1: first appearance order)."""
    norm = _normalizer()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    key_to_id: dict[str, int] = {}
    lookup = np.empty(vocab_size, dtype=np.int64)
    for tid in range(vocab_size):
      key = token_key(tok, norm, tid)
      lookup[tid] = key_to_id.setdefault(key, len(key_to_id))
    return cls(lookup=lookup, num_compressed=len(key_to_id), keys=tuple(key_to_id))

  @classmethod
  def identity(cls, vocab_size: int) -> TokenizerCompressor:
    """No compression: every raw id is its own compressed id (the paper's ablation)."""
    return cls(lookup=np.arange(vocab_size, dtype=np.int64), num_compressed=int(vocab_size))

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> TokenizerCompressor:
    """Builds the map from a `tokenizer.json` (offline)."""
    return cls.from_tokenizer(load_tokenizer(path))

  @property
  def vocab_size(self) -> int:
    """V, the raw vocabulary size."""
    return int(self.lookup.shape[0])

  def __call__(self, ids) -> np.ndarray:
    """Compresses raw ids of any shape; negative ids (padding markers) pass through.

    Raises:
      ValueError: non-integer ids, or ids >= the raw vocabulary size.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"token ids: expected an integer array, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and int(ids.max()) >= self.vocab_size:
      raise ValueError(
        f"token ids: expected raw ids < the tokenizer's vocabulary size {self.vocab_size}, "
        f"got max id {int(ids.max())}"
      )
    return np.where(ids >= 0, self.lookup[np.maximum(ids, 0)], ids)


@dataclasses.dataclass(frozen=True)
class CompressionStats:
  """Summary of a compression map.

  Attributes:
    vocab_size: V.
    num_compressed: V'.
    reduction: 1 - V' / V (the paper reports 23.43% for DeepSeek-V3's tokenizer).
    top_groups: the largest merged groups: (normalised key, [raw token strings]).
  """

  vocab_size: int
  num_compressed: int
  reduction: float
  top_groups: tuple[tuple[str, tuple[str, ...]], ...]


def compression_stats(
  compressor: TokenizerCompressor, tok: tokenizers.Tokenizer, top: int = 10
) -> CompressionStats:
  """Counts how much the map merges and lists its largest groups."""
  groups: dict[int, list[int]] = collections.defaultdict(list)
  for tid, cid in enumerate(compressor.lookup.tolist()):
    groups[cid].append(tid)
  largest = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
  top_groups = tuple(
    (
      compressor.keys[cid] if compressor.keys else str(cid),
      tuple(tok.decode([t], skip_special_tokens=False) for t in tids),
    )
    for cid, tids in largest
  )
  v, vc = compressor.vocab_size, compressor.num_compressed
  return CompressionStats(v, vc, 1.0 - vc / v, top_groups)


def format_stats(stats: CompressionStats) -> str:
  """A human-readable report of `compression_stats`."""
  lines = [
    f"raw vocabulary:        {stats.vocab_size:,}",
    f"compressed vocabulary: {stats.num_compressed:,}",
    f"reduction:             {100 * stats.reduction:.2f}%",
    "",
    f"{'normalised':<16} {'merged':>6}  raw tokens",
  ]
  for key, raws in stats.top_groups:
    shown = ", ".join(json.dumps(r, ensure_ascii=False) for r in raws[:8])
    more = f", ... (+{len(raws) - 8})" if len(raws) > 8 else ""
    lines.append(f"{json.dumps(key, ensure_ascii=False):<16} {len(raws):>6}  {shown}{more}")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    sys.stderr.write("usage: python -m engram_jax.tokenization TOKENIZER.json\n")
    return 2
  tok = load_tokenizer(argv[1])
  stats = compression_stats(TokenizerCompressor.from_tokenizer(tok), tok)
  sys.stdout.write(format_stats(stats) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
