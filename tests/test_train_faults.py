"""Fault injection on the training command (`experiments.train`, `tiny` preset, subprocesses):
kills during saves and between steps, corrupt checkpoints and metrics, refused commands, a
read-only path, a full disk, bad data. A run is never lost, and every failure is one line on the
terminal.

The commands that fail before a step is taken run in one process (`run_scripts`: each as
`python -m experiments.train` runs it, with its own exit status and stderr); kills, a full disk
and a folder broken under a running job have a process of their own."""

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


def _flags(workdir, corpus, *flags):
  return ["--preset=tiny", f"--corpus={corpus}", f"--workdir={workdir}", *flags]


def _command(workdir, corpus, *flags):
  return [sys.executable, "-m", "experiments.train", *_flags(workdir, corpus, *flags)]


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


# The kills, in order, of one run (`--checkpoint_every=1`, 6 steps) restarted with the same
# command after each: a SIGTERM between steps (a moment just after the second metrics record:
# the run saves, exits 75 and says --resume), then a SIGKILL during a save (an unfinished,
# temporary step folder exists; the metrics records past the last checkpoint stay behind).
_KILLS = ((signal.SIGTERM, "between steps"), (signal.SIGKILL, "during a save"))


def test_kills_during_saves_and_between_steps_resume_bit_exactly(tiny_run, small_corpus, tmp_path):
  ref, _, ref_results = tiny_run  # the same run, uninterrupted (checkpoints every 3 steps)
  want = _losses(ref)
  rng = np.random.default_rng(0)
  workdir = tmp_path / "killed"
  ckpt, metrics = workdir / "checkpoints", workdir / "metrics.jsonl"
  for sig, moment in _KILLS:
    proc = subprocess.Popen(
      _command(workdir, small_corpus, *_FAST, "--resume"),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    if moment == "during a save":
      hit = _wait_for(functools.partial(_saving, ckpt), proc)
    else:
      hit = _wait_for(functools.partial(_logged, metrics, 2), proc)
      time.sleep(float(rng.uniform(0, 0.05)))
    alive = proc.poll() is None
    if alive:
      proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert hit and alive, (moment, proc.returncode, err[-2000:])  # the kill came mid-run
    if sig == signal.SIGTERM:
      assert proc.returncode == errors.EXIT_INTERRUPTED, err[-2000:]
      assert "--resume" in _lines(err)[-1]
    else:
      assert proc.returncode == -signal.SIGKILL, err[-2000:]
  # The last restart finishes the run; it is not killed, so it runs here (`loop.train` with
  # resume, as the command's --resume calls it), saving a process start.
  exp = presets.tiny()
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, checkpoint_every=1))
  loop.train(exp, workdir, corpus_files=(small_corpus,), progress=False, resume=True)
  assert _losses(workdir) == want  # every step once, bit-equal
  results = json.loads((workdir / "results.json").read_text())
  assert results["val_loss"] == ref_results["val_loss"]


def test_keep_freed_memory_trains_the_same_run(tiny_run, small_corpus, tmp_path):
  ref, _, ref_results = tiny_run
  workdir = tmp_path / "kept"
  r = _train(workdir, small_corpus, "--keep_freed_memory")
  assert r.returncode == 0, r.stderr[-2000:]
  assert _losses(workdir) == _losses(ref)  # the allocator changes no number
  assert json.loads((workdir / "results.json").read_text())["val_loss"] == ref_results["val_loss"]


_BAD_DATA = [
  (b"In the beginning \xff\xfe was", "--corpus", "is not UTF-8 text: byte 0xff at offset 17"),
  (b"   \n\n  ", "--corpus", "is empty"),
  (b"In the beginning", "--corpus", "fewer than one batch"),
  (b"{not json", "--tokenizer", "is not a Hugging Face tokenizer.json"),
  (b'{"a": 1}', "--tokenizer", "is not a Hugging Face tokenizer.json"),
]
_FLAG_ERRORS = [
  (["--steps=0"], "steps: expected an int >= 1"),  # a config's validation
  (["--steps=abc"], "--steps"),  # absl's parsing
  (["--corpus=/does/not/exist.txt"], "--corpus: file(s) not found"),
  (["--mesh=16", "--batch_size=16"], "mesh: expected 1.."),  # more devices than jax sees
]


