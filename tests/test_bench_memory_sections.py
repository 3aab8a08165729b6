"""Tests for bench/memory_sections.py (the sections run end to end in tests/test_bench.py)."""

import dataclasses

from bench import memory_sections


def test_hit_rate_records_and_plot(tmp_path):
  cfg = dataclasses.replace(
    memory_sections.BenchConfig.smoke(),
    hit_rate_plot=str(tmp_path / "hit.png"),
    cache_fractions=(0.2,),
  )
  lines = memory_sections.run("tiered", cfg)
  assert len(lines) == 1 + len(cfg.hit_exponents) + 1  # header, one row per exponent, the plot
  records = memory_sections.tiered_hit_rates(cfg)
  for rec in records:
    # A calibrated cache of the hottest 20% of rows serves most Zipfian ids; no policy beats
    # the top rows' probability mass by more than sampling noise.
    assert 0.3 < rec["static"] <= rec["ideal"] + 0.05
    assert all(0.0 < rec[p] <= rec["ideal"] + 0.05 for p in ("lfu", "lru"))
  assert (tmp_path / "hit.png").stat().st_size > 10_000
