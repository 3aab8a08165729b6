"""Training a byte-level BPE tokenizer offline (Hugging Face `tokenizers`).

The embedded `data/tokenizer.json` was made with `train_tokenizer` on the default corpus. The
tokenizer is byte-level (any UTF-8 text encodes, nothing is unknown and decoding is lossless),
has no normaliser (the text is kept as written) and puts its special tokens first, so their
ids are fixed: `<|pad|>` = 0 (the model's `pad_token_id`), `<|bos|>` = 1, `<|eos|>` = 2.
Training is deterministic: the same files and arguments give a byte-identical tokenizer.json.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from absl import logging
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from engram_jax.data import corpus

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
DEFAULT_VOCAB_SIZE = 8192
# Every byte has a token of its own, plus the special tokens: the smallest vocabulary possible.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """Raw ids of the special tokens of a tokenizer."""

  pad: int
  bos: int
  eos: int


def special_token_ids(tok: tokenizers.Tokenizer) -> SpecialTokenIds:
  """Looks up the ids of `<|pad|>`, `<|bos|>` and `<|eos|>`.

  Args:
    tok: a tokenizer that has the three special tokens.

  Returns:
    Their raw ids.

  Raises:
    ValueError: a special token is missing (the tokenizer was not made by `train_tokenizer`).
  """
  ids = {}
  for name in SPECIAL_TOKENS:
    tid = tok.token_to_id(name)
    if tid is None:
      raise ValueError(
        f"tokenizer has no {name!r} token; expected one made by train_tokenizer with the "
        f"special tokens {SPECIAL_TOKENS}"
      )
    ids[name] = tid
  return SpecialTokenIds(pad=ids[PAD_TOKEN], bos=ids[BOS_TOKEN], eos=ids[EOS_TOKEN])


def new_byte_level_bpe() -> tokenizers.Tokenizer:
  """An untrained byte-level BPE tokenizer (GPT-2 style pre-tokenizer, no prefix space)."""
  tok = tokenizers.Tokenizer(models.BPE())
  # No prefix space: the text decodes back to exactly what was encoded.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  return tok


def train_tokenizer_on_documents(
  documents: Sequence[str],
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  *,
  min_frequency: int = 2,
  show_progress: bool = True,
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE tokenizer on in-memory documents.

  Args:
    documents: the training texts.
    vocab_size: the largest vocabulary wanted, special tokens and the 256 bytes included. A
      small corpus may run out of pairs to merge first (then the vocabulary is smaller and a
      warning is logged).
    min_frequency: a pair must occur at least this often to be merged.
    show_progress: show a progress bar over the documents and the trainer's own bars.

  Returns:
    The trained tokenizer, special tokens at ids 0 (`<|pad|>`), 1 (`<|bos|>`), 2 (`<|eos|>`).

  Raises:
    ValueError: vocab_size is below 259 (256 bytes + 3 special tokens), min_frequency < 1, or
      there are no documents.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(
      f"vocab_size: expected >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
      f"tokens), got {vocab_size}"
    )
  if min_frequency < 1:
    raise ValueError(f"min_frequency: expected >= 1, got {min_frequency}")
  if not documents:
    raise ValueError("no documents to train the tokenizer on")
  tok = new_byte_level_bpe()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=list(SPECIAL_TOKENS),
    # All 256 byte symbols, seen in the corpus or not, so that any text can be encoded.
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=show_progress,
  )
  docs = tqdm(documents, desc="tokenizer: counting", unit="doc", disable=not show_progress)
  tok.train_from_iterator(docs, trainer=trainer, length=len(documents))
  got = tok.get_vocab_size()
  if got < vocab_size:
    logging.warning(
      "the corpus ran out of pairs to merge: vocabulary has %d ids, %d were asked for",
      got,
      vocab_size,
    )
  ids = special_token_ids(tok)
  if (ids.pad, ids.bos, ids.eos) != (0, 1, 2):  # The trainer adds special tokens first.
    raise RuntimeError(f"special tokens got unexpected ids {ids}")
  return tok


def train_tokenizer(
  files: corpus.PathLike | Sequence[corpus.PathLike],
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  out_path: corpus.PathLike | None = None,
  *,
  min_frequency: int = 2,
  separator: str | None = corpus.DEFAULT_SEPARATOR,
  show_progress: bool = True,
) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE tokenizer on text files and optionally saves it.

  Args:
    files: one or more text files (plain, `.gz` or `.xz`).
    vocab_size: the largest vocabulary wanted (see `train_tokenizer_on_documents`).
    out_path: where to write the tokenizer.json (parent folders are created); None: not saved.
    min_frequency: a pair must occur at least this often to be merged.
    separator: the document separator within a file (see `corpus.split_documents`).
    show_progress: show progress bars.

  Returns:
    The trained tokenizer.

  Raises:
    FileNotFoundError: an input file does not exist.
    ValueError: no input, an empty input file, or a bad vocab_size / min_frequency.
  """
  paths = corpus.as_path_list(files)
  docs = corpus.read_documents(paths, separator)
  logging.info(
    "training a %d-id tokenizer on %d documents from %d files", vocab_size, len(docs), len(paths)
  )
  tok = train_tokenizer_on_documents(
    docs, vocab_size, min_frequency=min_frequency, show_progress=show_progress
  )
  if out_path is not None:
    out = Path(os.fspath(out_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out), pretty=False)
    logging.info("wrote %s (%d ids)", out, tok.get_vocab_size())
  return tok
