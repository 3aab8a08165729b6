"""Checks a config's memory on a mesh without the hardware: compiles the full train step for
the mesh on simulated CPU devices, without allocating the model, and writes the per-device
figures as JSON.

python -m experiments.compile_check --preset=tiny --mesh=fsdp=2,expert=2 --batch_size=4 \
  --seq_len=16 --json=/tmp/tiny.json

When jax sees fewer devices than the mesh has, the script starts itself again on the CPU with
that many simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=N). Exit codes:
0 done, 1 error, 2 usage.
"""

import dataclasses
import json
import os
import sys

import jax
from absl import app, flags, logging

from engram_jax import config, presets
from engram_jax.config import MEMORY_KINDS, REMAT_POLICIES, MeshConfig
from engram_jax.train import aot
from experiments import cli

_PRESET = flags.DEFINE_string("preset", "engram_27b", f"One of {sorted(presets.PRESETS)}.")
_MESH = flags.DEFINE_string("mesh", "8", "The mesh: a device count or axis=size pairs.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the preset's).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the preset's).")
_MEMORY = flags.DEFINE_enum(
  "memory", None, list(MEMORY_KINDS), "Where the tables live (default: 'sharded' on a mesh)."
)
_SCAN = flags.DEFINE_bool("scan_layers", True, "Scan repeated blocks (much faster to compile).")
_REMAT = flags.DEFINE_enum("remat", "full", list(REMAT_POLICIES), "Rematerialisation of blocks.")
_DISPATCH = flags.DEFINE_enum(
  "dispatch",
  "blocks",
  ["ragged", "blocks"],
  "MoE dispatch compiled: 'blocks' (grouped matmuls over blocks of one expert) or 'ragged' "
  "(ragged_dot, what 'auto' picks on GPU and TPU; XLA:CPU lowers it densely, every row "
  "against every expert, so its CPU figures overstate a GPU's).",
)
_JSON = flags.DEFINE_string("json", None, "Write the report here (refuses an existing file).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --json file.")


def _experiment() -> config.ExperimentConfig:
  mesh = MeshConfig.parse(_MESH.value)
  overrides = {f"mesh.{axis}": size for axis, size in mesh.shape.items()}
  overrides["memory.kind"] = _MEMORY.value or ("sharded" if mesh.devices > 1 else "device")
  overrides |= {"model.scan_layers": _SCAN.value, "model.remat": _REMAT.value}
  if _BATCH.value is not None:
    overrides["train.batch_size"] = _BATCH.value
  if _SEQ.value is not None:
    overrides["train.seq_len"] = _SEQ.value
  exp = config.override(presets.get(_PRESET.value), overrides)
  if exp.model.moe is None:
    return exp
  moe = dataclasses.replace(exp.model.moe, dispatch=_DISPATCH.value)
  return dataclasses.replace(exp, model=dataclasses.replace(exp.model, moe=moe))


def _simulate(devices: int) -> None:
  """Starts this command again with `devices` simulated CPU devices (does not return)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["ENGRAM_COMPILE_CHECK_CHILD"] = "1"
  args = [sys.executable, "-m", "experiments.compile_check", *sys.argv[1:]]
  os.execve(sys.executable, args, env)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    exp = _experiment()
    if _JSON.value and os.path.exists(_JSON.value) and not _OVERWRITE.value:
      raise FileExistsError(f"--json: {_JSON.value} exists; pass --overwrite to replace it")
  except (ValueError, KeyError, FileExistsError) as e:
    cli.usage_exit("compile_check", str(e))
  if jax.device_count() < exp.mesh.devices and not os.environ.get("ENGRAM_COMPILE_CHECK_CHILD"):
    _simulate(exp.mesh.devices)
  try:
    report = aot.memory_report(exp)
  except Exception as e:  # one line; the traceback goes to a log file
    sys.exit(cli.report("compile_check", e, None))
  text = json.dumps(report, indent=2)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("compile_check"))
