"""Fault injection on the training command (`experiments.train`, `tiny` preset, subprocesses):
kills at random moments, corrupt checkpoints and metrics, refused commands, a read-only path,
a full disk, bad data. A run is never lost, and every failure is one line on the terminal."""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tree_snapshot

from engram_jax import errors, presets
from engram_jax.run import folder
from engram_jax.run.checkpoint import CORRUPT, DIVERGED, Checkpointer
from engram_jax.train import loop

_FAST = ("--checkpoint_every=1",)


def _command(workdir, corpus, *flags):
  return [
    sys.executable,
    "-m",
    "experiments.train",
    "--preset=tiny",
    f"--corpus={corpus}",
    f"--workdir={workdir}",
    *flags,
  ]


def _train(workdir, corpus, *flags, **kw):
  return subprocess.run(
    _command(workdir, corpus, *flags), capture_output=True, text=True, timeout=300, **kw
  )


def _lines(stderr: str) -> list[str]:
  """The terminal's lines (progress-bar redraws split at carriage returns)."""
  return [x for x in stderr.replace("\r", "\n").splitlines() if x.strip()]


def _assert_one_line_error(r, code: int, *fragments: str):
  assert r.returncode == code, r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  last = _lines(r.stderr)[-1]
  assert last.startswith("train: "), r.stderr[-2000:]
  for fragment in fragments:
    assert fragment in last, last


def _losses(workdir) -> list[tuple[int, float]]:
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _abstract_state(corpus):
  """The checkpoint tree of a `tiny` run, as shapes."""
  exp = presets.tiny()
  _, trainer = loop.build_trainer(exp, loop.data_config(exp, (corpus,)))
  return trainer.checkpoint_tree(trainer.abstract_state(exp.train.batch_size, exp.train.seq_len))


def _wait_for(predicate, proc, timeout=240.0) -> bool:
  end = time.monotonic() + timeout
  while time.monotonic() < end and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.002)
  return False


def _saving(ckpt) -> bool:
  return ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir())


def _logged(metrics, k: int) -> bool:
  return metrics.exists() and metrics.read_text().count("\n") >= k


