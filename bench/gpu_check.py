"""GPU checks of the Engram lookup, one section per question, all in one run.

Section `gather_bandwidth`: the Pallas multi-head gather against XLA's gather and against a
device-to-device copy of the same bytes, on multi-GB tables with Zipf-distributed ids (hashed
n-grams are heavy-tailed; `bench.common.scattered_zipf`: ranks truncated to each head's rows, hot
rows spread over them). Bandwidth counts the row bytes
read plus written (2 * N * H * Dh * itemsize) for all three, so the ratios compare like with
like; the goal is a Pallas gather at >= 0.75 of copy bandwidth (FBGEMM's embedding gather reaches
about 0.79 of HBM bandwidth on an H100). Several block sizes / warp counts are swept and each is
checked to return exactly XLA's rows.

Section `decode_bandwidth`: for every storage type (float32, bfloat16, int8 with a row scale,
MXFP8 = e4m3 with an E8M0 exponent per 32 columns), the fused gather + decode kernel
(`pallas_kernels.gather.gather_decode`) against XLA's gather followed by the decoding and
against a device copy, counting the stored bytes read plus the decoded bytes written. Goal:
>= 0.75 of copy bandwidth for float32 and bfloat16 rows.

Section `host_peak_memory`: a `host` table (pinned host memory) larger than a stated device
budget serves Zipf lookups and a small forward pass; the device's `peak_bytes_in_use` must stay
below the budget (the table never enters device memory). Run it first: the peak counts from
the start of the process.

Section `host_offload_overhead`: the same forward pass (a stack of matmuls, the Engram rows
added at one layer) fed from an on-device table (lookup inside the jit), from a host table by
two-stage dispatch with the next step's rows prefetched on a background thread, and from a host
table inside one jit (`compute_on` host gather). Goal: within 3% of the on-device table (the
paper's figure, §6.4).

Section `sharded_lookup`: the `sharded` backend's lookup (ids and rows by all-to-all inside
`shard_map`) on every local device, with each owner's gather done by the Pallas kernel and by
XLA; checks that both return the same rows.

Section `sharded_step`: the full train step of a preset (`--step_preset`, synthetic batches)
on every local device: a `fsdp` mesh over all of them (parameters and optimizer state split)
with the Engram tables `sharded` over the same devices (ids and rows by all-to-all); one device
trains unsharded. Reports tokens/s per device and the bytes one step sends between devices for
the tables (`ShardSpec.exchange_bytes`, lookups and updates of every Engram layer).

Every section's rows are printed as soon as it ends (and, with `--json=FILE`, written to a new
JSON file); a section that fails prints its error and the run goes on (exit status 1 at the end).

    python -m bench.gpu_check   # all sections, < 5 minutes on one GPU
    python -m bench.gpu_check --sections=gather_bandwidth --table_gb=2,8 --tokens=1048576
    python -m bench.gpu_check --smoke    # tiny sizes, Pallas interpret mode: runs on a CPU
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
from absl import app, flags

from bench import gpu_sections
from bench.gpu_sections import CheckConfig

GOAL_VS_COPY = 0.75
GOAL_OFFLOAD_OVERHEAD = 0.03

_SECTIONS = flags.DEFINE_list(
  "sections",
  [
    "host_peak_memory",
    "gather_bandwidth",
    "decode_bandwidth",
    "host_offload_overhead",
    "sharded_lookup",
    "sharded_step",
  ],
  "Sections to run, in order.",
)
_TABLE_GB = flags.DEFINE_list("table_gb", ["2", "8"], "Table sizes in GB (1e9 bytes).")
_TOKENS = flags.DEFINE_integer("tokens", 1 << 20, "Tokens per lookup (N).")
_HASH_HEADS = flags.DEFINE_integer("hash_heads", 16, "Hash heads per token (H).")
_ROW_WIDTH = flags.DEFINE_integer("row_width", 64, "Row width (Dh).")
_TABLE_DTYPE = flags.DEFINE_enum("table_dtype", "bfloat16", ["bfloat16", "float32"], "Dtype.")
_ZIPF_A = flags.DEFINE_float("zipf_a", 1.1, "Exponent of the Zipf distribution of the ids.")
_TIMED_CALLS = flags.DEFINE_integer("timed_calls", 20, "Timed calls per measurement.")
_WARMUP_CALLS = flags.DEFINE_integer("warmup_calls", 3, "Untimed calls before timing.")
_BLOCK_ROWS = flags.DEFINE_list("block_rows", ["auto", "64", "512"], "Gather blocks to sweep.")
_NUM_WARPS = flags.DEFINE_list("num_warps", ["4", "8"], "Triton warp counts to sweep.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes in interpret mode (runs on a CPU).")
_HOST_TABLE_GB = flags.DEFINE_float("host_table_gb", 24.0, "Host table of host_peak_memory.")
_DEVICE_BUDGET_GB = flags.DEFINE_float("device_budget_gb", 8.0, "Stated device budget (GB).")
_STEP_PRESET = flags.DEFINE_string("step_preset", "cpu_small", "Preset of sharded_step.")
_OFFLOAD_TABLE_GB = flags.DEFINE_float("offload_table_gb", 4.0, "Table of the overhead section.")
_DECODE_DTYPE = flags.DEFINE_enum(
  "decode_dtype", "bfloat16", ["bfloat16", "float32"], "Dtype decode_bandwidth decodes into."
)
_JSON = flags.DEFINE_string("json", None, "Also write every result row to this new JSON file.")


SECTIONS: dict[str, Callable[[CheckConfig], list[dict]]] = {
  "gather_bandwidth": gpu_sections.gather_bandwidth,
  "decode_bandwidth": gpu_sections.decode_bandwidth,
  "host_peak_memory": gpu_sections.host_peak_memory,
  "host_offload_overhead": gpu_sections.host_offload_overhead,
  "sharded_lookup": gpu_sections.sharded_lookup,
  "sharded_step": gpu_sections.sharded_step,
}


def run(
  config: CheckConfig,
  sections: Sequence[str],
  report: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
  """Runs the named sections in order and returns all their result rows.

  A section that raises gives one row with its `error` and the run goes on to the next one;
  `report` (if given) receives each section's rows as soon as it ends.
  """
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    raise ValueError(f"sections: expected names from {sorted(SECTIONS)}, got {unknown}")
  results = []
  for section in sections:
    try:
      rows = SECTIONS[section](config)
    except Exception as err:  # a check reports what fails and goes on
      nan = float("nan")
      rows = [{"section": section, "impl": "(section)", "table_gb": nan, "ms": nan}]
      rows[0]["error"] = f"{type(err).__name__}: {err}"[:400]
    results.extend(rows)
    if report is not None:
      report(rows)
  return results


def format_results(results: Sequence[dict]) -> str:
  """One line per result row, with the verdict against the copy-bandwidth goal for Pallas."""
  return "\n".join(_format_row(r) for r in results)


def _format_row(r: dict) -> str:
  if "error" in r:
    return f"{r['section']:21s} {r['impl']:46s} FAILED {r['error']}"
  if r["section"] not in ("gather_bandwidth", "decode_bandwidth", "sharded_lookup"):
    return _format_offload(r)
  line = (
    f"{r['section']:17s} table {r['table_gb']:8.4g} GB  {r['impl']:38s} "
    f"{r['ms']:9.3f} ms {r['gb_per_s']:9.2f} GB/s"
  )
  if "vs_copy" in r:
    line += f"  vs copy {r['vs_copy']:5.2f}"
  if "vs_xla" in r:
    line += f"  vs xla {r['vs_xla']:5.2f}"
  if "exact" in r:
    line += f"  exact={r['exact']}"
    if "vs_copy" in r and r.get("storage", "float32") in ("float32", "bfloat16"):
      verdict = "meets" if r["vs_copy"] >= GOAL_VS_COPY else "below"
      line += f"  {verdict} goal {GOAL_VS_COPY:.2f} of copy"
  return line


def _format_offload(r: dict) -> str:
  line = f"{r['section']:21s} table {r['table_gb']:8.4g} GB  {r['impl']:46s} {r['ms']:9.3f} ms"
  if r["section"] == "sharded_step":
    return line + (
      f"  {r['tokens_per_s_per_device']:,.0f} tokens/s per device, "
      f"{r['table_mb_exchanged_per_step']:.3f} MB of table traffic per step (all-to-all)"
    )
  if "overhead" in r:
    verdict = "meets" if r["overhead"] <= GOAL_OFFLOAD_OVERHEAD else "above"
    return line + f"  overhead {r['overhead']:+7.2%}  {verdict} goal {GOAL_OFFLOAD_OVERHEAD:.0%}"
  if r["peak_gb"] is None:
    peak = "peak n/a (this backend has no memory_stats)"
  else:
    verdict = "within" if r["peak_gb"] < r["budget_gb"] else "OVER"
    peak = f"peak {r['peak_gb']:.3f} GB, {verdict} the budget of {r['budget_gb']:.3g} GB"
  return line + f"  exact={r['exact']}  table in {r['table_in_memory_kind']}; device {peak}"


def _sweep(values: Sequence[str]) -> tuple[int | None, ...]:
  return tuple(None if v == "auto" else int(v) for v in values)


def config_from_flags() -> CheckConfig:
  """The run's config: `--smoke` or the size flags."""
  if _SMOKE.value:
    return CheckConfig.smoke()
  return CheckConfig(
    table_bytes=tuple(int(float(gb) * 1e9) for gb in _TABLE_GB.value),
    tokens=_TOKENS.value,
    heads=_HASH_HEADS.value,
    row_width=_ROW_WIDTH.value,
    dtype=_TABLE_DTYPE.value,
    zipf_a=_ZIPF_A.value,
    timed_calls=_TIMED_CALLS.value,
    warmup_calls=_WARMUP_CALLS.value,
    block_rows=_sweep(_BLOCK_ROWS.value),
    num_warps=_sweep(_NUM_WARPS.value),
    host_table_bytes=int(_HOST_TABLE_GB.value * 1e9),
    device_budget_bytes=int(_DEVICE_BUDGET_GB.value * 1e9),
    offload_table_bytes=int(_OFFLOAD_TABLE_GB.value * 1e9),
    step_preset=_STEP_PRESET.value,
    decode_dtype=_DECODE_DTYPE.value,
  )


def main(argv):
  del argv
  config = config_from_flags()
  out = pathlib.Path(_JSON.value) if _JSON.value else None
  if out is not None and out.exists():
    raise app.UsageError(f"--json: {out} exists; give a new path (results are never overwritten)")
  device = jax.devices()[0]
  header = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__}
  print(f"device: {header['device']} ({header['backend']}), jax {header['jax']}", flush=True)
  results: list[dict] = []

  def report(rows: list[dict]) -> None:
    results.extend(rows)
    print(format_results(rows), flush=True)
    if out is not None:  # rewritten after every section: an interrupted run keeps what ended
      out.write_text(json.dumps({**header, "config": repr(config), "results": results}, indent=1))

  run(config, _SECTIONS.value, report)
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