@pytest.fixture(scope="module")
def failed_commands(tiny_run, small_corpus, demo_tokenizer_path, tmp_path_factory, run_scripts):
  """The training commands that fail before a step is taken, all run by one process (see
  `run_scripts`): {case: ([subprocess.CompletedProcess of each command], what its test
  reads)}."""
  cases, argvs = {}, []

  def add(name, *commands, **context):
    cases[name] = (len(argvs), len(commands), context)
    argvs.extend(commands)

  # Bad flags (usage errors: nothing is read or written).
  for i, (flags, _) in enumerate(_FLAG_ERRORS):
    add(("flags", i), [f"--workdir={tmp_path_factory.mktemp('flag_errors')}", *flags])
  # Commands that do not fit a finished run.
  refused = tmp_path_factory.mktemp("refused") / "run"
  shutil.copytree(tiny_run[0], refused)
  before = tree_snapshot(refused)
  add(
    "refused",
    _flags(refused, small_corpus),  # the same command again, without --resume
    _flags(refused, small_corpus, "--resume", "--preset=cpu_small"),
    _flags(refused, small_corpus, "--resume", f"--tokenizer={demo_tokenizer_path}"),
    _flags(refused, small_corpus, "--resume", "--steps=5"),
    workdir=refused,
    before=before,
  )
  # A run whose every checkpoint is corrupt.
  no_good = tmp_path_factory.mktemp("no_good") / "run"
  shutil.copytree(tiny_run[0], no_good)
  for step in (3, 6):
    _corrupt(no_good / "checkpoints" / str(step))
  metrics = (no_good / "metrics.jsonl").read_text()
  add("no_good", _flags(no_good, small_corpus, "--resume"), workdir=no_good, metrics=metrics)
  # A workdir below a file.
  blocker = tmp_path_factory.mktemp("read_only") / "a-file"
  blocker.write_text("not a folder")
  add("read_only_path", _flags(blocker / "run", small_corpus), blocker=blocker)
  # Bad corpora and tokenizers.
  for i, (content, flag, _) in enumerate(_BAD_DATA):
    case_dir = tmp_path_factory.mktemp(f"bad_data{i}")
    bad = case_dir / "bad.txt"
    bad.write_bytes(content)
    corpus = bad if flag == "--corpus" else small_corpus
    extra = [f"--tokenizer={bad}"] if flag == "--tokenizer" else []
    add(("bad_data", i), _flags(case_dir / "run", corpus, *extra), bad=bad)

  results = run_scripts([("experiments.train", argv) for argv in argvs])
  return {
    name: (results[first : first + n], context) for name, (first, n, context) in cases.items()
  }


@pytest.mark.parametrize(("flags", "message"), _FLAG_ERRORS)
def test_train_flag_errors(failed_commands, flags, message):
  """A bad flag is one line (its message, not the flags' help) and exit 2; the same from the
  command line: `test_experiments.test_train_flag_error_from_the_command_line`."""
  (r,), _ = failed_commands["flags", _FLAG_ERRORS.index((flags, message))]
  assert r.returncode == 2
  (line,) = r.stderr.strip().splitlines()  # the one message, not the flags' help
  assert line.startswith("train: ") and message in line and line.endswith("see --help")


def test_refused_commands_change_nothing(failed_commands):
  (same, preset, tokenizer, steps), context = failed_commands["refused"]
  _assert_one_line_error(same, errors.EXIT_USAGE, "holds a run", "--resume", "--overwrite")
  _assert_one_line_error(
    preset, errors.EXIT_USAGE, "preset = 'tiny', this command gives 'cpu_small'"
  )
  _assert_one_line_error(tokenizer, errors.EXIT_USAGE, "was trained with")
  _assert_one_line_error(
    steps, errors.EXIT_USAGE, "--steps=5 is below the newest checkpoint (step 6)"
  )
  assert tree_snapshot(context["workdir"]) == context["before"]


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


