"""Helpers every benchmark script shares: timing, Zipf-distributed ids, a toy forward pass.

- `best_times`: best seconds per call of several functions, calls interleaved (a shared
  machine's noise hits all alike); for comparisons within one run.
- `time_call`: seconds per call of one function, calls enqueued back to back and the last one
  waited for (device throughput, dispatch overlapped).
- `scattered_zipf`: ids whose ranks follow Zipf(a) truncated to the table's rows, hot ranks
  scattered over the rows (hashed n-grams are heavy-tailed and spread over the table).
- `malloc_setting`: a script's `--keep_freed_memory` applied, and named for its header.
- `toy_forward`, `run_prefetched`: a forward pass to hide a fetch behind, and the loop that
  feeds it from a table's background prefetch.

Shapes: R table rows, T tokens, H heads, Dh row width, D model width.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from engram_jax.train import malloc

_SCATTER = np.uint64(2654435761)  # a prime: rank -> rank * _SCATTER mod R is a bijection


def malloc_setting(keep: bool) -> str:
  """Applies a script's `--keep_freed_memory` (`engram_jax.train.malloc`; call it before JAX's
  first computation) and returns how malloc is set, for the script's header line."""
  if keep and not malloc.keep_freed_memory():
    raise app.UsageError(malloc.NOT_GLIBC)
  return "keeps freed memory" if keep else "as the C library sets it"


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Best seconds per call of each function, calls interleaved, one warm-up each.

  Each call's output is waited for (`jax.block_until_ready`), so a function may return jax
  arrays still being computed.

  Args:
    fns: {name: function of no arguments}.
    repeats: timed calls of each function.

  Returns:
    {name: best seconds of one call}.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  best = dict.fromkeys(fns, math.inf)
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      best[name] = min(best[name], time.perf_counter() - start)
  return best


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


def scattered_zipf(rng: np.random.Generator, shape, rows: int, a: float) -> np.ndarray:
  """Ids whose ranks follow Zipf(a) truncated to `rows` ranks (sampled by inverting the CDF),
  hot ranks scattered over the rows by a multiplicative hash (a bijection: the multiplier is
  prime).

  Args:
    rng: the random generator.
    shape: shape of the ids, e.g. (N,) or (T, H).
    rows: R; every id is below it.
    a: the Zipf exponent (any a > 0: the truncation keeps the distribution proper).

  Returns:
    int32 ids of `shape` in [0, R).
  """
  cdf = zipf_cdf(rows, a)
  ranks = np.searchsorted(cdf, rng.random(shape) * cdf[-1]).astype(np.uint64)
  return ((ranks * _SCATTER) % np.uint64(rows)).astype(np.int32)


@functools.lru_cache(maxsize=4)
def zipf_cdf(rows: int, a: float) -> np.ndarray:
  """[R] unnormalised CDF of Zipf(a) over ranks 1..R (`cdf[k - 1] / cdf[-1]`: the probability
  mass of the k hottest rows)."""
  return np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -a)


def toy_forward(
  tokens: int, width: int, layers: int, row_width: int, dtype=jnp.float32, seed: int = 1
):
  """A forward pass to hide a fetch behind: `layers` D x D matmuls over [T, D], the Engram rows
  [T, H, Dh] (H * Dh = `row_width`) projected and added after half the layers.

  Returns:
    model(rows) -> scalar (jit it).
  """
  key = jax.random.key(seed)
  w = (jax.random.normal(key, (layers, width, width)) / math.sqrt(width)).astype(dtype)
  proj = (jax.random.normal(key, (row_width, width)) / math.sqrt(row_width)).astype(dtype)

  def model(rows):
    x = jnp.ones((tokens, width), dtype)
    for layer in range(layers):
      if layer == layers // 2:
        x = x + rows.reshape(tokens, row_width).astype(dtype) @ proj  # [T, H*Dh] @ [H*Dh, D]
      x = jnp.tanh(x @ w[layer])  # [T, D] @ [D, D]
    return jnp.sum(x.astype(jnp.float32))

  return model


def run_prefetched(table, step_fn: Callable, batches: list):
  """Runs `step_fn(rows)` per batch of ids, each batch's rows fetched on the table's prefetch
  thread while the previous step runs; returns the last step's output."""
  pending, out = table.prefetch(batches[0]), None
  for k in range(len(batches)):
    rows = pending.result()
    if k + 1 < len(batches):
      pending = table.prefetch(batches[k + 1])  # overlaps this step
    out = step_fn(rows)
  return out
