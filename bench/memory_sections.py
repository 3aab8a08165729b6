"""Measurements of the memory backends, one function per section of `bench/memory.py`.

Each section returns printable lines; every ratio in them compares quantities measured in the
same process, interleaved (best of `repeats`), because the machine may be shared.

Shapes: R table rows, Dh row width, N ids, T tokens, H heads, D model width.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.common import best_times, run_prefetched, scattered_zipf, toy_forward, zipf_cdf
from engram_jax import plots
from engram_jax.config import OptimConfig
from engram_jax.memory import base, create, device, host, sharded, tiered

_CFG = OptimConfig()


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Sizes of one benchmark run (see bench/memory.py for the meaning of each section)."""

  table_gb: float = 2.0
  ids: int = 1 << 20
  dim: int = 64
  zipf_a: float = 1.1
  repeats: int = 5
  devices: int = 8
  prefetch_tokens: int = 8192
  prefetch_heads: int = 8
  model_width: int = 1024
  update_rows: tuple[int, ...] = (10**5, 10**7)
  update_ids: int = 16384
  update_dim: int = 32
  hit_rows: int = 10**6
  hit_batches: int = 16
  hit_batch_ids: int = 1 << 16
  cache_fractions: tuple[float, ...] = (0.01, 0.05, 0.2)
  hit_exponents: tuple[float, ...] = (1.0, 1.2)
  hit_rate_plot: str | None = None  # a PNG path: the tiered section also plots its hit rates

  @classmethod
  def smoke(cls) -> BenchConfig:
    return cls(
      table_gb=0.002,
      ids=4096,
      dim=16,
      repeats=2,
      prefetch_tokens=256,
      model_width=64,
      update_rows=(1000, 10000),
      update_ids=256,
      hit_rows=5000,
      hit_batches=4,
      hit_batch_ids=2048,
    )

  def rows(self, dim: int | None = None) -> int:
    return int(self.table_gb * 1e9) // ((dim or self.dim) * 4)


@functools.lru_cache(maxsize=1)
def _table_rows(rows: int, dim: int) -> np.ndarray:
  return base.init_rows(rows, dim, seed=0)


def _copies(n: int, dim: int) -> dict[str, Callable]:
  src = np.ones((n, dim), np.float32)
  dst = np.empty_like(src)
  return {"copy": lambda: np.copyto(dst, src), "copy_new": lambda: np.copy(src)}


def fetch_section(cfg: BenchConfig) -> list[str]:
  """Fetch throughput of each backend as a fraction of copy bandwidth."""
  r = cfg.rows()
  rows = _table_rows(r, cfg.dim)
  rng = np.random.default_rng(0)
  ids = scattered_zipf(rng, (cfg.ids,), r, cfg.zipf_a)
  nbytes = 2 * ids.size * cfg.dim * 4
  out = [
    f"## fetch: table {r * cfg.dim * 4 / 1e9:.2f} GB ({r:,} x {cfg.dim} f32), "
    f"{ids.size:,} Zipf({cfg.zipf_a}) ids ({np.unique(ids).size:,} distinct), "
    f"bytes = read + write of the rows"
  ]
  cases = [
    ("device", {"engine": "numpy"}),
    ("device", {"engine": "jit"}),
    ("host", {"engine": "numpy"}),
    ("host", {"engine": "jit"}),
    ("tiered", {"cache_fraction": 0.05, "policy": "static"}),
  ]
  for kind, opts in cases:
    table = create(kind, num_rows=r, dim=cfg.dim, rows=rows, trainable=False, **opts)
    if kind == "tiered":
      table.calibrate([scattered_zipf(rng, (cfg.ids,), r, cfg.zipf_a)])
    fns = {**_copies(ids.size, cfg.dim), "fetch": lambda t=table: t.fetch(ids).block_until_ready()}
    t = best_times(fns, cfg.repeats)
    name = f"{kind}({', '.join(f'{k}={v}' for k, v in opts.items())})"
    hit = f"  hit rate {table.stats()['hit_rate']:.3f}" if kind == "tiered" else ""
    out.append(
      f"{name:44s} {t['fetch'] * 1e3:8.1f} ms {nbytes / t['fetch'] / 1e9:6.2f} GB/s  "
      f"vs copy {t['copy'] / t['fetch']:5.2f}  vs copy into a new buffer "
      f"{t['copy_new'] / t['fetch']:5.2f}  (copy {nbytes / t['copy'] / 1e9:.1f} GB/s){hit}"
    )
    del table, fns
    gc.collect()
  return out


