"""bench/gpu_check.py: its smoke path, run in-process on CPU (Pallas interpret mode); the
sharded train step through the script, in a process of its own."""

import json

import pytest
from absl import app, flags

from bench import gpu_check
from engram_jax.config import STORAGE_TYPES


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


def test_sharded_step_on_every_local_device(run_scripts, tmp_path):
  # The section as `python -m bench.gpu_check --smoke` runs it, in a process of its own (one that
  # sees the suite's 8 simulated devices).
  path = tmp_path / "check.json"
  (run,) = run_scripts(
    [("bench.gpu_check", ["--smoke", "--sections=sharded_step", f"--json={path}"])]
  )
  assert run.returncode == 0, run.stderr[-3000:]
  (r,) = json.loads(path.read_text())["results"]
  assert r["impl"] == "tiny on 8 device(s), fsdp=8, tables sharded"  # the 8 simulated devices
  assert r["tokens_per_s_per_device"] > 0 and r["table_mb_exchanged_per_step"] > 0
  assert "tokens/s per device" in gpu_check.format_results([r])
  assert gpu_check.format_results([r]) in run.stdout


def test_decode_and_sharded_lookup_sections():
  results = gpu_check.run(gpu_check.CheckConfig.smoke(), ["decode_bandwidth", "sharded_lookup"])
  decode = [r for r in results if r["section"] == "decode_bandwidth"]
  assert [r["storage"] for r in decode] == [s for s in STORAGE_TYPES for _ in range(3)]
  fused = [r for r in decode if r["impl"].endswith("pallas fused")]
  assert len(fused) == 4 and all(r["exact"] is True and r["gb_per_s"] > 0 for r in fused)
  xla, pallas = [r for r in results if r["section"] == "sharded_lookup"]
  assert xla["impl"] == "sharded on 8 device(s), xla" and xla["gb_per_s"] > 0
  assert pallas["impl"] == "sharded on 8 device(s), pallas" and pallas["exact"] is True
  assert "below goal" in gpu_check.format_results(fused[:1])  # float32 rows have the goal
  assert "goal" not in gpu_check.format_results(fused[2:3])  # int8 rows do not


def test_a_failing_section_is_reported_and_the_run_goes_on(monkeypatch):
  def broken(config):
    raise RuntimeError("no such kernel")

  # The broken section first, then the quickest real one (three rows: copy, xla, pallas).
  monkeypatch.setitem(gpu_check.SECTIONS, "sharded_step", broken)
  seen = []
  results = gpu_check.run(
    gpu_check.CheckConfig.smoke(), ["sharded_step", "gather_bandwidth"], report=seen.append
  )
  assert results[0]["section"] == "sharded_step"
  assert results[0]["error"] == "RuntimeError: no such kernel"
  assert [r["section"] for r in results[1:]] == ["gather_bandwidth"] * 3
  assert not any("error" in r for r in results[1:])
  assert [len(rows) for rows in seen] == [1, 3]  # each section reported when it ended
  assert "FAILED RuntimeError: no such kernel" in gpu_check.format_results(results)


def test_json_is_written_and_never_overwritten(tmp_path, capsys):
  path = tmp_path / "check.json"
  flags.FLAGS(["gpu_check", "--smoke", "--sections=gather_bandwidth", f"--json={path}"])
  try:
    gpu_check.main([])
    report = json.loads(path.read_text())
    assert report["backend"] == "cpu" and report["results"][0]["section"] == "gather_bandwidth"
    with pytest.raises(app.UsageError, match="exists"):
      gpu_check.main([])
  finally:
    flags.FLAGS.unparse_flags()
  assert json.loads(path.read_text()) == report
