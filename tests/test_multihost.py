"""Multi-host training for real: two processes of experiments/train.py, one CPU device each,
joined by `jax.distributed` (gloo collectives) into one 2-device mesh whose `fsdp` axis spans
both: the batch split over it, every parameter and optimizer moment with an embed axis split
across the processes (FSDP), and the Engram tables sharded with all_to_all across them. Their
run must match the shared `tiny` run of one process on one device."""

import json
import os
import socket
import subprocess
import sys

import numpy as np


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(path):
  records = [json.loads(line) for line in path.read_text().splitlines()]
  return [(r["step"], r["loss"] if "loss" in r else r["val_loss"]) for r in records]


def test_two_processes_train_like_one(tiny_run, tmp_path):
  ref_dir, corpus, ref = tiny_run
  port = _free_port()
  # One device per process; the suite's other XLA flags (tests/conftest.py) stay.
  flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  workdir = tmp_path / "multi"
  command = [
    sys.executable, "-m", "experiments.train", "--preset=tiny", f"--workdir={workdir}",
    f"--corpus={corpus[0]}", "--memory=sharded", "--mesh=fsdp=2",
    f"--coordinator_address=localhost:{port}", "--num_processes=2",
  ]  # fmt: skip
  procs = [
    subprocess.Popen(
      [*command, f"--process_id={i}"],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]

  # Both processes end with the reference's result; process 0 alone wrote the metrics.
  for out in outputs:
    printed = json.loads(out[out.rindex("{") :])
    np.testing.assert_allclose(printed["val_loss"], ref["val_loss"], rtol=2e-4)
  multi, single = _losses(workdir / "metrics.jsonl"), _losses(ref_dir / "metrics.jsonl")
  assert [s for s, _ in multi] == [s for s, _ in single]
  assert len(multi) == len({s for s, _ in multi}) + 2  # each step once, plus two evaluations
  np.testing.assert_allclose([v for _, v in multi], [v for _, v in single], rtol=2e-4)
  assert json.loads((workdir / "results.json").read_text())["steps"] == ref["steps"]
