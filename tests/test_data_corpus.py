"""Tests for engram_jax/data/corpus.py: reading files and the embedded corpus."""

import gzip
import lzma

import pytest

from engram_jax.data import corpus

TEXT = "Genesis 1\nIn the beginning.\nAnd light.\n\nGenesis 2\nThus the heavens.\n"


def _write(path, text):
  opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(text)
  return path


@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz", "c.txt.xz"])
def test_read_text_plain_gz_xz(tmp_path, name):
  path = _write(tmp_path / name, TEXT + "café ☃\n")
  assert corpus.read_text(path) == TEXT + "café ☃\n"
  assert corpus.read_text(str(path)) == TEXT + "café ☃\n"


def test_compressed_file_is_really_decompressed(tmp_path):
  path = _write(tmp_path / "c.txt.xz", TEXT)
  assert path.read_bytes()[:6] == b"\xfd7zXZ\x00"  # The xz magic: the file is compressed.
  assert corpus.read_text(path) == TEXT


def test_missing_file_names_the_path(tmp_path):
  missing = tmp_path / "nope" / "corpus.txt.gz"
  with pytest.raises(FileNotFoundError, match=r"nope/corpus\.txt\.gz"):
    corpus.read_text(missing)
  with pytest.raises(FileNotFoundError, match=r"nope/corpus\.txt\.gz"):
    corpus.read_corpus([_write(tmp_path / "ok.txt", TEXT), missing])


def test_empty_corpus_raises(tmp_path):
  empty = _write(tmp_path / "empty.txt.gz", " \n\n ")
  with pytest.raises(ValueError, match=r"empty\.txt\.gz"):
    corpus.read_corpus([_write(tmp_path / "a.txt", TEXT), empty])
  with pytest.raises(ValueError, match="no corpus files"):
    corpus.read_corpus([])


def test_read_corpus_keeps_file_order(tmp_path):
  a = _write(tmp_path / "a.txt", "first\n")
  b = _write(tmp_path / "b.txt.xz", "second\n")
  assert corpus.read_corpus([b, a]) == ["second\n", "first\n"]
  assert corpus.read_corpus(a) == ["first\n"]


def test_split_documents():
  assert corpus.split_documents(TEXT) == [
    "Genesis 1\nIn the beginning.\nAnd light.",
    "Genesis 2\nThus the heavens.",
  ]
  assert corpus.split_documents("\n\n\na\n\n\n\n \n\nb\n") == ["a", "b"]
  assert corpus.split_documents(TEXT, None) == [TEXT.strip("\n")]
  assert corpus.split_documents("x\ny\n", "\n") == ["x", "y"]


def test_read_documents_file_boundary_is_a_document_boundary(tmp_path):
  a = _write(tmp_path / "a.txt", "one\ntwo")
  b = _write(tmp_path / "b.txt.gz", "three\n\nfour\n")
  assert corpus.read_documents([a, b]) == ["one\ntwo", "three", "four"]
  assert corpus.read_documents([a, b], None) == ["one\ntwo", "three\n\nfour"]


def test_embedded_corpus_structure():
  path = corpus.default_corpus_path()
  assert path.name == "kjv.txt.xz" and path.parent.name == "data"
  assert path.stat().st_size < 2_000_000
  docs = corpus.read_documents(path)
  assert len(docs) == 1189  # Chapters of the Bible.
  assert docs[0].split("\n")[:2] == [
    "Genesis 1",
    "In the beginning God created the heaven and the earth.",
  ]
  assert docs[-1].split("\n")[0] == "Revelation 22"
  assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
  verses = sum(len(d.split("\n")) - 1 for d in docs)  # Minus the heading line.
  assert verses == 31102
  assert all(d.isascii() and "  " not in d for d in docs)


def test_embedded_tokenizer_path():
  path = corpus.default_tokenizer_path()
  assert path.name == "tokenizer.json" and path.is_file()
