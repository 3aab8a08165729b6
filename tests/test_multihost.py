"""Multi-host training for real: two processes of experiments/train.py, 4 CPU devices each, joined
by `jax.distributed` (gloo collectives) into one 8-device mesh with sharded Engram tables. Their
run must match a single process driving 8 devices."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np

from engram_jax import presets
from engram_jax.train import loop

STEPS, BATCH = 3, 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(path):
  records = [json.loads(line) for line in path.read_text().splitlines()]
  return [(r["step"], r["loss"] if "loss" in r else r["val_loss"]) for r in records]


def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workdir = tmp_path / "multi"
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "experiments.train",
        "--preset=tiny",
        f"--workdir={workdir}",
        f"--steps={STEPS}",
        f"--batch_size={BATCH}",
        f"--eval_every={STEPS}",
        "--memory=sharded",
        "--mesh=8",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  # The reference runs here meanwhile: one process, the test session's 8 devices.
  exp = presets.tiny()
  exp = dataclasses.replace(
    exp, train=dataclasses.replace(exp.train, steps=STEPS, batch_size=BATCH, eval_every=STEPS)
  )
  single = loop.train(exp, tmp_path / "single", progress=False, memory="sharded", mesh_devices=8)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]

  # Both processes end with the same result; process 0 alone wrote the metrics.
  for out in outputs:
    printed = json.loads(out[out.rindex("{") :])
    np.testing.assert_allclose(printed["val_loss"], single["val_loss"], rtol=1e-5)
  multi, ref = _losses(workdir / "metrics.jsonl"), _losses(tmp_path / "single" / "metrics.jsonl")
  assert [s for s, _ in multi] == [s for s, _ in ref] == [1, 2, 3, 3]
  np.testing.assert_allclose([v for _, v in multi], [v for _, v in ref], rtol=1e-5)
  assert json.loads((workdir / "results.json").read_text())["steps"] == STEPS
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(STEPS)]
