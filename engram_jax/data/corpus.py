"""Reading text corpora: plain, gzip or xz files, split into documents.

The training pipeline and the tokenizer trainer both read text through this module, so that they
agree on what a document is: a chunk of text between blank lines (the default separator
`"\\n\\n"`), or one whole file when no separator is given. The embedded default corpus and
tokenizer live in the repository's top-level `data/` folder and are found relative to this file;
that works from a checkout and from an editable install (`pip install -e .`), which is the
supported way to install the project.
"""

from __future__ import annotations

import gzip
import lzma
import os
from collections.abc import Sequence
from pathlib import Path

# engram_jax/data/corpus.py -> parents[2] is the repository root.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_CORPUS = "kjv.txt.xz"
DEFAULT_TOKENIZER = "tokenizer.json"
DEFAULT_SEPARATOR = "\n\n"

PathLike = str | os.PathLike


def _embedded(name: str) -> Path:
  path = DATA_DIR / name
  if not path.is_file():
    raise FileNotFoundError(
      f"embedded data file not found: {str(path)!r}. The default corpus and tokenizer live in "
      "the repository's data/ folder; install the project from a checkout with "
      "`pip install -e .` (a non-editable install does not ship them)."
    )
  return path


def default_corpus_path() -> Path:
  """Path of the embedded default corpus (the King James Bible, xz-compressed)."""
  return _embedded(DEFAULT_CORPUS)


def default_tokenizer_path() -> Path:
  """Path of the embedded byte-level BPE tokenizer trained on the default corpus."""
  return _embedded(DEFAULT_TOKENIZER)


def as_path_list(paths: PathLike | Sequence[PathLike]) -> list[Path]:
  """Normalises one path or a sequence of paths to a list of `Path`s.

  Args:
    paths: a path, or a sequence of paths.

  Returns:
    The paths as a list (a single path becomes a one-element list).

  Raises:
    ValueError: the sequence is empty.
  """
  if isinstance(paths, (str, os.PathLike)):
    return [Path(paths)]
  out = [Path(p) for p in paths]
  if not out:
    raise ValueError("no corpus files given (expected at least one path)")
  return out


def read_text(path: PathLike) -> str:
  """Reads one UTF-8 text file; `.gz` and `.xz` files are decompressed on the fly.

  Args:
    path: the file; its suffix (`.gz`, `.xz`, anything else = plain) picks the decoder.

  Returns:
    The whole text, with universal newlines (`\\r\\n` becomes `\\n`).

  Raises:
    FileNotFoundError: the file does not exist (the message names it).
    ValueError: the file is not UTF-8 text (the message names the file and the byte offset),
      or a `.gz`/`.xz` file does not decompress.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"corpus file not found: {str(path)!r}")
  suffix = path.suffix.lower()
  if suffix == ".gz":
    opener = gzip.open
  elif suffix == ".xz":
    opener = lzma.open
  else:
    opener = open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, lzma.LZMAError) as e:
    if suffix in (".gz", ".xz") and not isinstance(e, FileNotFoundError | PermissionError):
      raise ValueError(f"corpus file {str(path)!r} is not a valid {suffix} file: {e}") from e
    raise
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    where = " (after decompression)" if suffix in (".gz", ".xz") else ""
    raise ValueError(
      f"corpus file {str(path)!r} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset "
      f"{e.start}{where} ({e.reason}); expected a UTF-8 text file"
    ) from None
  return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines


def read_corpus(paths: PathLike | Sequence[PathLike]) -> list[str]:
  """Reads one or more text files.

  Args:
    paths: one path or a sequence of paths (plain, `.gz` or `.xz`).

  Returns:
    One string per file, in the order given.

  Raises:
    FileNotFoundError: a file does not exist.
    ValueError: no path was given, or a file holds no text (only whitespace).
  """
  texts = []
  for path in as_path_list(paths):
    text = read_text(path)
    if not text.strip():
      raise ValueError(f"corpus file {str(path)!r} is empty (no text to train on)")
    texts.append(text)
  return texts


def split_documents(text: str, separator: str | None = DEFAULT_SEPARATOR) -> list[str]:
  """Splits text into documents at `separator`, dropping empty ones.

  Each document keeps its inner newlines; newlines at its ends are removed, so that a document
  boundary is marked only by the end-of-document token the pipeline inserts.

  Args:
    text: the text.
    separator: the document separator (default a blank line); None or "" keeps the whole text
      as one document.

  Returns:
    The non-empty documents in order.
  """
  chunks = text.split(separator) if separator else [text]
  return [doc for doc in (c.strip("\n") for c in chunks) if doc.strip()]


def read_documents(
  paths: PathLike | Sequence[PathLike], separator: str | None = DEFAULT_SEPARATOR
) -> list[str]:
  """Reads files and splits each into documents (a file boundary is always a document boundary).

  Args:
    paths: one path or a sequence of paths (plain, `.gz` or `.xz`).
    separator: the document separator within a file (see `split_documents`).

  Returns:
    All documents, file by file, in order.

  Raises:
    FileNotFoundError: a file does not exist.
    ValueError: no path was given, or a file holds no text.
  """
  docs = []
  for text in read_corpus(paths):
    docs.extend(split_documents(text, separator))
  return docs
