"""Tests for engram_jax/interop.py: the project's path against the official demo's output."""

import numpy as np
import pytest

from engram_jax.interop import ReferenceEngram


@pytest.fixture(scope="module")
def ref(demo_vectors, demo_tokenizer_path):
  config, state_dict, _ = demo_vectors
  return ReferenceEngram.from_demo(config, demo_tokenizer_path, state_dict)


def test_module_output_matches_demo(ref, demo_vectors):
  _, _, arrays = demo_vectors
  out = ref(arrays["hidden"], arrays["input_ids"])
  want = arrays["engram_out"]
  assert out.shape == want.shape == (3, 17, 4, 32)
  assert np.max(np.abs(out - want)) / np.max(np.abs(want)) < 1e-5


def test_hash_ids_and_offsets_match_demo(ref, demo_vectors):
  config, state_dict, arrays = demo_vectors
  assert ref.layer_id == config["module_layer"]
  np.testing.assert_array_equal(
    ref.hash_ids(arrays["input_ids"]), arrays[f"hash_layer{ref.layer_id}"]
  )
  np.testing.assert_array_equal(ref.layout.offsets, state_dict["multi_head_embedding.offsets"])


def test_ignores_unused_state_dict_keys(demo_vectors, demo_tokenizer_path):
  config, state_dict, arrays = demo_vectors
  extra = dict(state_dict, **{"unused.weight": np.zeros(3)})
  ref = ReferenceEngram.from_demo(dict(config, extra_key=1), demo_tokenizer_path, extra)
  out = ref(arrays["hidden"][:1], arrays["input_ids"][:1])
  np.testing.assert_allclose(out, arrays["engram_out"][:1], atol=1e-5)


def test_shape_errors(ref, demo_vectors):
  _, _, arrays = demo_vectors
  hidden, ids = arrays["hidden"], arrays["input_ids"]
  with pytest.raises(ValueError, match="hidden: expected shape"):
    ref(hidden[:, :, :2], ids)
  with pytest.raises(ValueError, match="hidden: expected shape"):
    ref(hidden[..., :16], ids)
  with pytest.raises(ValueError, match="input_ids: expected shape"):
    ref(hidden, ids[:, :5])
  with pytest.raises(ValueError, match="vocabulary size"):
    ref(hidden, np.full_like(ids, 6000))


def test_construction_errors(demo_vectors, demo_tokenizer_path, tmp_path):
  config, state_dict, _ = demo_vectors
  missing = {k: v for k, v in state_dict.items() if k != "value_proj.bias"}
  with pytest.raises(ValueError, match=r"value_proj\.bias"):
    ReferenceEngram.from_demo(config, demo_tokenizer_path, missing)
  with pytest.raises(ValueError, match="hc_mult"):
    ReferenceEngram.from_demo(
      {k: v for k, v in config.items() if k != "hc_mult"}, demo_tokenizer_path, state_dict
    )
  with pytest.raises(FileNotFoundError):
    ReferenceEngram.from_demo(config, tmp_path / "missing.json", state_dict)
  short = dict(state_dict)
  short["multi_head_embedding.embedding.weight"] = state_dict[
    "multi_head_embedding.embedding.weight"
  ][:-1]
  with pytest.raises(ValueError, match="table of shape"):
    ReferenceEngram.from_demo(config, demo_tokenizer_path, short)
