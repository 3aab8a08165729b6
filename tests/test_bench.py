"""Every benchmark script runs (tiny sizes, in a subprocess so absl flags do not collide)."""

import json
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


def test_v41_rows_runs_and_refuses_to_overwrite(tmp_path):
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "bench.v41_rows", "--smoke", f"--workdir={tmp_path}", *args],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  r = run(f"--json={tmp_path / 'rows.json'}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "vs memcpy" in r.stdout and "page cache drop:" in r.stdout
  report = json.loads((tmp_path / "rows.json").read_text())
  sources = {"mmap cold", "mmap warm", "host RAM", "host RAM + decode", "tiered"}
  assert {(x["workload"], x["source"]) for x in report["results"]} == {
    (w, s) for w in ("decode", "prefill") for s in sources
  }
  r = run()  # the checkpoint is there: measured again only with --reuse
  assert r.returncode != 0 and "pass --reuse" in r.stderr
  r = run("--reuse", f"--json={tmp_path / 'rows.json'}")
  assert r.returncode != 0 and "refusing to overwrite" in r.stderr
