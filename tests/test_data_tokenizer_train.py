"""Tests for engram_jax/data/tokenizer_train.py and experiments/train_tokenizer.py."""

import lzma
import re

import pytest
import tokenizers
from absl import flags

from engram_jax.data import corpus, tokenizer_train
from experiments import train_tokenizer as train_tokenizer_script


@pytest.fixture(scope="module")
def small_text():
  """The first 12 chapters of the embedded corpus (about 35k characters)."""
  docs = corpus.read_documents(corpus.default_corpus_path())
  return "\n\n".join(docs[:12]) + "\n"


def test_train_round_trip_and_vocab_size(tmp_path, small_text):
  src = tmp_path / "small.txt"
  src.write_text(small_text)
  out = tmp_path / "sub" / "tok.json"
  tok = tokenizer_train.train_tokenizer([src], 400, out, show_progress=False)
  assert tok.get_vocab_size() == 400
  loaded = tokenizers.Tokenizer.from_file(str(out))
  assert loaded.to_str() == tok.to_str()
  ids = tokenizer_train.special_token_ids(loaded)
  assert (ids.pad, ids.bos, ids.eos) == (0, 1, 2)
  # Byte level: text never seen in training (accents, symbols, tabs) round-trips exactly.
  for text in [small_text[:2000], "café ☃ naïve\tZ\n\n  x", "In the beginning"]:
    assert loaded.decode(loaded.encode(text, add_special_tokens=False).ids) == text
  # Trained merges compress: far fewer tokens than bytes on the training text.
  n = len(loaded.encode(small_text[:5000]).ids)
  assert n < 5000 / 2


def test_small_corpus_caps_the_vocabulary(tmp_path):
  src = tmp_path / "tiny.txt"
  src.write_text("abab abab abab\n")
  tok = tokenizer_train.train_tokenizer(src, 1000, show_progress=False)
  assert tokenizer_train.MIN_VOCAB_SIZE <= tok.get_vocab_size() < 1000


def test_training_is_deterministic(small_text):
  docs = corpus.split_documents(small_text)
  a = tokenizer_train.train_tokenizer_on_documents(docs, 500, show_progress=False)
  b = tokenizer_train.train_tokenizer_on_documents(docs, 500, show_progress=False)
  assert a.to_str() == b.to_str()
  c = tokenizer_train.train_tokenizer_on_documents(docs[:6], 500, show_progress=False)
  assert c.to_str() != a.to_str()


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_train.train_tokenizer_on_documents(["abc"], 258)
  with pytest.raises(ValueError, match="min_frequency"):
    tokenizer_train.train_tokenizer_on_documents(["abc"], 300, min_frequency=0)
  with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
    tokenizer_train.train_tokenizer(tmp_path / "missing.txt", 300)


def test_special_token_ids_requires_the_tokens():
  tok = tokenizer_train.new_byte_level_bpe()
  with pytest.raises(ValueError, match=re.escape("<|pad|>")):
    tokenizer_train.special_token_ids(tok)


def test_shipped_tokenizer_matches_the_corpus():
  tok = tokenizers.Tokenizer.from_file(str(corpus.default_tokenizer_path()))
  assert tok.get_vocab_size() == 8192
  ids = tokenizer_train.special_token_ids(tok)
  assert (ids.pad, ids.bos, ids.eos) == (0, 1, 2)
  with lzma.open(corpus.default_corpus_path(), "rt", encoding="utf-8") as f:
    head = "".join(f.readline() for _ in range(40))
  enc = tok.encode(head, add_special_tokens=False)
  assert tok.decode(enc.ids) == head
  assert 0 not in enc.ids and max(enc.ids) < 8192
  # Trained on this text: common words are single tokens, about 4 characters per token.
  assert tok.encode("In the beginning God created", add_special_tokens=False).tokens == [
    "In",
    "Ġthe",
    "Ġbeginning",
    "ĠGod",
    "Ġcreated",
  ]
  assert len(head) / len(enc.ids) > 3.5


def test_script_main_takes_comma_lists_and_repeats(tmp_path, small_text):
  docs = corpus.split_documents(small_text)
  a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt.xz"
  a.write_text("\n\n".join(docs[:4]))
  b.write_text("\n\n".join(docs[4:8]))
  with lzma.open(c, "wt") as f:
    f.write("\n\n".join(docs[8:]))
  out = tmp_path / "tok.json"
  argv = ["prog", f"--input={a},{b}", f"--input={c}", "--vocab_size=450", f"--output={out}"]
  flags.FLAGS(argv)
  try:
    train_tokenizer_script.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  tok = tokenizers.Tokenizer.from_file(str(out))
  expected = tokenizer_train.train_tokenizer([a, b, c], 450, show_progress=False)
  assert tok.to_str() == expected.to_str()