def prefetch_section(cfg: BenchConfig) -> list[str]:
  """Step time of a toy forward pass fed from each place the table may live."""
  r = cfg.rows()
  rows = _table_rows(r, cfg.dim)
  rng = np.random.default_rng(1)
  steps = [
    scattered_zipf(rng, (cfg.prefetch_tokens, cfg.prefetch_heads), r, cfg.zipf_a) for _ in range(8)
  ]
  model = toy_forward(cfg.prefetch_tokens, cfg.model_width, 4, cfg.prefetch_heads * cfg.dim)
  fixed_rows = jnp.asarray(rows[steps[0]])
  jit_model = jax.jit(model)
  on_device = jax.jit(lambda s, i: model(device.lookup(s, i)))

  def device_steps(state):
    return [on_device(state, i) for i in steps][-1].block_until_ready()

  times = best_times(
    {
      "model only": lambda: jit_model(fixed_rows).block_until_ready(),
      "device table, one jit": functools.partial(device_steps, device.init(rows, trainable=False)),
    },
    cfg.repeats,
  )
  gc.collect()  # the device table goes before the host one is built
  table = create("host", num_rows=r, dim=cfg.dim, rows=rows, trainable=False)
  one_jit = jax.jit(lambda s, i: model(host.lookup(s, i)))

  def two_stage():
    return [jit_model(table.fetch(i)) for i in steps][-1].block_until_ready()

  def prefetched():
    return run_prefetched(table, jit_model, steps).block_until_ready()

  times |= best_times(
    {
      "host table, one jit (compute_on gather)": lambda: [one_jit(table.state, i) for i in steps][
        -1
      ].block_until_ready(),
      "host table, two-stage": two_stage,
      "host table, two-stage + prefetch": prefetched,
    },
    cfg.repeats,
  )
  base_t = times["model only"] * len(steps)
  out = [
    f"## prefetch: {cfg.prefetch_tokens} tokens x {cfg.prefetch_heads} heads x "
    f"{cfg.dim} per step, width {cfg.model_width}, 4 layers; per step, best of "
    f"{cfg.repeats} runs of {len(steps)} steps"
  ]
  for name, t in times.items():
    total = t if name != "model only" else base_t
    out.append(
      f"{name:44s} {total / len(steps) * 1e3:8.2f} ms/step  vs model only {total / base_t:5.2f}x"
    )
  return out


def _update_step(table, ids, grads):
  table.apply_gradients(ids, grads, 1e-3, _CFG)
  jax.block_until_ready(table.state.table)


