"""Tests for engram_jax/train/loop.py, checkpoint.py and compare.py on the `tiny` preset."""

import dataclasses
import json
import signal

import jax
import numpy as np
import pytest

from engram_jax import presets
from engram_jax.run.checkpoint import Checkpointer
from engram_jax.train import compare, loop


@pytest.fixture(scope="module")
def uninterrupted(tiny_run):
  workdir, _, results = tiny_run
  return workdir, results


def _losses(workdir):
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_outputs_written(uninterrupted):
  workdir, results = uninterrupted
  assert np.isfinite(results["val_loss"]) and results["tokens_per_sec"] > 0
  assert (
    results["params"]["p_tot"] + results["params"]["embedding"] + results["params"]["lm_head"]
    == results["params"]["total"]
  )
  assert sorted(_losses(workdir)) == [1, 2, 3, 4, 5, 6]
  assert (workdir / "loss_curve.png").stat().st_size > 1000
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["val_loss"] == results["val_loss"]
  assert Checkpointer(workdir / "checkpoints").steps() == [3, 6]


def test_sigterm_saves_and_resume_matches_uninterrupted(small_corpus, tmp_path, uninterrupted):
  full_dir, full = uninterrupted

  def stop_at_two(step):
    if step == 2:
      signal.raise_signal(signal.SIGTERM)

  with pytest.raises(loop.Interrupted, match="step 2"):
    loop.train(
      presets.tiny(), tmp_path, corpus_files=(small_corpus,), progress=False, on_step=stop_at_two
    )
  assert Checkpointer(tmp_path / "checkpoints").steps() == [2]
  resumed = loop.train(
    presets.tiny(), tmp_path, corpus_files=(small_corpus,), progress=False, resume=True
  )
  want, got = _losses(full_dir), _losses(tmp_path)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  for step in (3, 4, 5, 6):
    assert got[step] == want[step], step
  assert resumed["val_loss"] == full["val_loss"]


def test_corrupted_latest_checkpoint_falls_back(uninterrupted, tiny_checkpoint_tree, tmp_path):
  workdir, _ = uninterrupted
  import shutil

  copy = tmp_path / "checkpoints"
  shutil.copytree(workdir / "checkpoints", copy)
  for f in (copy / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0garbage")
  restored = Checkpointer(copy).restore_latest(tiny_checkpoint_tree)
  assert restored is not None and restored[0] == 3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
  small_corpus, tiny_checkpoint_tree, tmp_path
):
  exp = presets.tiny()
  exp = dataclasses.replace(
    exp,
    optim=dataclasses.replace(exp.optim, lr=1e30, warmup_steps=3),
    train=dataclasses.replace(exp.train, steps=20, checkpoint_every=1, eval_every=100),
  )
  with pytest.raises(loop.TrainingDiverged, match="last good checkpoint"):
    loop.train(exp, tmp_path, corpus_files=(small_corpus,), progress=False)
  ckpt = Checkpointer(tmp_path / "checkpoints")
  steps = ckpt.steps()
  assert steps and max(steps) < 20
  _, state, _, _ = ckpt.restore_latest(tiny_checkpoint_tree)  # tiny's shapes: batch 2, length 32
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_compare_baseline_writes_both(small_corpus, tmp_path):
  exp = presets.tiny()
  exp = dataclasses.replace(
    exp, train=dataclasses.replace(exp.train, steps=2, eval_every=2, checkpoint_every=2)
  )
  results = compare.train_and_compare(exp, tmp_path, corpus_files=(small_corpus,), progress=False)
  assert results["val_loss_difference"] == pytest.approx(
    results["val_loss"] - results["baseline_val_loss"]
  )
  assert results["baseline"]["params"]["engram_tables"] == 0
  assert (tmp_path / "loss_curves.png").exists()
  assert "MoE baseline" in compare.format_comparison(results)