def test_kills_at_random_moments_resume_bit_exactly(small_corpus, tmp_path):
  ref = tmp_path / "ref"
  assert _train(ref, small_corpus, *_FAST).returncode == 0
  want = _losses(ref)
  for seed in (0, 1, 2):
    rng = np.random.default_rng(seed)
    workdir = tmp_path / f"killed{seed}"
    ckpt = workdir / "checkpoints"
    kills = 0
    while True:
      proc = subprocess.Popen(
        _command(workdir, small_corpus, *_FAST, "--resume"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      )
      if kills < 1 + seed % 2:
        if rng.random() < 0.5:  # during a save: an unfinished (temporary) step folder exists
          hit = _wait_for(functools.partial(_saving, ckpt), proc)
        else:  # between steps, a random moment after the k-th metrics record
          k = int(rng.integers(1, 6))
          hit = _wait_for(functools.partial(_logged, workdir / "metrics.jsonl", k), proc)
          time.sleep(float(rng.uniform(0, 0.05)))
        sig = signal.SIGTERM if (seed, kills) == (0, 0) else signal.SIGKILL
        if hit and proc.poll() is None:
          proc.send_signal(sig)
          kills += 1
          _, err = proc.communicate(timeout=300)
          if sig == signal.SIGTERM and proc.returncode != 0:
            assert proc.returncode == errors.EXIT_INTERRUPTED, err[-2000:]
            assert "--resume" in _lines(err)[-1]
          continue
      _, err = proc.communicate(timeout=300)
      assert proc.returncode == 0, err[-3000:]
      break
    assert kills >= 1
    got = _losses(workdir)
    assert got == want, (seed, got, want)  # every step once, bit-equal
    results = json.loads((workdir / "results.json").read_text())
    assert results["val_loss"] == json.loads((ref / "results.json").read_text())["val_loss"]


def test_refused_commands_change_nothing(finished_run, demo_tokenizer_path):
  workdir, corpus, _ = finished_run
  before = tree_snapshot(workdir)
  r = _train(workdir, corpus)  # the same command again, without --resume
  _assert_one_line_error(r, errors.EXIT_USAGE, "holds a run", "--resume", "--overwrite")
  r = _train(workdir, corpus, "--resume", "--preset=cpu_small")
  _assert_one_line_error(r, errors.EXIT_USAGE, "preset = 'tiny', this command gives 'cpu_small'")
  r = _train(workdir, corpus, "--resume", f"--tokenizer={demo_tokenizer_path}")
  _assert_one_line_error(r, errors.EXIT_USAGE, "was trained with")
  r = _train(workdir, corpus, "--resume", "--steps=5")
  _assert_one_line_error(r, errors.EXIT_USAGE, "--steps=5 is below the newest checkpoint (step 6)")
  assert tree_snapshot(workdir) == before


def _corrupt(step_dir, offset_fraction=0.5):
  """Writes 64 zero bytes inside the largest data file of a checkpoint's state."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  target = max(files, key=lambda p: p.stat().st_size)
  with open(target, "r+b") as f:
    f.seek(int(target.stat().st_size * offset_fraction))
    f.write(b"\0" * 64)


def test_corrupt_newest_checkpoint_is_moved_and_the_run_finishes(finished_run):
  workdir, corpus, results = finished_run
  want = _losses(workdir)
  _corrupt(workdir / "checkpoints" / "6")
  exp = presets.tiny()
  resumed = loop.train(exp, workdir, corpus_files=(corpus,), progress=False, resume=True)
  assert (workdir / "checkpoints" / CORRUPT / "6" / "state").is_dir()
  assert Checkpointer(workdir / "checkpoints").steps() == [3, 6]  # step 6 saved again
  assert _losses(workdir) == want and resumed["val_loss"] == results["val_loss"]


def test_checksum_mismatch_names_the_leaf(finished_run, caplog):
  workdir, corpus, _ = finished_run
  record_file = workdir / "checkpoints" / "6" / "checksums" / "metadata"
  record = json.loads(record_file.read_text())
  leaf = sorted(record["state"])[3]
  record["state"][leaf]["checksum"] = "0" * 16
  record_file.write_text(json.dumps(record))
  abstract = _abstract_state(corpus)
  with caplog.at_level("WARNING"):
    step, *_ = Checkpointer(workdir / "checkpoints").restore_latest(abstract)
  assert step == 3
  assert "step 6" in caplog.text and f"leaf {leaf} does not match its checksum" in caplog.text
  assert (workdir / "checkpoints" / CORRUPT / "6").is_dir()


def test_no_good_checkpoint_is_refused(finished_run):
  workdir, corpus, _ = finished_run
  for step in (3, 6):
    _corrupt(workdir / "checkpoints" / str(step))
  metrics = (workdir / "metrics.jsonl").read_text()
  r = _train(workdir, corpus, "--resume")
  _assert_one_line_error(r, errors.EXIT_ERROR, "no good checkpoint", "steps [3, 6]")
  assert sorted(os.listdir(workdir / "checkpoints" / CORRUPT)) == ["3", "6"]
  assert folder.checkpoint_steps(workdir) == []
  assert (workdir / "metrics.jsonl").read_text() == metrics


def test_torn_metrics_line_is_dropped_on_resume(finished_run, tmp_path):
  workdir, corpus, results = finished_run
  want = _losses(workdir)
  # What a kill during the append of step 5 leaves: checkpoint 3, records to 4, half a line.
  shutil.move(workdir / "checkpoints" / "6", tmp_path / "moved-6")
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  kept = [x for x in lines if json.loads(x)["step"] <= 4]
  (workdir / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 5, "loss": 4.1')
  resumed = loop.train(presets.tiny(), workdir, corpus_files=(corpus,), progress=False, resume=True)
  assert _losses(workdir) == want and resumed["val_loss"] == results["val_loss"]


def test_read_only_path_is_one_line(small_corpus, tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a folder")
  r = _train(blocker / "run", small_corpus)
  _assert_one_line_error(r, errors.EXIT_ERROR, str(blocker), "Not a directory")
  assert "traceback in" in _lines(r.stderr)[-1]


def test_read_only_mid_run_is_one_line_and_keeps_the_last_checkpoint(small_corpus, tmp_path):
  with _small_disk(tmp_path / "disk", "64m") as disk:
    workdir = (disk or tmp_path) / "run"
    proc = subprocess.Popen(
      _command(workdir, small_corpus, *_FAST, "--steps=40"),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    assert _wait_for(lambda: folder.checkpoint_steps(workdir), proc)
    if disk is not None:  # the filesystem turns read-only under the running job
      subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
      expected = "Read-only file system"
    else:  # no tmpfs here: a file takes the place of the checkpoint folder
      os.rename(workdir / "checkpoints", workdir / "checkpoints.kept")
      (workdir / "checkpoints").write_text("")
      expected = "Not a directory"
    _, err = proc.communicate(timeout=300)
    _assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, "", err), 1, expected)
    assert "the last good checkpoint, step" in _lines(err)[-1]
    if disk is None:
      os.replace(workdir / "checkpoints.kept", workdir / "checkpoints")
    restored = Checkpointer(workdir / "checkpoints", read_only=True).restore_latest(
      _abstract_state(small_corpus)
    )
    assert restored[0] == folder.checkpoint_steps(workdir)[-1]


@contextlib.contextmanager
def _small_disk(path, size: str):
  """A small tmpfs at `path` (None if this machine cannot mount one)."""
  path.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
  )
  try:
    yield path if mounted.returncode == 0 else None
  finally:
    if mounted.returncode == 0:
      subprocess.run(["umount", "-l", str(path)], check=False)


def _limit_file_size():
  import resource

  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(small_corpus, tmp_path):
  with _small_disk(tmp_path / "disk", "12m") as disk:
    if disk is not None:  # room for two checkpoints of ~4.7 MB, not a third
      workdir = disk / "run"
      r = _train(workdir, small_corpus, *_FAST)
      expected = "No space left on device"
    else:  # no tmpfs here: a file size limit stands in for the full disk
      workdir = tmp_path / "run"
      r = _train(workdir, small_corpus, *_FAST, preexec_fn=_limit_file_size)
      expected = "File too large"
    _assert_one_line_error(r, errors.EXIT_ERROR, expected)
    steps = folder.checkpoint_steps(workdir)
    assert steps, "no checkpoint was written before the disk filled"
    abstract = _abstract_state(small_corpus)
    restored = Checkpointer(workdir / "checkpoints", read_only=True).restore_latest(abstract)
    assert restored[0] == steps[-1]


@pytest.mark.parametrize(
  ("content", "flag", "message"),
  [
    (b"In the beginning \xff\xfe was", "--corpus", "is not UTF-8 text: byte 0xff at offset 17"),
    (b"   \n\n  ", "--corpus", "is empty"),
    (b"In the beginning", "--corpus", "fewer than one batch"),
    (b"{not json", "--tokenizer", "is not a Hugging Face tokenizer.json"),
    (b'{"a": 1}', "--tokenizer", "is not a Hugging Face tokenizer.json"),
  ],
)
def test_bad_data_is_one_line(small_corpus, tmp_path, content, flag, message):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(content)
  corpus = bad if flag == "--corpus" else small_corpus
  extra = [f"--tokenizer={bad}"] if flag == "--tokenizer" else []
  r = _train(tmp_path / "run", corpus, *extra)
  _assert_one_line_error(r, errors.EXIT_ERROR, message)
  if flag == "--corpus":
    assert str(bad) in _lines(r.stderr)[-1]


def test_a_loss_spike_stops_training_and_keeps_earlier_checkpoints(small_corpus, tmp_path):
  exp = presets.tiny()
  exploding = dataclasses.replace(
    exp,
    optim=dataclasses.replace(exp.optim, lr=3.0),  # the loss climbs 9.6 -> 13 -> 73, finite
    train=dataclasses.replace(exp.train, steps=10, checkpoint_every=1, spike_window=2),
  )
  with pytest.raises(errors.TrainingDiverged, match="step 4 is above 4x the median"):
    loop.train(exploding, tmp_path, corpus_files=(small_corpus,), progress=False)
  assert folder.checkpoint_steps(tmp_path) == [1, 2]  # the parameters of step 3 gave the spike
  assert os.listdir(tmp_path / "checkpoints" / DIVERGED) == ["3"]
  calmer = dataclasses.replace(exploding, optim=exp.optim)  # resume with a lower rate
  results = loop.train(calmer, tmp_path, corpus_files=(small_corpus,), progress=False, resume=True)
  assert np.isfinite(results["val_loss"]) and folder.checkpoint_steps(tmp_path)[-1] == 10
  record = json.loads((tmp_path / "run.json").read_text())
  assert record["resumes"][0]["from_step"] == 2 and record["config"]["optim"]["lr"] == exp.optim.lr
