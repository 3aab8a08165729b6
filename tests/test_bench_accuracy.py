"""Tests for bench/accuracy.py on a `tiny` run trained for a few steps."""

import json
import math

import pytest

from bench import accuracy
from engram_jax import presets
from engram_jax.memory import storage


@pytest.fixture(scope="module")
def run(tiny_run):
  workdir, corpus, _ = tiny_run
  return workdir, corpus, accuracy.storage_accuracy(workdir, "tiny", corpus_files=corpus)


def test_float32_reproduces_the_trained_loss(run):
  workdir, _, result = run
  saved = json.loads((workdir / "results.json").read_text())["val_loss"]
  by_name = {r["storage"]: r for r in result["results"]}
  assert result["step"] == presets.tiny().train.steps
  assert result["trained_val_loss"] == pytest.approx(saved, abs=1e-6)
  assert by_name["float32"]["val_loss"] == pytest.approx(saved, abs=1e-6)
  assert by_name["float32"]["max_abs_error"] == 0.0
  assert by_name["float32"]["row_bytes"] == storage.row_bytes("float32", result["dim"])


def test_compact_types_cost_little_and_zeroed_differs(run):
  _, _, result = run
  by_name = {r["storage"]: r for r in result["results"]}
  measured = [s for s in storage.STORAGE_TYPES if s != "mxfp8"]
  assert [r["storage"] for r in result["results"]] == [*measured, accuracy.ZEROED]
  assert "divisible by 32, got 16" in result["skipped"]["mxfp8"]  # tiny rows are 16 wide
  f32 = by_name["float32"]["val_loss"]
  for name in ("bfloat16", "int8"):
    r = by_name[name]
    assert math.isfinite(r["val_loss"]) and abs(r["val_loss"] - f32) < 1e-2, r
    assert 0 < r["max_abs_error"] <= r["max_error_bound"] * (1 + 1e-6), r
    assert r["row_bytes"] < by_name["float32"]["row_bytes"]
  assert by_name[accuracy.ZEROED]["val_loss"] != f32
  text = accuracy.format_table(result)
  assert all(name in text for name in by_name)


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="make train"):
    accuracy.storage_accuracy(tmp_path / "missing", "tiny")
  assert not (tmp_path / "missing").exists()
