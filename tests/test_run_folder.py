"""Tests for engram_jax/run/folder.py and train/loop.prepare: a run's identity, the refusals that
keep a run from being overwritten, the metrics log and the divergence detector."""

import dataclasses
import json
import os

import pytest
from conftest import tree_snapshot

from engram_jax import errors, presets
from engram_jax.config import MemoryConfig
from engram_jax.data import default_corpus_path
from engram_jax.run import folder
from engram_jax.train import loop, monitors


def _prepare(exp, workdir, corpus, **kw):
  return loop.prepare(exp, workdir, loop.data_config(exp, corpus), **kw)


def test_run_json_records_the_identity(finished_run, small_corpus):
  workdir, *_ = finished_run
  record = json.loads((workdir / "run.json").read_text())
  assert record["preset"] == "tiny"
  assert record["config"]["model"]["vocab_size"] == 8192  # resolved from the tokenizer
  assert record["config"]["train"]["steps"] == record["steps"] == 6
  assert (record["seed"], record["batch_size"], record["seq_len"]) == (0, 2, 32)
  (corpus,) = record["corpus"]
  assert corpus["bytes"] == os.path.getsize(small_corpus) and len(corpus["sha256"]) == 64
  assert record["tokenizer"]["sha256"] == folder.file_digest(record["tokenizer"]["path"])["sha256"]
  assert record["version"] == "0.1.0"


def test_repeat_without_resume_is_refused(finished_run):
  workdir, corpus_file, _ = finished_run
  corpus = (corpus_file,)
  before = tree_snapshot(workdir)
  with pytest.raises(errors.RunExists, match=r"--resume.*--workdir.*--overwrite"):
    _prepare(presets.tiny(), workdir, corpus, resume=False)
  assert tree_snapshot(workdir) == before


def test_overwrite_moves_the_old_run_aside(finished_run):
  workdir, corpus_file, _ = finished_run
  corpus = (corpus_file,)
  before = tree_snapshot(workdir)
  prepared = _prepare(presets.tiny(), workdir, corpus, resume=False, overwrite=True)
  (old,) = [p for p in workdir.parent.iterdir() if p.name.startswith("run.old-")]
  assert tree_snapshot(old) == before and not workdir.exists()
  assert not prepared.resume and str(old) in prepared.notes[0]
  with pytest.raises(errors.UsageRefused, match="contradict"):
    _prepare(presets.tiny(), workdir, corpus, resume=True, overwrite=True)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_without_a_run_starts_one(tmp_path, small_corpus, make):
  workdir = tmp_path / "w"
  if make == "empty":
    workdir.mkdir()
  prepared = _prepare(presets.tiny(), workdir, (small_corpus,), resume=True)
  assert not prepared.resume and prepared.notes == (
    f"--resume: no run in {workdir}; starting a new one",
  )


def test_resume_refuses_another_model_or_data(finished_run, demo_tokenizer_path):
  workdir, corpus_file, _ = finished_run
  corpus = (corpus_file,)
  before = tree_snapshot(workdir)
  tiny = presets.tiny()
  wider = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, d_model=64))
  cases = [
    (wider, corpus, None, r"config\.model\.d_model = 32, this command gives 64"),
    (
      presets.get("cpu_small"),
      corpus,
      None,
      r"preset = 'tiny', this command gives 'cpu_small' \(and \d+ more",
    ),
    (tiny, (str(default_corpus_path()),), None, "corpus"),
    (tiny, corpus, demo_tokenizer_path, "tokenizer.sha256|vocab_size"),
    (
      dataclasses.replace(tiny, train=dataclasses.replace(tiny.train, seed=1)),
      corpus,
      None,
      "seed",
    ),
  ]
  for exp, files, tokenizer, message in cases:
    data_cfg = loop.data_config(exp, files, tokenizer)
    with pytest.raises(errors.RunMismatch, match=message):
      loop.prepare(exp, workdir, data_cfg, resume=True)
  assert tree_snapshot(workdir) == before


