"""Engram row fetch throughput from a DeepSeek-V4.1-shaped safetensors checkpoint.

Writes a synthetic checkpoint with the Engram tensors of V4.1-Flash's two layers (1 and 14)
with their real names, dtypes and layout (`layers.L.engram.embed.weight` F8_E4M3 [R, 256] rows
with `embed.scale` F8_E8M0 [R, 8], `wkv.weight` F8_E4M3 [5 D, 24 * 256] with its E8M0 block
scales, BF16 `q_weight` / `k_weight` [4, D], D = 5120) and random rows, `--table_gb` for both
tables; then fetches the rows of Zipfian ids (`bench.common.scattered_zipf`) for one decode step
(1 token x 2 layers x 24 heads) and one prefill batch (4096 tokens x 2 layers x 24 heads) from:

- `mmap cold`: the memory-mapped checkpoint after dropping the file from the page cache
  (`posix_fadvise(POSIX_FADV_DONTNEED)`; whether that worked is printed, checked with
  `mincore`), mapped afresh for each timed call;
- `mmap warm`: the same mapping with the rows' pages cached;
- `host RAM`: the tables copied into NumPy arrays (`+ decode`: the rows also decoded to
  float32 by NumPy, as the tiered fetch decodes the rows it misses);
- `tiered`: `memory.create('tiered', disk=(checkpoint tensors, 'mxfp8'))`, a calibrated static
  device cache of `--cache_fraction` of the rows over the mapped file (its hit rate printed;
  the fetch decodes to float32).

GB/s counts the stored bytes of the rows fetched (264 per row: 256 e4m3 values and 8 exponent
bytes; repeated ids counted each time), set against two ceilings measured in the same run: the
sequential read bandwidth of the checkpoint file (from disk where the page cache could be
dropped) and the memory copy bandwidth (bytes copied per second). Timings are the best of
`--repeats` calls.

    python -m bench.v41_rows --workdir=/tmp/v41 --json=v41_rows.json   # writes 4 GB first
    python -m bench.v41_rows --workdir=/tmp/v41 --reuse                # the file already there
    python -m bench.v41_rows --smoke --workdir=/tmp/v41_smoke          # a few MB, seconds

Shapes: R table rows, T tokens, H heads, Dh row width (256), D model width.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import mmap
import os
import pathlib
import time

import jax
import ml_dtypes
import numpy as np
from absl import app, flags

from bench.common import best_times, scattered_zipf
from engram_jax import memory
from engram_jax.interop import safetensors
from engram_jax.memory import host_buffers
from engram_jax.memory import storage as storage_lib

CHECKPOINT = "engram.safetensors"
_E4M3_NAN = 0x7F  # the e4m3fn code with every exponent and mantissa bit set (either sign)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the synthetic checkpoint.")
_REUSE = flags.DEFINE_bool("reuse", False, "Use the checkpoint already in --workdir.")
_TABLE_GB = flags.DEFINE_float("table_gb", 4.0, "Size of both Engram tables (1e9 B).")
_ZIPF_A = flags.DEFINE_float("zipf_a", 1.1, "Exponent of the Zipf distribution of the ids.")
_CACHE = flags.DEFINE_float("cache_fraction", 0.05, "Rows of each table the tiered cache holds.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (best kept).")
_SMOKE = flags.DEFINE_bool("smoke", False, "A few MB (checks the script in seconds).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this new JSON file.")


@dataclasses.dataclass(frozen=True)
class V41Config:
  """One run's sizes; the layers, row shape, head count and model width are those of
  DeepSeek-V4.1-Flash (whose tables hold 384 M rows a layer: the rows here are fewer)."""

  table_gb: float = 4.0
  zipf_a: float = 1.1
  cache_fraction: float = 0.05
  repeats: int = 5
  layers: tuple[int, ...] = (1, 14)
  heads: int = 24
  head_dim: int = 256
  model_dim: int = 5120
  hc: int = 4
  decode_tokens: int = 1
  prefill_tokens: int = 4096
  copy_mb: int = 256
  seed: int = 0

  @classmethod
  def smoke(cls) -> V41Config:
    return cls(table_gb=0.004, repeats=2, model_dim=64, prefill_tokens=256, copy_mb=8)

  def rows(self) -> int:
    """R of each layer's table."""
    per_row = storage_lib.row_bytes("mxfp8", self.head_dim)  # 264 B
    return max(1, int(self.table_gb * 1e9) // (len(self.layers) * per_row))


# ---- the synthetic checkpoint


class _Random:
  """A random array made chunk by chunk as `safetensors.write` slices it (never whole)."""

  def __init__(self, shape, dtype, make, seed: int):
    self.shape, self.dtype, self._make, self._seed = tuple(shape), np.dtype(dtype), make, seed

  def __getitem__(self, rows: slice) -> np.ndarray:
    start, stop, _ = rows.indices(self.shape[0])
    rng = np.random.default_rng((self._seed, start))
    return self._make(rng, (stop - start, *self.shape[1:])).astype(self.dtype, copy=False)


def _e4m3(rng, shape):
  codes = rng.integers(0, 256, shape, dtype=np.uint8)
  codes[(codes & _E4M3_NAN) == _E4M3_NAN] ^= 1  # no NaN codes: the largest finite instead
  return codes.view(ml_dtypes.float8_e4m3fn)


def _exponents(rng, shape):
  return rng.integers(120, 128, shape, dtype=np.uint8)  # scales 2**-7 .. 2**0


def _bf16(rng, shape):
  return (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16)


def v41_tensors(cfg: V41Config) -> tuple[dict, dict]:
  """The synthetic tensors ({name: lazily made array}) and the F8_E8M0 dtype overrides."""
  r, dh, block = cfg.rows(), cfg.head_dim, storage_lib.MX_BLOCK
  wkv_out, wkv_in = (1 + cfg.hc) * cfg.model_dim, cfg.heads * dh  # value and hc keys, from H rows
  tensors, overrides = {}, {}
  for k, layer in enumerate(cfg.layers):
    name = f"layers.{layer}.engram."
    specs = {
      "q_weight": ((cfg.hc, cfg.model_dim), ml_dtypes.bfloat16, _bf16),
      "k_weight": ((cfg.hc, cfg.model_dim), ml_dtypes.bfloat16, _bf16),
      "embed.scale": ((r, dh // block), np.uint8, _exponents),
      "wkv.scale": ((math.ceil(wkv_out / block), wkv_in // block), np.uint8, _exponents),
      "embed.weight": ((r, dh), ml_dtypes.float8_e4m3fn, _e4m3),
      "wkv.weight": ((wkv_out, wkv_in), ml_dtypes.float8_e4m3fn, _e4m3),
    }
    for j, (suffix, (shape, dtype, make)) in enumerate(specs.items()):
      tensors[name + suffix] = _Random(shape, dtype, make, seed=cfg.seed * 100 + k * 10 + j)
      if suffix.endswith("scale"):
        overrides[name + suffix] = "F8_E8M0"
  return tensors, overrides


def ensure_checkpoint(workdir, cfg: V41Config, reuse: bool) -> pathlib.Path:
  """The checkpoint file in `workdir`: written (refused where it exists), or reused."""
  path = pathlib.Path(workdir) / CHECKPOINT
  if path.exists() and not reuse:
    raise FileExistsError(f"{path}: exists; pass --reuse to measure it, or another --workdir")
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, overrides = v41_tensors(cfg)
    note = {"note": "synthetic DeepSeek-V4.1-shaped Engram weights (bench.v41_rows)"}
    safetensors.write(path, tensors, {"format": "pt", **note}, dtypes=overrides)
  return path


def table_parts(ckpt: safetensors.Checkpoint, layer: int, head_dim: int) -> dict:
  """{"values": [R, Dh] e4m3, "scale": [R, Dh/32] E8M0} memmaps of one layer's table."""
  name = f"layers.{layer}.engram.embed."
  values = ckpt.require(name + "weight", "F8_E4M3", (None, head_dim))
  scale_shape = (values.shape[0], head_dim // storage_lib.MX_BLOCK)
  return {"values": values, "scale": ckpt.require(name + "scale", "F8_E8M0", scale_shape)}


# ---- ceilings and the page cache


def resident_fraction(path) -> float | None:
  """The fraction of the file's pages in the page cache (`mincore`), None where unknown."""
  size = os.path.getsize(path)
  try:
    mincore = ctypes.CDLL(None, use_errno=True).mincore
  except (OSError, AttributeError):
    return None
  mapped = np.memmap(path, np.uint8, mode="r")  # offset 0: the mapping starts on a page
  pages = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
  ok = mincore(
    ctypes.c_void_p(mapped.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(pages.ctypes.data)
  )
  del mapped
  return None if ok != 0 else float(np.mean(pages & 1))


def drop_page_cache(path) -> tuple[bool, str]:
  """Asks the kernel to drop the file's cached pages; (whether they are gone, how we know).

  Pages mapped by a live memmap stay: drop only with the file's mappings deleted.
  """
  if not hasattr(os, "posix_fadvise"):
    return False, "no posix_fadvise on this platform"
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)  # dirty pages (a file just written) are not dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  except OSError as e:
    return False, f"posix_fadvise failed: {e}"
  finally:
    os.close(fd)
  resident = resident_fraction(path)
  if resident is None:
    return True, "posix_fadvise returned (mincore unavailable: not verified)"
  return resident < 0.01, f"{resident:.1%} of the file cached after posix_fadvise"


def sequential_read_gbps(path, chunk_mb: int = 64) -> float:
  """GB/s of one sequential pass over the file (unbuffered reads of `chunk_mb`)."""
  buffer = bytearray(chunk_mb << 20)
  total, start = 0, time.perf_counter()
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buffer):
      total += n
  return total / (time.perf_counter() - start) / 1e9


def copy_gbps(megabytes: int, repeats: int) -> float:
  """GB/s of a memory copy into a reused buffer (bytes copied per second), best of repeats."""
  src = np.ones(megabytes << 20, np.uint8)
  dst = np.empty_like(src)
  t = best_times({"copy": lambda: np.copyto(dst, src)}, repeats)["copy"]
  return src.nbytes / t / 1e9


# ---- fetches


def gather(parts_by_layer: list[dict], ids_by_layer: list[np.ndarray]) -> list[dict]:
  """The stored rows of each layer's ids: [{"values": [N, Dh], "scale": [N, Dh/32]}]."""
  return [
    {k: host_buffers.gather_rows(v, ids.reshape(-1)) for k, v in parts.items()}  # [T, H] -> [N]
    for parts, ids in zip(parts_by_layer, ids_by_layer, strict=True)
  ]


def gather_decoded(parts_by_layer, ids_by_layer) -> list[np.ndarray]:
  """The rows of each layer's ids decoded to float32: [[N, Dh]]."""
  return [storage_lib.decode(g, "mxfp8") for g in gather(parts_by_layer, ids_by_layer)]


def cold_seconds(path, cfg: V41Config, ids_by_layer) -> tuple[float, bool]:
  """Best seconds of a gather from a fresh mapping after each page cache drop; whether every
  drop worked."""
  best, dropped = math.inf, True
  for _ in range(cfg.repeats):
    dropped &= drop_page_cache(path)[0]
    ckpt = safetensors.Checkpoint.open(path)
    parts = [table_parts(ckpt, layer, cfg.head_dim) for layer in cfg.layers]
    start = time.perf_counter()
    gather(parts, ids_by_layer)
    best = min(best, time.perf_counter() - start)
    del parts  # unmapped: the next drop may evict every page
  return best, dropped


def tiered_tables(parts_by_layer, cfg: V41Config) -> list:
  """A calibrated static tiered table per layer over the mapped checkpoint."""
  tables = []
  for k, parts in enumerate(parts_by_layer):
    r = parts["values"].shape[0]
    table = memory.create(
      "tiered",
      num_rows=r,
      dim=cfg.head_dim,
      disk=(parts, "mxfp8"),
      cache_fraction=cfg.cache_fraction,
      policy="static",
    )
    rng = np.random.default_rng((cfg.seed, 1000 + k))  # other draws than the timed ids
    table.calibrate([scattered_zipf(rng, (cfg.prefill_tokens, cfg.heads), r, cfg.zipf_a)])
    tables.append(table)
  return tables


def workload_ids(cfg: V41Config, rows: list[int]) -> dict[str, list[np.ndarray]]:
  """{workload: [[T, H] int32 ids per layer]}: one decode step and one prefill batch."""
  out = {}
  for k, (name, tokens) in enumerate(
    [("decode", cfg.decode_tokens), ("prefill", cfg.prefill_tokens)]
  ):
    rng = np.random.default_rng((cfg.seed, k))
    out[name] = [scattered_zipf(rng, (tokens, cfg.heads), r, cfg.zipf_a) for r in rows]
  return out


def measure(path, cfg: V41Config) -> dict:
  """Every measurement of the module docstring; a JSON-ready report."""
  ckpt = safetensors.Checkpoint.open(path)
  rows = [table_parts(ckpt, layer, cfg.head_dim)["values"].shape[0] for layer in cfg.layers]
  del ckpt
  drop = drop_page_cache(path)
  ceilings = {"seq_read_gbps": sequential_read_gbps(path), "seq_read_cold": drop[0]}
  ceilings["copy_gbps"] = copy_gbps(cfg.copy_mb, cfg.repeats)
  ids = workload_ids(cfg, rows)
  results = []
  for name, ids_by_layer in ids.items():
    seconds, dropped = cold_seconds(path, cfg, ids_by_layer)
    results.append({"workload": name, "source": "mmap cold", "seconds": seconds, "cold": dropped})
  mapped = safetensors.Checkpoint.open(path)
  parts = [table_parts(mapped, layer, cfg.head_dim) for layer in cfg.layers]
  in_ram = [{k: np.array(v) for k, v in p.items()} for p in parts]  # whole tables: one copy
  tables = tiered_tables(parts, cfg)
  for name, ids_by_layer in ids.items():
    fns = {
      "mmap warm": lambda ids=ids_by_layer: gather(parts, ids),
      "host RAM": lambda ids=ids_by_layer: gather(in_ram, ids),
      "host RAM + decode": lambda ids=ids_by_layer: gather_decoded(in_ram, ids),
      "tiered": lambda ids=ids_by_layer: [t.fetch(i) for t, i in zip(tables, ids, strict=True)],
    }
    for table in tables:
      table.reset_stats()
    times = best_times(fns, cfg.repeats)
    hit_rate = float(np.mean([t.stats()["hit_rate"] for t in tables]))  # same ids per layer
    for source, seconds in times.items():
      results.append({"workload": name, "source": source, "seconds": seconds})
      if source == "tiered":
        results[-1]["hit_rate"] = hit_rate
  return _report(path, cfg, rows, drop, ceilings, ids, results)


def _report(path, cfg, rows, drop, ceilings, ids, results) -> dict:
  row_bytes = storage_lib.row_bytes("mxfp8", cfg.head_dim)
  results = sorted(results, key=lambda r: list(ids).index(r["workload"]))  # stable: by workload
  for r in results:
    n = sum(i.size for i in ids[r["workload"]])
    r |= {"rows": n, "bytes": n * row_bytes, "gbps": n * row_bytes / r["seconds"] / 1e9}
    r["of_seq_read"] = r["gbps"] / ceilings["seq_read_gbps"]
    r["of_copy"] = r["gbps"] / ceilings["copy_gbps"]
  return {
    "config": dataclasses.asdict(cfg),
    "checkpoint": {"path": str(path), "bytes": os.path.getsize(path), "rows_per_layer": rows},
    "page_cache_drop": {"dropped": drop[0], "detail": drop[1]},
    "ceilings": ceilings,
    "device": f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs",
    "results": results,
  }


def format_report(report: dict) -> list[str]:
  """The printed table."""
  c, drop, cfg = report["ceilings"], report["page_cache_drop"], report["config"]
  read_kind = "from disk" if c["seq_read_cold"] else "page cache not dropped"
  lines = [
    f"checkpoint {report['checkpoint']['path']}: {report['checkpoint']['bytes'] / 1e9:.3f} GB, "
    f"rows per layer {report['checkpoint']['rows_per_layer']}; {report['device']}",
    f"page cache drop: {'yes' if drop['dropped'] else 'NO'} ({drop['detail']})",
    f"sequential read of the file {c['seq_read_gbps']:.2f} GB/s ({read_kind}); "
    f"memory copy {c['copy_gbps']:.2f} GB/s",
    f"{'workload':8s} {'ids':>7s} {'source':18s} {'ms':>9s} {'GB/s':>8s} "
    f"{'vs seq read':>11s} {'vs memcpy':>9s}  notes",
  ]
  for r in report["results"]:
    note = {
      "mmap cold": "" if r.get("cold") else "page cache NOT dropped",
      "host RAM + decode": "rows decoded to float32",
      "tiered": f"cache of {cfg['cache_fraction']:.0%} of the rows, hit rate "
      f"{r.get('hit_rate', math.nan):.1%}; rows decoded to float32",
    }.get(r["source"], "")
    lines.append(
      f"{r['workload']:8s} {r['rows']:7d} {r['source']:18s} {r['seconds'] * 1e3:9.3f} "
      f"{r['gbps']:8.3f} {r['of_seq_read']:11.3f} {r['of_copy']:9.3f}  {note}"
    )
  return lines


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if _JSON.value and os.path.exists(_JSON.value):
    raise FileExistsError(f"--json {_JSON.value}: exists; refusing to overwrite it")
  cfg = V41Config.smoke() if _SMOKE.value else V41Config(table_gb=_TABLE_GB.value)
  cfg = dataclasses.replace(
    cfg, zipf_a=_ZIPF_A.value, cache_fraction=_CACHE.value, repeats=_REPEATS.value
  )
  if _SMOKE.value:
    cfg = dataclasses.replace(cfg, repeats=min(cfg.repeats, 2))
  path = ensure_checkpoint(_WORKDIR.value, cfg, _REUSE.value)
  report = measure(path, cfg)
  for line in format_report(report):
    print(line, flush=True)
  if _JSON.value:
    with open(_JSON.value, "x") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
