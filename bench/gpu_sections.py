"""The measurements of `bench/gpu_check.py`, one function per section, and their sizes.

Each section takes a `CheckConfig` and returns result rows (dicts with at least `section`,
`impl`, `table_gb` and `ms`); `bench.gpu_check` runs them in order and prints them.

Shapes: N tokens per lookup, H hash heads, R table rows, Dh row width, T tokens of a forward
pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from bench.common import run_prefetched, scattered_zipf, time_call, toy_forward
from engram_jax import memory, presets, sharding
from engram_jax.config import MemoryConfig, MeshConfig
from engram_jax.memory import dispatch
from engram_jax.memory import storage as storage_lib
from engram_jax.train import aot
from engram_jax.train.step import Trainer
from pallas_kernels.gather import gather, gather_decode, gather_decode_reference


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
    step_preset: the preset of `sharded_step` (batch `step_batch` x `step_seq` tokens).
    decode_dtype: the compute dtype `decode_bandwidth` decodes stored rows into.
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
  decode_dtype: str = "bfloat16"

  @classmethod
  def smoke(cls) -> CheckConfig:
    """Sizes that run in seconds on a CPU in interpret mode (N not a multiple of the block)."""
    return cls(
      table_bytes=(48 * 1024,),
      tokens=37,
      heads=3,
      row_width=32,
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


def _stored_table(storage: str, num_rows: int, width: int, seed: int) -> tuple:
  """Random stored values [R, Dh] (and scale) of a storage type, made on the device."""
  key = jax.random.key(seed)

  @jax.jit
  def make(key):
    k1, k2 = jax.random.split(key)
    normal = jax.random.normal(k1, (num_rows, width), jnp.float32)
    if storage == "int8":
      values = jnp.clip(jnp.round(normal * 40), -127, 127).astype(jnp.int8)
      return values, jax.random.uniform(k2, (num_rows,), jnp.float32)
    if storage == "mxfp8":
      values = (normal * 100).astype(jnp.float8_e4m3fn)
      exponents = jax.random.randint(k2, (num_rows, width // 32), 120, 135).astype(jnp.uint8)
      return values, exponents
    return normal.astype(storage_lib.value_dtype(storage)), None

  return make(key)


def decode_bandwidth(config: CheckConfig) -> list[dict]:
  """Per storage type: the fused gather + decode kernel vs XLA's gather then decode vs a copy.

  Bandwidth counts the stored bytes read (values and scales) plus the decoded bytes written,
  N * H * (stored row bytes + Dh * out itemsize), for all three; the copy moves a buffer of
  half those bytes (read once, written once). Goal: >= 0.75 of copy for float32 and bfloat16
  rows.
  """
  out_dtype = jnp.dtype(config.decode_dtype)
  rng = np.random.default_rng(config.seed + 2)
  timing = {"timed_calls": config.timed_calls, "warmup_calls": config.warmup_calls}
  table_bytes = config.table_bytes[0]
  results = []
  for storage in storage_lib.STORAGE_TYPES:
    row_bytes = storage_lib.row_bytes(storage, config.row_width)
    rows_per_head = table_bytes // row_bytes // config.heads
    num_rows = rows_per_head * config.heads
    values, scale = _stored_table(storage, num_rows, config.row_width, config.seed)
    ids = jnp.asarray(
      scattered_zipf(rng, (config.tokens, config.heads), rows_per_head, config.zipf_a)
    )  # [N, H]
    offsets = jnp.arange(config.heads, dtype=jnp.int32) * rows_per_head
    nbytes = ids.size * (row_bytes + config.row_width * out_dtype.itemsize)
    kw = {"storage": storage, "scale": scale, "dtype": out_dtype}
    row = {"section": "decode_bandwidth", "table_gb": num_rows * row_bytes / 1e9}
    copy_src = jnp.ones((nbytes // 2,), jnp.uint8)
    times = {"copy": time_call(jax.jit(jnp.copy), copy_src, **timing)}
    del copy_src
    xla = jax.jit(lambda v, i, o, kw=kw: gather_decode_reference(v, i, o, **kw))
    pallas = jax.jit(
      lambda v, i, o, kw=kw: gather_decode(v, i, o, interpret=config.interpret, **kw)
    )
    times["xla gather + decode"] = time_call(xla, values, ids, offsets, **timing)
    times["pallas fused"] = time_call(pallas, values, ids, offsets, **timing)
    want = np.asarray(xla(values, ids, offsets), np.float32)
    got = np.asarray(pallas(values, ids, offsets), np.float32)
    exact = bool(np.array_equal(got, want, equal_nan=True))
    for name, seconds in times.items():
      measured = _result("decode_bandwidth", row["table_gb"], f"{storage}: {name}", seconds, nbytes)
      measured["storage"] = storage
      measured["vs_copy"] = times["copy"] / seconds
      measured["vs_xla"] = times["xla gather + decode"] / seconds
      if name == "pallas fused":
        measured["exact"] = exact
      results.append(measured)
    del values, scale, ids
  return results


def sharded_lookup(config: CheckConfig) -> list[dict]:
  """The `sharded` table's lookup on all local devices (one device too: the same shard_map and
  all-to-all over one shard), its owners' gathers by XLA and by the Pallas kernel: ms per lookup
  of N * H Zipf ids, row GB/s (2 * ids * Dh * itemsize), and whether both give the same rows."""
  n = jax.local_device_count()
  mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
  dtype = jnp.dtype(config.dtype)
  row_bytes = config.row_width * dtype.itemsize
  num_rows = config.table_bytes[0] // row_bytes
  rng = np.random.default_rng(config.seed + 3)
  m = config.tokens * config.heads // n * n  # [N*H] ids, cut to split evenly over the devices
  ids = scattered_zipf(rng, (m,), num_rows, config.zipf_a)
  timing = {"timed_calls": config.timed_calls, "warmup_calls": config.warmup_calls}
  spec = memory.sharded.ShardSpec(mesh, "data", num_rows)
  rows_fn = lambda a, b: _pattern_rows(b - a, config.row_width, dtype)
  state = memory.sharded.init(rows_fn, spec, config.row_width, dtype, trainable=False)
  ids_dev = jax.device_put(ids, spec.ids_sharding())
  results, got = [], {}
  for impl in ("xla", "pallas"):
    impl_spec = dataclasses.replace(spec, implementation=impl)
    lookup = jax.jit(functools.partial(memory.sharded.lookup, spec=impl_spec))
    seconds = time_call(lookup, state, ids_dev, **timing)
    got[impl] = np.asarray(lookup(state, ids_dev))
    name = f"sharded on {n} device(s), {impl}"
    results.append(_result("sharded_lookup", num_rows * row_bytes / 1e9, name, seconds, 0))
    results[-1]["gb_per_s"] = 2 * ids.size * row_bytes / seconds / 1e9
  results[1]["vs_xla"] = results[0]["ms"] / results[1]["ms"]
  results[1]["exact"] = bool(np.array_equal(got["pallas"], got["xla"]))
  return results