def test_resume_may_change_steps_and_rates(finished_run):
  workdir, corpus_file, _ = finished_run
  corpus = (corpus_file,)
  tiny = presets.tiny()
  longer = dataclasses.replace(
    tiny,
    train=dataclasses.replace(tiny.train, steps=9, eval_every=2),
    optim=dataclasses.replace(tiny.optim, lr=1e-3),
    memory=MemoryConfig(kind="host"),
  )
  prepared = _prepare(longer, workdir, corpus, resume=True)
  assert prepared.resume
  assert any("config.train.steps changes from 6 to 9" in n for n in prepared.notes)
  assert any("config.optim.lr changes" in n for n in prepared.notes)
  assert any("schedule is now that of 9 steps" in n for n in prepared.notes)
  shorter = dataclasses.replace(tiny, train=dataclasses.replace(tiny.train, steps=5))
  with pytest.raises(errors.RunMismatch, match="--steps=5 is below the newest checkpoint"):
    _prepare(shorter, workdir, corpus, resume=True)


def test_metrics_cut_back_drops_torn_lines_and_repeats(tmp_path):
  log = folder.MetricsLog(tmp_path / "metrics.jsonl")
  for step in (1, 2, 3):
    log.append({"step": step, "loss": float(step)})
  log.append({"step": 3, "val_loss": 1.0})
  log.append({"step": 2, "loss": 9.0})  # a repeat (written by a run that was cut short)
  log.append({"step": 4, "loss": 4.0})
  with open(log.path, "a") as f:
    f.write('{"step": 5, "lo')  # torn by a kill
  log.sync()
  log.cut_back(3)
  records = [json.loads(x) for x in log.path.read_text().splitlines()]
  assert records == [
    {"step": 1, "loss": 1.0},
    {"step": 2, "loss": 2.0},
    {"step": 3, "loss": 3.0},
    {"step": 3, "val_loss": 1.0},
  ]


def test_spike_detector():
  spikes = monitors.SpikeDetector(factor=4.0, window=5, after_step=2)
  assert spikes.check(1, 100.0) is None  # warm-up: never a spike
  for step, loss in enumerate([5.0, 4.0, 4.5, 4.2, 4.1], start=2):
    assert spikes.check(step, loss) is None
  assert spikes.check(7, 16.0) is None  # under 4x the median 4.2
  message = spikes.check(8, 1e11)
  assert "above 4x the median" in message and "step 8" in message
  assert monitors.SpikeDetector(factor=0, window=5, after_step=0).check(20, 1e30) is None


def test_throughput_leaves_out_only_pauses_between_its_steps(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(monitors.time, "perf_counter", lambda: now[0])
  clock = monitors.Throughput(tokens_per_step=100)

  def at(t, fn):
    now[0] = t
    return fn()

  with clock.paused():  # before timing began (the compiling first step): not counted
    at(5.0, lambda: None)
  assert at(10.0, lambda: clock.finished(1)) == 0.0 and clock.rate() is None
  assert at(11.0, lambda: clock.finished(2)) == 100.0
  with clock.paused():  # an evaluation between steps 2 and 3: left out
    at(15.0, lambda: None)
  assert at(16.0, lambda: clock.finished(3)) == 100.0  # 200 tokens in 6 s - 4 s paused
  with clock.paused():  # the final evaluation and checkpoint, after the last step
    at(30.0, lambda: None)
  assert clock.rate() == 100.0


def test_one_line_errors():
  code, line = errors.one_line(OSError(28, "No space left on device", "/x/ckpt"))
  assert (
    code == errors.EXIT_ERROR and line == "cannot write /x/ckpt: [Errno 28] No space left on device"
  )
  wrapped = ValueError("tensorstore: Error writing: FAILED_PRECONDITION: No space left on device")
  assert "[Errno 28]" in errors.one_line(wrapped)[1]
  assert errors.one_line(errors.Interrupted("signal 15: saved"))[0] == errors.EXIT_INTERRUPTED
  assert errors.one_line(errors.RunExists("a\nb")) == (errors.EXIT_USAGE, "a")


def test_records_from_before_a_field_existed_still_match(finished_run):
  workdir, *_ = finished_run
  record = json.loads((workdir / "run.json").read_text())
  old = json.loads(json.dumps(record))  # as a record written before these fields existed
  for key in ("form", "gate_eps", "gating", "short_conv", "compress_tokens"):
    del old["config"]["model"]["engram"][key]
  del old["config"]["model"]["moe"]["expert_exchange"]
  assert folder.compare(old, record) == ([], [])
  changed = json.loads(json.dumps(record))
  changed["config"]["model"]["engram"]["gating"] = "none"  # another model: still refused
  refused, _ = folder.compare(old, changed)
  assert refused == [("config.model.engram.gating", "multi", "none")]
