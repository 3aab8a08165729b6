"""Benchmarks of the memory backends; every ratio is measured within one run.

Sections:
- `fetch`: rows/s of each backend's `fetch` on a >= 2 GB table with Zipf ids, as a fraction of
  the memory copy bandwidth of the same bytes measured in the same run (copy into a reused
  buffer, and into a new buffer as every fetch returns one). Bytes = read + write of the rows.
- `prefetch`: a toy forward pass (matmuls, the rows added at one layer) fed from an on-device
  table, from a host table inside one jit (`compute_on`), and from a host table by two-stage
  dispatch with and without a background prefetch.
- `update`: sparse lazy-Adam step time at 1e5 vs 1e7 rows (device and host), with a dense
  optax Adam for contrast.
- `tiered`: cache hit rate against cache size (1%, 5%, 20% of rows) under Zipf 1.0 and 1.2,
  for a calibrated static cache, online LFU, and the ideal (the top rows' probability mass).
- `sharded`: bytes one device sends per step on the all-to-all route against the all-gather
  route (from the formula and from the compiled program), times and fetch throughput, on 8
  simulated CPU devices (run in a subprocess with XLA_FLAGS when needed).

    python -m bench.memory                       # all sections (a few minutes, < 8 GB)
    python -m bench.memory --sections=fetch,update --table_gb=2
    python -m bench.memory --smoke               # tiny sizes, seconds
    python -m bench.memory --sections=tiered --hit_rate_plot=docs/img/tiered_hit_rate.png
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
from absl import app, flags

from bench import memory_sections as sections

_SECTIONS = flags.DEFINE_list(
  "sections", list(sections.SECTIONS), f"Sections to run, from {list(sections.SECTIONS)}."
)
_TABLE_GB = flags.DEFINE_float("table_gb", 2.0, "Table size of fetch/prefetch/sharded (1e9 B).")
_IDS = flags.DEFINE_integer("ids", 1 << 20, "Ids per fetch in the fetch section.")
_DIM = flags.DEFINE_integer("dim", 64, "Row width Dh (float32).")
_ZIPF_A = flags.DEFINE_float("zipf_a", 1.1, "Zipf exponent of the fetched ids.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (best kept).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes (checks the script in seconds).")
_DEVICES = flags.DEFINE_integer("sharded_devices", 8, "Simulated devices of the sharded part.")
_HIT_PLOT = flags.DEFINE_string(
  "hit_rate_plot", None, "Also plot the tiered section's hit rates into this PNG file."
)


def _config() -> sections.BenchConfig:
  if _SMOKE.value:
    return dataclasses.replace(sections.BenchConfig.smoke(), hit_rate_plot=_HIT_PLOT.value)
  return sections.BenchConfig(
    hit_rate_plot=_HIT_PLOT.value,
    table_gb=_TABLE_GB.value,
    ids=_IDS.value,
    dim=_DIM.value,
    zipf_a=_ZIPF_A.value,
    repeats=_REPEATS.value,
    devices=_DEVICES.value,
  )


def _sharded_in_subprocess(argv: list[str]) -> None:
  """Reruns this script for the sharded section with simulated devices, printing its output."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES.value}"
  )
  env["JAX_PLATFORMS"] = "cpu"
  del argv  # absl leaves only positional arguments there; the flags are in sys.argv
  passed = [a for a in sys.argv[1:] if not a.startswith("--sections")]
  cmd = [sys.executable, "-m", "bench.memory", "--sections=sharded", *passed]
  subprocess.run(cmd, env=env, check=True)


def main(argv):
  config = _config()
  print(
    f"bench.memory: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} "
    f"CPUs; {config}",
    flush=True,
  )
  for name in _SECTIONS.value:
    if name == "sharded" and jax.device_count() < config.devices:
      _sharded_in_subprocess(argv)
      continue
    for line in sections.run(name, config):
      print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
