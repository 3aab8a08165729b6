"""Train-step time of an Engram model against its iso-parameter MoE baseline, and the share of
the machine a step uses.

Both jitted steps run on the same batch, interleaved (Engram, baseline, Engram, ...) in one
process so machine noise hits both alike; the script prints the median step time of each and
their ratio (goal: Engram costs at most 10% more per step). Host hashing is not part of the
step (it runs in the data pipeline ahead of time), so it is timed separately and printed too.

The share of the machine: each model's tokens/s, its achieved GFLOP/s (3 x the model's own
`flops_per_token` x tokens/s: forward plus a backward of twice the forward) and that as a share
of the fp32 matmul rate measured in the same run on the model's own matmul shapes (goal on
`cpu_small`: >= 0.45); and XLA's executed FLOPs (cost analysis) of forward + backward against
that accounting (goal: within 1.3x), and of the whole step (which adds Muon's Newton-Schulz
iterations on every matrix, outside the model's accounting). The last gives the share's
ceiling: accounted over executed FLOPs, the share if the whole step ran at the matmul rate.

With `--keep_freed_memory`, glibc's malloc reuses freed memory instead of mapping fresh pages
for every large buffer (`engram_jax.train.malloc`): the same figures without XLA:CPU's
page faults.

    python -m bench.train_step [--preset cpu_small --repeats 20 --keep_freed_memory]
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.common import best_times, malloc_setting
from engram_jax import presets
from engram_jax.data import default_tokenizer_path
from engram_jax.hashing import EngramHashing
from engram_jax.params import count_params
from engram_jax.train.step import Trainer

_PRESET = flags.DEFINE_string("preset", "cpu_small", "An Engram preset.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps of each model.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Override the preset's batch size.")
_SEQ = flags.DEFINE_integer("seq_len", None, "Override the preset's sequence length.")
_KEEP = flags.DEFINE_bool(
  "keep_freed_memory", False, "Set glibc's malloc to reuse freed memory (no fresh pages)."
)


def _trainer(exp, vocab_size, wiring):
  model = dataclasses.replace(exp.model, vocab_size=vocab_size)
  layouts = wiring.layouts if model.engram is not None else {}
  return Trainer(model, exp.optim, exp.train.steps, layouts)


def matmul_rate(model, tokens: int, repeats: int) -> float:
  """fp32 FLOP/s of the model's matmul shapes ([tokens, D] against the attention projections,
  an expert's and the dense FFN's widths, and the LM head), timed back to back."""
  d = model.d_model
  widths = [model.num_heads * model.head_dim, model.ffn_hidden, model.vocab_size]
  if model.moe is not None:
    widths.append(model.moe.expert_hidden)
  key = jax.random.key(0)
  x = jax.random.normal(key, (tokens, d), jnp.float32)
  ws = [
    jax.random.normal(jax.random.fold_in(key, i), (d, w), jnp.float32) for i, w in enumerate(widths)
  ]
  dot = jax.jit(lambda x, w: x @ w)
  flops = sum(2 * tokens * d * w for w in widths)
  best = best_times({"matmuls": lambda: [dot(x, w) for w in ws]}, repeats)["matmuls"]
  return flops / best


def _flops(fn, *args) -> float:
  """XLA's executed FLOPs of a jitted function (cost analysis of the compiled program)."""
  cost = fn.lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def measure(preset: str, repeats: int, batch_size=None, seq_len=None) -> dict:
  """Median step times (seconds) of the Engram model and its baseline, and the hashing time."""
  exp = presets.get(preset)
  t = dataclasses.replace(
    exp.train,
    **{k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len)) if v is not None},
  )
  exp = dataclasses.replace(exp, train=t)
  wiring = EngramHashing.from_file(
    exp.model.engram, default_tokenizer_path(), init_std=exp.model.engram_init_std
  )
  vocab = wiring.compressor.vocab_size
  tokens = np.random.default_rng(0).integers(0, vocab, size=(t.batch_size, t.seq_len + 1))
  start = time.perf_counter()
  hash_ids = wiring.hash_ids(tokens[:, :-1])  # [B, T] -> {layer: [B, T, H]}
  first_hash_seconds = time.perf_counter() - start  # loads the compiled kernel
  hash_times = []
  for _ in range(repeats):
    start = time.perf_counter()
    wiring.hash_ids(tokens[:, :-1])
    hash_times.append(time.perf_counter() - start)

  runs, executed, executed_grads, accounted = {}, {}, {}, {}
  for name, e in (("engram", exp), ("baseline", presets.baseline_of(exp))):
    trainer = _trainer(e, vocab, wiring)
    batch = {
      "tokens": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "hash_ids": {k: v.astype(np.int32) for k, v in hash_ids.items()}
      if e.model.engram is not None
      else {},
    }
    batch = jax.device_put(batch)
    state = jax.jit(lambda k, tr=trainer: tr.init(k, t.batch_size, t.seq_len))(jax.random.key(0))
    step = jax.jit(trainer.train_step, donate_argnums=0)
    executed[name] = _flops(step, state, batch)
    executed_grads[name] = _flops(jax.jit(trainer.gradients), state, batch)
    accounted[name] = (
      3 * count_params(trainer.model_cfg, t.seq_len).flops_per_token * (t.batch_size * t.seq_len)
    )
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    runs[name] = [step, state, batch, []]
  for _ in range(repeats):
    for run in runs.values():
      step, state, batch, times = run
      tic = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - tic)
      run[1] = state
  med = {name: statistics.median(run[3]) for name, run in runs.items()}
  tokens_per_step = t.batch_size * t.seq_len
  rate = matmul_rate(_trainer(exp, vocab, wiring).model_cfg, tokens_per_step, repeats)
  out = {
    "engram_s": med["engram"],
    "baseline_s": med["baseline"],
    "ratio": med["engram"] / med["baseline"],
    "hash_s": statistics.median(hash_times),
    "first_hash_s": first_hash_seconds,
    "tokens": tokens_per_step,
    "matmul_gflops": rate / 1e9,
  }
  for name in runs:
    achieved = accounted[name] / med[name]
    out[name] = {
      "tokens_per_sec": tokens_per_step / med[name],
      "gflops": achieved / 1e9,
      "share": achieved / rate,
      "executed_over_accounted": executed[name] / accounted[name],
      "grads_executed_over_accounted": executed_grads[name] / accounted[name],
      # The share if every FLOP XLA executes (Muon's included) ran at the matmul rate.
      "share_bound": accounted[name] / executed[name],
      "accounted_gflop": accounted[name] / 1e9,
      "executed_gflop": executed[name] / 1e9,
    }
  return out


