"""bench/gpu_check.py: its smoke path, run in-process on CPU (Pallas interpret mode)."""

import pytest
from absl import flags

from bench import gpu_check


def test_smoke_flag_runs_the_script(capsys):
  flags.FLAGS(["gpu_check", "--smoke", "--sections=gather_bandwidth"])
  try:
    gpu_check.main([])
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert "copy" in out and "xla" in out and "pallas(block_rows=16" in out
  assert "exact=True" in out


def test_smoke_results():
  results = gpu_check.run(gpu_check.CheckConfig.smoke(), ["gather_bandwidth"])
  assert [r["impl"] for r in results] == [
    "copy",
    "xla",
    "pallas(block_rows=16, num_warps=auto)",
  ]
  for r in results:
    assert r["gb_per_s"] > 0 and r["ms"] > 0
  assert results[0]["vs_copy"] == 1.0 and results[1]["vs_xla"] == 1.0
  assert results[2]["exact"] is True


def test_unknown_section_is_rejected():
  with pytest.raises(ValueError, match="gather_bandwidth"):
    gpu_check.run(gpu_check.CheckConfig.smoke(), ["peak_memory_typo"])


def test_sharded_step_on_every_local_device():
  (r,) = gpu_check.run(gpu_check.CheckConfig.smoke(), ["sharded_step"])
  assert r["impl"] == "tiny on 8 device(s), fsdp=8, tables sharded"  # the 8 simulated devices
  assert r["tokens_per_s_per_device"] > 0 and r["table_mb_exchanged_per_step"] > 0
  assert "tokens/s per device" in gpu_check.format_results([r])
