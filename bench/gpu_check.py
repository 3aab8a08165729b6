"""GPU checks of the Engram lookup, one section per question, all in one run.

Section `gather_bandwidth`: the Pallas multi-head gather against XLA's gather and against a
device-to-device copy of the same bytes, on multi-GB tables with Zipf-distributed ids (hashed
n-grams are heavy-tailed; `bench.common.scattered_zipf`: ranks truncated to each head's rows, hot
rows spread over them). Bandwidth counts the row bytes
read plus written (2 * N * H * Dh * itemsize) for all three, so the ratios compare like with
like; the goal is a Pallas gather at >= 0.75 of copy bandwidth (FBGEMM's embedding gather reaches
about 0.79 of HBM bandwidth on an H100). Several block sizes / warp counts are swept and each is
checked to return exactly XLA's rows.

Section `host_peak_memory`: a `host` table (pinned host memory) larger than a stated device
budget serves Zipf lookups and a small forward pass; the device's `peak_bytes_in_use` must stay
below the budget (the table never enters device memory). Run it first: the peak counts from
the start of the process.

Section `host_offload_overhead`: the same forward pass (a stack of matmuls, the Engram rows
added at one layer) fed from an on-device table (lookup inside the jit), from a host table by
two-stage dispatch with the next step's rows prefetched on a background thread, and from a host
table inside one jit (`compute_on` host gather). Goal: within 3% of the on-device table (the
paper's figure, §6.4).

Section `sharded_step`: the full train step of a preset (`--step_preset`, synthetic batches)
on every local device: a `fsdp` mesh over all of them (parameters and optimizer state split)
with the Engram tables `sharded` over the same devices (ids and rows by all-to-all); one device
trains unsharded. Reports tokens/s per device and the bytes one step sends between devices for
the tables (`ShardSpec.exchange_bytes`, lookups and updates of every Engram layer).

    python -m bench.gpu_check   # all sections, < 5 minutes on one GPU
    python -m bench.gpu_check --sections=gather_bandwidth --table_gb=2,8 --tokens=1048576
    python -m bench.gpu_check --smoke    # tiny sizes, Pallas interpret mode: runs on a CPU
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.common import run_prefetched, scattered_zipf, time_call, toy_forward
from engram_jax import memory, presets, sharding
from engram_jax.config import MemoryConfig, MeshConfig
from engram_jax.memory import dispatch
from engram_jax.train import aot
from engram_jax.train.step import Trainer
from pallas_kernels.gather import gather

GOAL_VS_COPY = 0.75
GOAL_OFFLOAD_OVERHEAD = 0.03

_SECTIONS = flags.DEFINE_list(
  "sections",
  ["host_peak_memory", "gather_bandwidth", "host_offload_overhead", "sharded_step"],
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


@dataclasses.dataclass(frozen=True)
class CheckConfig:
  """Sizes and timing of one run.

  Attributes:
    table_bytes: table sizes to measure, in bytes.
    tokens: N, tokens per lookup.
    heads: H, hash heads per token.
    row_width: Dh.
    dtype: table dtype name.
    zipf_a: Zipf exponent of the ids.
    timed_calls: calls per timing (enqueued back to back, one `block_until_ready`).
    warmup_calls: untimed calls first (compilation, autotuning, caches).
    block_rows: gather block sizes to sweep (None: the kernel's default).
    num_warps: Triton warp counts to sweep (None: the backend default).
    interpret: Pallas interpret mode (None: automatic, i.e. off on a GPU).
    seed: seed of the table and the ids.
    host_table_bytes: the host table of `host_peak_memory` (larger than the budget).
    device_budget_bytes: the device memory budget it is checked against.
    offload_table_bytes: the table of `host_offload_overhead` (on device and on host).
    offload_tokens: tokens per forward pass of the offload sections (T; H = `heads`).
    model_width: D of the forward pass's matmuls.
    model_layers: its layers; the rows are added after the first half.
  """

  table_bytes: tuple[int, ...] = (2 * 10**9, 8 * 10**9)
  tokens: int = 1 << 20
  heads: int = 16
  row_width: int = 64
  dtype: str = "bfloat16"
  zipf_a: float = 1.1
  timed_calls: int = 20
  warmup_calls: int = 3
  block_rows: tuple[int | None, ...] = (None, 64, 512)
  num_warps: tuple[int | None, ...] = (4, 8)
  interpret: bool | None = None
  seed: int = 0
  host_table_bytes: int = 24 * 10**9
  device_budget_bytes: int = 8 * 10**9
  offload_table_bytes: int = 4 * 10**9
  offload_tokens: int = 16384
  model_width: int = 4096
  model_layers: int = 8
  step_preset: str = "cpu_small"
  step_batch: int = 64
  step_seq: int = 256

  @classmethod
  def smoke(cls) -> CheckConfig:
    """Sizes that run in seconds on a CPU in interpret mode (N not a multiple of the block)."""
    return cls(
      table_bytes=(48 * 1024,),
      tokens=37,
      heads=3,
      row_width=24,
      timed_calls=2,
      warmup_calls=1,
      block_rows=(16,),
      num_warps=(None,),
      interpret=True,
      host_table_bytes=4 * 10**6,
      device_budget_bytes=2 * 10**6,
      offload_table_bytes=10**6,
      offload_tokens=64,
      model_width=32,
      model_layers=2,
      step_preset="tiny",
      step_batch=8,
      step_seq=16,
    )


def _result(section: str, table_gb: float, impl: str, seconds: float, nbytes: int) -> dict:
  return {
    "section": section,
    "table_gb": table_gb,
    "impl": impl,
    "ms": seconds * 1e3,
    "gb_per_s": nbytes / seconds / 1e9,
  }


def gather_bandwidth(config: CheckConfig) -> list[dict]:
  """Pallas gather vs XLA gather vs copy of the same bytes, per table size.

  Args:
    config: sizes and timing.

  Returns:
    One dict per (table size, implementation) with ms, GB/s, `vs_copy`, `vs_xla` and, for the
    Pallas rows, `exact` (rows identical to XLA's).
  """
  dtype = jnp.dtype(config.dtype)
  rng = np.random.default_rng(config.seed)
  timing = {"timed_calls": config.timed_calls, "warmup_calls": config.warmup_calls}
  results = []
  for table_bytes in config.table_bytes:
    rows_per_head = table_bytes // (config.row_width * dtype.itemsize) // config.heads
    num_rows = rows_per_head * config.heads
    key = jax.random.key(config.seed)
    table = jax.jit(jax.random.normal, static_argnums=(1, 2))(
      key, (num_rows, config.row_width), dtype
    )
    ids = scattered_zipf(rng, (config.tokens, config.heads), rows_per_head, config.zipf_a)
    ids = jnp.asarray(ids)  # [N, H]
    offsets = jnp.arange(config.heads, dtype=jnp.int32) * rows_per_head
    nbytes = 2 * ids.size * config.row_width * dtype.itemsize
    table_gb = num_rows * config.row_width * dtype.itemsize / 1e9

    xla = jax.jit(functools.partial(dispatch.lookup, implementation="xla"))
    copy_src = jnp.ones((ids.size, config.row_width), dtype)
    copy = time_call(jax.jit(jnp.copy), copy_src, **timing)
    del copy_src
    xla_rows = xla(table, ids, offsets)
    xla_s = time_call(xla, table, ids, offsets, **timing)
    measured = [_result("gather_bandwidth", table_gb, "copy", copy, nbytes)]
    measured.append(_result("gather_bandwidth", table_gb, "xla", xla_s, nbytes))
    for block_rows in config.block_rows:
      for num_warps in config.num_warps:
        kernel = jax.jit(
          functools.partial(
            gather,
            block_rows=block_rows,
            num_warps=num_warps,
            interpret=config.interpret,
          )
        )
        exact = bool(jnp.array_equal(kernel(table, ids, offsets), xla_rows))
        seconds = time_call(kernel, table, ids, offsets, **timing)
        name = f"pallas(block_rows={block_rows or 'auto'}, num_warps={num_warps or 'auto'})"
        measured.append(
          _result("gather_bandwidth", table_gb, name, seconds, nbytes) | {"exact": exact}
        )
    for row in measured:
      row["vs_copy"] = row["gb_per_s"] / measured[0]["gb_per_s"]
      row["vs_xla"] = row["gb_per_s"] / measured[1]["gb_per_s"]
    results.extend(measured)
    del table, xla_rows
  return results


def _pattern_rows(num_rows: int, width: int, dtype) -> np.ndarray:
  """[R, Dh] rows filled at memset speed: a ramp per row, column 0 = row index mod 256."""
  rows = np.empty((num_rows, width), dtype)
  rows[:] = np.linspace(-1.0, 1.0, width).astype(dtype)
  rows[:, 0] = (np.arange(num_rows) % 256).astype(dtype)
  return rows


def _flat_ids(config: CheckConfig, rng, rows_per_head: int) -> np.ndarray:
  ids = scattered_zipf(rng, (config.offload_tokens, config.heads), rows_per_head, config.zipf_a)
  return ids + np.arange(config.heads, dtype=np.int32) * rows_per_head  # [T, H] flat rows


def _forward(config: CheckConfig, dtype):
  return toy_forward(
    config.offload_tokens,
    config.model_width,
    config.model_layers,
    config.heads * config.row_width,
    dtype,
    config.seed,
  )


def host_peak_memory(config: CheckConfig) -> list[dict]:
  """Serves lookups + a forward pass from a host table larger than the device budget."""
  dtype = jnp.dtype(config.dtype)
  r = config.host_table_bytes // (config.row_width * dtype.itemsize) // config.heads
  rows = _pattern_rows(r * config.heads, config.row_width, dtype)
  table = memory.create(
    "host", num_rows=rows.shape[0], dim=config.row_width, dtype=dtype, rows=rows, trainable=False
  )
  expected = rows[:256].copy()
  del rows
  forward = jax.jit(_forward(config, dtype))
  rng = np.random.default_rng(config.seed)
  ids = [_flat_ids(config, rng, r) for _ in range(4)]
  row = {"section": "host_peak_memory", "impl": f"host(engine={table.engine})"}
  row["table_gb"] = table.num_rows * table.dim * dtype.itemsize / 1e9
  try:
    exact = bool(np.array_equal(np.asarray(table.fetch(ids[0] % 256)), expected[ids[0] % 256]))
    seconds = time_call(
      lambda: [forward(table.fetch(i)) for i in ids][-1],
      timed_calls=config.timed_calls,
      warmup_calls=config.warmup_calls,
    ) / len(ids)
  except Exception as err:  # a check reports what fails and goes on
    return [row | {"ms": float("nan"), "error": f"{err!r}"[:200]}]
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return [
    row
    | {
      "ms": seconds * 1e3,
      "exact": exact,
      "peak_gb": None if peak is None else peak / 1e9,
      "budget_gb": config.device_budget_bytes / 1e9,
      "table_in_memory_kind": table.state.table.sharding.memory_kind,
    }
  ]


def host_offload_overhead(config: CheckConfig) -> list[dict]:
  """Step time of a forward pass fed from an on-device table and from a host table."""
  dtype = jnp.dtype(config.dtype)
  r = config.offload_table_bytes // (config.row_width * dtype.itemsize) // config.heads
  rows = _pattern_rows(r * config.heads, config.row_width, dtype)
  model = _forward(config, dtype)
  jit_model = jax.jit(model)
  rng = np.random.default_rng(config.seed + 1)
  steps = [_flat_ids(config, rng, r) for _ in range(8)]
  timing = {"timed_calls": config.timed_calls, "warmup_calls": config.warmup_calls}
  table_gb = rows.size * dtype.itemsize / 1e9
  on_device = jax.jit(lambda state, i: model(memory.device.lookup(state, i)))

  def device_steps(state):
    return [on_device(state, i) for i in steps][-1]

  state = memory.device.init(rows, trainable=False)
  times = {"device table, one jit": time_call(functools.partial(device_steps, state), **timing)}
  del state  # the device copy goes before the host one is built
  table = memory.create(
    "host", num_rows=rows.shape[0], dim=config.row_width, dtype=dtype, rows=rows, trainable=False
  )
  del rows

  one_jit = jax.jit(lambda state, i: model(memory.host.lookup(state, i)))
  variants = {
    f"host table, two-stage + prefetch ({table.engine})": functools.partial(
      run_prefetched, table, jit_model, steps
    ),
    "host table, one jit (compute_on)": lambda: [one_jit(table.state, i) for i in steps][-1],
  }
  row = {"section": "host_offload_overhead", "table_gb": table_gb}
  results = []
  for name, fn in variants.items():
    try:
      times[name] = time_call(fn, **timing)
    except Exception as err:  # a check reports what fails and goes on
      results.append(row | {"impl": name, "ms": float("nan"), "error": f"{err!r}"[:200]})
  for name, seconds in times.items():
    overhead = seconds / times["device table, one jit"] - 1
    results.append(row | {"impl": name, "ms": seconds / len(steps) * 1e3, "overhead": overhead})
  return results


def sharded_step(config: CheckConfig) -> list[dict]:
  """Train steps of `step_preset` on all local devices: tokens/s per device, table bytes."""
  n = jax.local_device_count()
  mesh_cfg = MeshConfig(fsdp=n)
  exp = presets.get(config.step_preset)
  b, t = config.step_batch, config.step_seq
  layouts = aot.layouts_of(exp)
  kind = "sharded" if n > 1 else "device"
  mesh = sharding.make_mesh(mesh_cfg)
  backend = memory.backend(MemoryConfig(kind=kind), mesh, table_axes=mesh_cfg.table_axes)
  trainer = Trainer(exp.model, exp.optim, exp.train.steps, layouts, backend, mesh_cfg.rules)
  state = trainer.create_state(jax.random.key(config.seed), b, t)
  rng = np.random.default_rng(config.seed)
  tokens = rng.integers(0, exp.model.vocab_size, size=(b, t + 1)).astype(np.int32)
  hash_ids = {
    layer: rng.integers(0, min(lay.sizes), size=(b, t, lay.num_heads)).astype(np.int32)
    for layer, lay in layouts.items()
  }
  batch = trainer.shard_batch(
    {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "hash_ids": hash_ids}
  )
  step = jax.jit(trainer.train_step, donate_argnums=0)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]

  seconds = time_call(one_step, timed_calls=config.timed_calls, warmup_calls=config.warmup_calls)
  exchanged = 0
  if kind == "sharded":
    for lay in layouts.values():
      spec = memory.sharded.ShardSpec(mesh, backend.axis, backend.padded_rows(lay.num_rows))
      ids = b * t * lay.num_heads // spec.shards  # per device
      for update in (False, True):
        exchanged += n * spec.exchange_bytes(ids, lay.dim, 4, "all_to_all", update)
  return [
    {
      "section": "sharded_step",
      "table_gb": sum(lay.num_params for lay in layouts.values()) * 4 / 1e9,
      "impl": f"{config.step_preset} on {n} device(s), fsdp={n}, tables {kind}",
      "ms": seconds * 1e3,
      "tokens_per_s_per_device": b * t / seconds / n,
      "table_mb_exchanged_per_step": exchanged / 1e6,
    }
  ]


SECTIONS: dict[str, Callable[[CheckConfig], list[dict]]] = {
  "gather_bandwidth": gather_bandwidth,
  "host_peak_memory": host_peak_memory,
  "host_offload_overhead": host_offload_overhead,
  "sharded_step": sharded_step,
}


def run(config: CheckConfig, sections: Sequence[str]) -> list[dict]:
  """Runs the named sections in order and returns all their result rows."""
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    raise ValueError(f"sections: expected names from {sorted(SECTIONS)}, got {unknown}")
  results = []
  for section in sections:
    results.extend(SECTIONS[section](config))
  return results


def format_results(results: Sequence[dict]) -> str:
  """One line per result row, with the verdict against the copy-bandwidth goal for Pallas."""
  lines = [f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})"]
  for r in results:
    if r["section"] != "gather_bandwidth":
      lines.append(_format_offload(r))
      continue
    line = (
      f"{r['section']:17s} table {r['table_gb']:8.4g} GB  {r['impl']:38s} "
      f"{r['ms']:9.3f} ms {r['gb_per_s']:9.2f} GB/s  vs copy {r['vs_copy']:5.2f}  "
      f"vs xla {r['vs_xla']:5.2f}"
    )
    if "exact" in r:
      verdict = "meets" if r["vs_copy"] >= GOAL_VS_COPY else "below"
      line += f"  exact={r['exact']}  {verdict} goal {GOAL_VS_COPY:.2f} of copy"
    lines.append(line)
  return "\n".join(lines)


def _format_offload(r: dict) -> str:
  line = f"{r['section']:21s} table {r['table_gb']:8.4g} GB  {r['impl']:46s} {r['ms']:9.3f} ms"
  if r["section"] == "sharded_step":
    return line + (
      f"  {r['tokens_per_s_per_device']:,.0f} tokens/s per device, "
      f"{r['table_mb_exchanged_per_step']:.3f} MB of table traffic per step (all-to-all)"
    )
  if "error" in r:
    return line + f"  FAILED {r['error']}"
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
  )


def main(argv):
  del argv
  print(format_results(run(config_from_flags(), _SECTIONS.value)))


if __name__ == "__main__":
  app.run(main)
