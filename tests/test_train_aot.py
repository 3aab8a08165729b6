"""Tests of engram_jax/train/aot.py and experiments/compile_check.py: the train step compiled
for a mesh without allocating it, and its per-device memory."""

import dataclasses
import json

import jax
import pytest

from engram_jax import config, params, presets
from engram_jax.config import MeshConfig
from engram_jax.train import aot


def _tiny(mesh: MeshConfig, kind: str = "device"):
  exp = presets.tiny()
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, batch_size=4, seq_len=16))
  return config.override(
    exp, {"memory.kind": kind} | {f"mesh.{a}": n for a, n in mesh.shape.items()}
  )


def test_layouts_come_from_the_config_alone():
  exp = presets.engram_27b()
  layouts = aot.layouts_of(exp)
  assert {k: v.num_rows for k, v in layouts.items()} == params.engram_table_rows(exp.model.engram)
  assert aot.layouts_of(presets.moe_27b()) == {}


def test_fsdp_splits_the_state_over_the_devices():
  split = aot.memory_report(_tiny(MeshConfig(fsdp=4), "device"))
  assert split["devices"] == 4 and split["mesh"]["fsdp"] == 4
  state = split["state_bytes_total"]
  # Every device holds about a quarter of the state (some small leaves are replicated); one
  # device would hold all of it in its arguments.
  assert split["bytes_per_device"]["arguments"] < 0.6 * state
  assert split["params_split"] > 0
  total = split["bytes_per_device"]
  assert total["total"] <= total["arguments"] + total["outputs"] + total["temp"]
  assert 0 < split["largest_replicated_bytes"] < 0.25 * state and split["largest_replicated"]


def test_script_writes_json_and_refuses_to_overwrite(tmp_path, run_scripts):
  out = tmp_path / "report.json"
  cmd = (
    "experiments.compile_check",
    ["--preset=tiny", "--mesh=data=2,expert=2", "--batch_size=4", "--seq_len=16", f"--json={out}"],
  )
  # The same command twice, one after the other in one process (see `run_scripts`).
  first, again = run_scripts([cmd, cmd])
  assert first.returncode == 0, first.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 2}
  assert report["memory"] == "sharded" and report["bytes_per_device"]["total"] > 0
  assert again.returncode == 2 and "--overwrite" in again.stderr.strip().splitlines()[-1]


def test_bad_mesh_is_a_usage_error():
  with pytest.raises(ValueError, match="devices"):
    aot.memory_report(_tiny(MeshConfig(tensor=16)))  # 16 > the 8 simulated devices
  assert jax.device_count() == 8
