"""GPU checks of the Engram lookup, one section per question, all in one run.

Section `gather_bandwidth`: the Pallas multi-head gather against XLA's gather and against a
device-to-device copy of the same bytes, on multi-GB tables with Zipf-distributed ids (hashed
n-grams are heavy-tailed; hot rows are spread over the table). Bandwidth counts the row bytes
read plus written (2 * N * H * Dh * itemsize) for all three, so the ratios compare like with
like; the goal is a Pallas gather at >= 0.75 of copy bandwidth (FBGEMM's embedding gather reaches
about 0.79 of HBM bandwidth on an H100). Several block sizes / warp counts are swept and each is
checked to return exactly XLA's rows. Later sections (host-offload overhead, peak memory) add a
function to `SECTIONS`.

    python -m bench.gpu_check [--table_gb=2,8 --tokens=1048576 --hash_heads=16 --row_width=64]
    python -m bench.gpu_check --smoke    # tiny sizes, Pallas interpret mode: runs on a CPU
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from engram_jax.memory import dispatch
from pallas_kernels.gather import gather

GOAL_VS_COPY = 0.75

_SECTIONS = flags.DEFINE_list("sections", ["gather_bandwidth"], "Sections to run, in order.")
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
    )


def time_call(fn: Callable, *args, timed_calls: int, warmup_calls: int) -> float:
  """Seconds per call: warm up, then enqueue `timed_calls` calls and wait for the last one."""
  for _ in range(warmup_calls):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = None
  for _ in range(timed_calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / timed_calls


def zipf_ids(rng: np.random.Generator, tokens: int, heads: int, rows: int, a: float) -> np.ndarray:
  """[N, H] int32 Zipf-distributed ids below `rows`, hot ids scattered over the head's rows."""
  ranks = rng.zipf(a, size=(tokens, heads)).astype(np.uint64) - np.uint64(1)
  return ((ranks * np.uint64(2654435761)) % np.uint64(rows)).astype(np.int32)


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
    ids = jnp.asarray(zipf_ids(rng, config.tokens, config.heads, rows_per_head, config.zipf_a))
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


SECTIONS: dict[str, Callable[[CheckConfig], list[dict]]] = {
  "gather_bandwidth": gather_bandwidth,
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
  )


def main(argv):
  del argv
  print(format_results(run(config_from_flags(), _SECTIONS.value)))


if __name__ == "__main__":
  app.run(main)
