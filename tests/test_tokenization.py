"""Tests for engram_jax/tokenization.py against the official demo's lookup table."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from engram_jax import tokenization
from engram_jax.tokenization import TokenizerCompressor


@pytest.fixture(scope="module")
def compressor(demo_tokenizer_path):
  return TokenizerCompressor.from_file(demo_tokenizer_path)


def test_lookup_equals_reference(compressor, demo_vectors):
  _, _, arrays = demo_vectors
  np.testing.assert_array_equal(compressor.lookup, arrays["lookup"])
  assert compressor.lookup.dtype == np.int64
  assert compressor.num_compressed == int(arrays["num_compressed"]) == 4819


def test_call_maps_and_passes_negative_ids(compressor):
  ids = np.array([[0, 5, -1], [5999, -7, 12]])
  out = compressor(ids)
  assert out.shape == ids.shape
  np.testing.assert_array_equal(out[ids < 0], ids[ids < 0])
  np.testing.assert_array_equal(out[ids >= 0], compressor.lookup[ids[ids >= 0]])


def test_normalisation_merges_case_accents_and_space(tmp_path):
  vocab = {"Hello": 0, "hello": 1, "HÉLLO": 2, "\n\t": 3, "  ": 4, "x": 5, "café": 6, "cafe": 7}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="x"))
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  c = TokenizerCompressor.from_file(path)
  # Ids are handed out by first appearance: hello=0, whitespace=1, x=2, cafe=3.
  np.testing.assert_array_equal(c.lookup, [0, 0, 0, 1, 1, 2, 3, 3])
  assert c.keys == ("hello", " ", "x", "cafe")


def test_rejects_out_of_vocab_and_non_integer_ids(compressor):
  with pytest.raises(ValueError, match="vocabulary size 6000"):
    compressor(np.array([1, 6000]))
  with pytest.raises(ValueError, match="integer"):
    compressor(np.array([1.0, 2.0]))


def test_missing_and_invalid_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.json"):
    TokenizerCompressor.from_file(tmp_path / "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"not": "a tokenizer"}))
  with pytest.raises(ValueError, match="not a Hugging Face tokenizer"):
    TokenizerCompressor.from_file(bad)


def test_stats_and_cli(compressor, demo_tokenizer_path, capsys):
  tok = tokenization.load_tokenizer(demo_tokenizer_path)
  stats = tokenization.compression_stats(compressor, tok, top=5)
  assert stats.reduction == pytest.approx(1 - 4819 / 6000)
  sizes = [len(raws) for _, raws in stats.top_groups]
  assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1
  assert tokenization.main(["prog", str(demo_tokenizer_path)]) == 0
  out = capsys.readouterr().out
  assert "19.68%" in out and "4,819" in out