def update_section(cfg: BenchConfig) -> list[str]:
  """Sparse update step time against table size (and a dense Adam for contrast)."""
  rng = np.random.default_rng(2)
  out = [f"## update: {cfg.update_ids:,} Zipf ids x {cfg.update_dim} per step"]
  for kind in ("device", "host"):
    steps = {}
    for r in cfg.update_rows:
      table = create(
        kind, num_rows=r, dim=cfg.update_dim, rows=np.zeros((r, cfg.update_dim), np.float32)
      )
      ids = scattered_zipf(rng, (cfg.update_ids,), r, 1.1)
      grads = rng.standard_normal((cfg.update_ids, cfg.update_dim)).astype(np.float32)
      steps[r] = functools.partial(_update_step, table, ids, grads)
    times = best_times(steps, cfg.repeats * 2)  # the sizes interleaved
    for r, t in times.items():
      out.append(f"{kind:8s} sparse Adam  R={r:>12,}  {t * 1e3:8.2f} ms/step")
    lo, hi = cfg.update_rows[0], cfg.update_rows[-1]
    out.append(f"{kind:8s} ratio R={hi:,} / R={lo:,}: {times[hi] / times[lo]:.2f} (goal <= 1.2)")
    del steps
    gc.collect()
  adam = optax.adam(1e-3)
  for r in (cfg.update_rows[0], cfg.update_rows[0] * 10):
    params = jnp.zeros((r, cfg.update_dim))
    state = adam.init(params)
    dense = jax.jit(lambda p, s, g: optax.apply_updates(p, adam.update(g, s, p)[0]))
    t = best_times(
      {"d": lambda p=params, s=state, f=dense: f(p, s, p).block_until_ready()}, cfg.repeats
    )["d"]
    out.append(f"dense optax Adam            R={r:>12,}  {t * 1e3:8.2f} ms/step")
  return out


def tiered_hit_rates(cfg: BenchConfig) -> list[dict]:
  """Hit rate of each policy against cache size and Zipf exponent.

  Returns:
    One record per (exponent, cache fraction): {"zipf", "fraction", "ideal", and the hit rate
    of every policy under its name}.
  """
  r = cfg.hit_rows
  records = []
  for a in cfg.hit_exponents:
    rng = np.random.default_rng(3)
    calib = [scattered_zipf(rng, (cfg.hit_batch_ids,), r, a) for _ in range(cfg.hit_batches)]
    evals = [scattered_zipf(rng, (cfg.hit_batch_ids,), r, a) for _ in range(cfg.hit_batches)]
    cdf = zipf_cdf(r, a)
    for frac in cfg.cache_fractions:
      record = {"zipf": a, "fraction": frac, "ideal": float(cdf[round(frac * r) - 1] / cdf[-1])}
      for policy in tiered.POLICIES:
        table = create(
          "tiered",
          num_rows=r,
          dim=4,
          cache_fraction=frac,
          policy=policy,
          refresh_every=4,
          trainable=False,
        )
        if policy == "static":
          table.calibrate(calib)
        else:
          for ids in calib:
            table.fetch(ids)
        table.reset_stats()
        for ids in evals:
          table.fetch(ids)
        record[policy] = table.stats()["hit_rate"]
      records.append(record)
  return records


def format_hit_rates(cfg: BenchConfig, records: list[dict]) -> list[str]:
  """The printed lines of `tiered_hit_rates`' records."""
  out = [
    f"## tiered: R={cfg.hit_rows:,}, {cfg.hit_batches} calibration + {cfg.hit_batches} "
    f"measured batches of {cfg.hit_batch_ids:,} ids"
  ]
  for rec in records:
    rates = "  ".join(f"{p} {rec[p]:.3f}" for p in tiered.POLICIES)
    out.append(
      f"zipf {rec['zipf']:3.1f}  cache {rec['fraction']:5.0%} of rows: hit rate {rates}  "
      f"ideal {rec['ideal']:.3f}"
    )
  return out


def tiered_section(cfg: BenchConfig) -> list[str]:
  """Hit rate against cache size and Zipf exponent (plotted too if `cfg.hit_rate_plot`)."""
  records = tiered_hit_rates(cfg)
  lines = format_hit_rates(cfg, records)
  if cfg.hit_rate_plot:
    plots.hit_rates(records, tiered.POLICIES, cfg.hit_rate_plot)
    lines.append(f"hit rates plotted in {cfg.hit_rate_plot}")
  return lines


_HLO_OP = re.compile(r"= (.*?) (all-to-all|all-gather|reduce-scatter)\(")
_HLO_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"s32": 4, "f32": 4, "u32": 4, "bf16": 2, "pred": 1}


