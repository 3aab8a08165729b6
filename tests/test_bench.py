"""Every benchmark script runs (tiny sizes, in a subprocess so absl flags do not collide)."""

import dataclasses
import subprocess
import sys

import pytest

from engram_jax.memory import measure


@pytest.mark.parametrize(
  ("module", "args", "expected"),
  [
    ("bench.hashing", ["--batch=4", "--seq=300", "--repeats=1"], "speedup:"),
    ("bench.train_step", ["--preset=tiny", "--repeats=2"], "ratio:"),
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


def test_hit_rate_records_and_plot(tmp_path):
  cfg = dataclasses.replace(
    measure.BenchConfig.smoke(), hit_rate_plot=str(tmp_path / "hit.png"), cache_fractions=(0.2,)
  )
  lines = measure.run("tiered", cfg)
  assert len(lines) == 1 + len(cfg.hit_exponents) + 1  # header, one row per exponent, the plot
  records = measure.tiered_hit_rates(cfg)
  for rec in records:
    # A calibrated cache of the hottest 20% of rows serves most Zipfian ids; no policy beats
    # the top rows' probability mass by more than sampling noise.
    assert 0.3 < rec["static"] <= rec["ideal"] + 0.05
    assert all(0.0 < rec[p] <= rec["ideal"] + 0.05 for p in ("lfu", "lru"))
  assert (tmp_path / "hit.png").stat().st_size > 10_000
