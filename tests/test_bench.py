"""Every benchmark script runs (tiny sizes, in a subprocess so absl flags do not collide)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
  ("module", "args", "expected"),
  [
    ("bench.hashing", ["--batch=4", "--seq=300", "--repeats=1"], "speedup:"),
    ("bench.train_step", ["--preset=tiny", "--repeats=2"], "of the matmul rate"),
    ("bench.step_profile", ["--preset=tiny", "--repeats=2"], "moe ragged - blocks"),
    ("bench.memory", ["--smoke"], "copy"),
    ("bench.generate", ["--preset=tiny", "--new_tokens=3", "--repeats=1"], "same text from both"),
  ],
)
def test_bench_script_runs(module, args, expected):
  r = subprocess.run(
    [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600, check=False
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert expected in r.stdout