def main(argv):
  del argv
  setting = malloc_setting(_KEEP.value)
  r = measure(_PRESET.value, _REPEATS.value, _BATCH.value, _SEQ.value)
  print(
    f"preset {_PRESET.value}: {r['tokens']:,} tokens per step, median of "
    f"{_REPEATS.value} interleaved steps; malloc " + setting
  )
  print(f"Engram step:        {r['engram_s'] * 1e3:8.1f} ms")
  print(f"MoE baseline step:  {r['baseline_s'] * 1e3:8.1f} ms")
  print(f"ratio:              {r['ratio']:8.3f}  (goal <= 1.10)")
  print(f"fp32 matmul rate on the model's shapes: {r['matmul_gflops']:.1f} GFLOP/s")
  for name in ("engram", "baseline"):
    m = r[name]
    print(
      f"{name:<9} {m['tokens_per_sec']:9,.0f} tokens/s  {m['gflops']:6.1f} GFLOP/s achieved = "
      f"{m['share']:.3f} of the matmul rate (goal >= 0.45)"
    )
    print(
      f"{'':<9} XLA executes {m['grads_executed_over_accounted']:.2f}x the accounted FLOPs in "
      f"forward + backward (goal <= 1.3), {m['executed_over_accounted']:.2f}x in the whole step "
      "(with Muon's Newton-Schulz iterations, which the accounting leaves out)"
    )
    print(
      f"{'':<9} the share can be at most {m['share_bound']:.3f}: {m['accounted_gflop']:.2f} "
      f"accounted of {m['executed_gflop']:.2f} GFLOP executed per step, all at the matmul rate"
    )
  print(
    f"host hashing of the batch (outside the step, in the data pipeline): "
    f"{r['hash_s'] * 1e3:.2f} ms (median of {_REPEATS.value}; the process's first call, which "
    f"loads the compiled kernel: {r['first_hash_s'] * 1e3:.0f} ms)"
  )


if __name__ == "__main__":
  app.run(main)