def test_checksum_mismatch_names_the_leaf(finished_run, tiny_checkpoint_tree, caplog):
  workdir, _, _ = finished_run
  record_file = workdir / "checkpoints" / "6" / "checksums" / "metadata"
  record = json.loads(record_file.read_text())
  leaf = sorted(record["state"])[3]
  record["state"][leaf]["checksum"] = "0" * 16
  record_file.write_text(json.dumps(record))
  with caplog.at_level("WARNING"):
    step, *_ = Checkpointer(workdir / "checkpoints").restore_latest(tiny_checkpoint_tree)
  assert step == 3
  assert "step 6" in caplog.text and f"leaf {leaf} does not match its checksum" in caplog.text
  assert (workdir / "checkpoints" / CORRUPT / "6").is_dir()


def test_no_good_checkpoint_is_refused(failed_commands):
  (r,), context = failed_commands["no_good"]
  workdir = context["workdir"]
  _assert_one_line_error(r, errors.EXIT_ERROR, "no good checkpoint", "steps [3, 6]")
  assert sorted(os.listdir(workdir / "checkpoints" / CORRUPT)) == ["3", "6"]
  assert folder.checkpoint_steps(workdir) == []
  assert (workdir / "metrics.jsonl").read_text() == context["metrics"]


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


def test_read_only_path_is_one_line(failed_commands):
  (r,), context = failed_commands["read_only_path"]
  _assert_one_line_error(r, errors.EXIT_ERROR, str(context["blocker"]), "Not a directory")
  assert "traceback in" in _lines(r.stderr)[-1]


def test_read_only_mid_run_is_one_line_and_keeps_the_last_checkpoint(
  small_corpus, tiny_checkpoint_tree, tmp_path
):
  with _small_disk(tmp_path / "disk", "64m") as disk:
    workdir = (disk or tmp_path) / "run"
    # tiny's 6 steps (its compiled program): after the first checkpoint the run has 5 more
    # steps and saves (seconds) in which the break below comes, within milliseconds.
    proc = subprocess.Popen(
      _command(workdir, small_corpus, *_FAST),
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
      tiny_checkpoint_tree
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


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(
  small_corpus, tiny_checkpoint_tree, tmp_path
):
  with _small_disk(tmp_path / "disk", "7m") as disk:
    if disk is not None:  # room for one checkpoint of ~4.7 MB, not a second
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
    restored = Checkpointer(workdir / "checkpoints", read_only=True).restore_latest(
      tiny_checkpoint_tree
    )
    assert restored[0] == steps[-1]


@pytest.mark.parametrize(("content", "flag", "message"), _BAD_DATA)
def test_bad_data_is_one_line(failed_commands, content, flag, message):
  (r,), context = failed_commands["bad_data", _BAD_DATA.index((content, flag, message))]
  _assert_one_line_error(r, errors.EXIT_ERROR, message)
  if flag == "--corpus":
    assert str(context["bad"]) in _lines(r.stderr)[-1]


def test_a_loss_spike_stops_training_and_keeps_earlier_checkpoints(small_corpus, tmp_path):
  exp = presets.tiny()
  exploding = dataclasses.replace(
    exp,
    optim=dataclasses.replace(exp.optim, lr=3.0),  # the loss climbs 9.6 -> 13 -> 73, finite
    # tiny's 6 steps: the schedule of steps 1-4 is that of a longer run, and the resumed run
    # below is tiny's own program (compiled once for the session).
    train=dataclasses.replace(exp.train, checkpoint_every=1, spike_window=2),
  )
  with pytest.raises(errors.TrainingDiverged, match="step 4 is above 4x the median"):
    loop.train(exploding, tmp_path, corpus_files=(small_corpus,), progress=False)
  assert folder.checkpoint_steps(tmp_path) == [1, 2]  # the parameters of step 3 gave the spike
  assert os.listdir(tmp_path / "checkpoints" / DIVERGED) == ["3"]
  # Resume with a lower rate (and tiny's checkpoints every 3 steps: `checkpoint_every` is free).
  calmer = dataclasses.replace(
    exploding, optim=exp.optim, train=dataclasses.replace(exploding.train, checkpoint_every=3)
  )
  results = loop.train(calmer, tmp_path, corpus_files=(small_corpus,), progress=False, resume=True)
  assert (
    np.isfinite(results["val_loss"]) and folder.checkpoint_steps(tmp_path)[-1] == exp.train.steps
  )
  record = json.loads((tmp_path / "run.json").read_text())
  assert record["resumes"][0]["from_step"] == 2 and record["config"]["optim"]["lr"] == exp.optim.lr