def collective_bytes(hlo_text: str, shards: int) -> dict[str, int]:
  """Bytes one device sends per collective kind in a compiled module (from result shapes; an
  all-to-all result may be a tuple of one part per device)."""
  sent: dict[str, int] = {}
  for result, op in _HLO_OP.findall(hlo_text):
    size = sum(
      math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
      for dtype, dims in _HLO_SHAPE.findall(result)
    )
    share = size * (shards - 1) if op == "reduce-scatter" else size * (shards - 1) // shards
    sent[op] = sent.get(op, 0) + share
  return sent


def _first_ready(fn, *args):
  return fn(*args)[0].block_until_ready()


def sharded_section(cfg: BenchConfig) -> list[str]:
  """All-to-all against all-gather routing: bytes per step and times (needs >= 2 devices).

  Uses a quarter of the table and half the ids of the fetch section: the simulated devices
  share one host's memory, and the bytes moved depend on the ids only.
  """
  s = jax.device_count()
  mesh = jax.make_mesh((s,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  r, n = cfg.rows() // 4, cfg.ids // (2 * s)
  ids = scattered_zipf(np.random.default_rng(4), (s * n,), r, cfg.zipf_a)
  distinct = np.mean([np.unique(part).size for part in ids.reshape(s, n)])
  out = [
    f"## sharded: {s} devices, table {r * cfg.dim * 4 / 1e9:.2f} GB, {n:,} Zipf ids per "
    f"device per step ({distinct:,.0f} distinct), bytes one device sends per fetch"
  ]
  rows = _table_rows(r, cfg.dim)
  state = None
  for route, slack in (("all_to_all", 2.0), ("all_to_all", 0.5), ("all_gather", 2.0)):
    spec = sharded.ShardSpec(mesh, "data", r, slack=slack, route=route)
    if state is None:  # one split serves every route
      state = sharded.init(lambda a, b: rows[a:b], spec, cfg.dim, np.float32, trainable=False)
    placed = jax.device_put(ids, spec.ids_sharding())
    fn = jax.jit(sharded.lookup_with_route, static_argnames="spec")
    measured = collective_bytes(fn.lower(state, placed, spec).compile().as_text(), s)
    ours = ("all-to-all",) if route == "all_to_all" else ("all-gather", "reduce-scatter")
    sent = sum(v for k, v in measured.items() if k in ours)
    got, overflow = fn(state, placed, spec)
    exact = bool(np.array_equal(np.asarray(got), rows[ids]))
    t = best_times(
      {**_copies(s * n, cfg.dim), "f": functools.partial(_first_ready, fn, state, placed, spec)},
      cfg.repeats,
    )
    capacity = spec.capacity(n) if route == "all_to_all" else n
    took = "all_gather" if bool(np.asarray(overflow)[0]) else "all_to_all"
    out.append(
      f"{route:10s} slack {slack:3.1f} capacity {capacity:>7,}: route's formula "
      f"{spec.exchange_bytes(n, cfg.dim, 4, route) / 1e6:7.2f} MB, compiled "
      f"{sent / 1e6:7.2f} MB; this step took {took:10s} "
      f"{spec.exchange_bytes(n, cfg.dim, 4, took) / 1e6:7.2f} MB  exact {exact}  "
      f"{t['f'] * 1e3:7.1f} ms  vs copy {t['copy'] / t['f']:5.2f}"
    )
  return out


SECTIONS: dict[str, Callable[[BenchConfig], list[str]]] = {
  "fetch": fetch_section,
  "prefetch": prefetch_section,
  "update": update_section,
  "tiered": tiered_section,
  "sharded": sharded_section,
}


def run(name: str, cfg: BenchConfig) -> list[str]:
  """The lines of one section."""
  if name not in SECTIONS:
    raise ValueError(f"sections: expected names from {sorted(SECTIONS)}, got {name!r}")
  if name in ("update", "tiered"):
    _table_rows.cache_clear()  # the 2 GB of rows the other sections share
    gc.collect()
  return SECTIONS[name](cfg)
