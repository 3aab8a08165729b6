"""Where a training step's time goes: forward, backward, optimizers, mHC, MoE dispatch, host loop.

Every figure is the median of interleaved timed calls in one process (a shared machine's noise
hits all alike), on one batch of the preset's shape:

- `forward`: the loss of a batch (rows fetched from the tables, model, cross-entropy);
- `forward+backward`: its gradients w.r.t. the parameters and the fetched rows;
- `step`: the whole jitted train step (adds the Muon + AdamW update, the tables' sparse Adam
  and the balancing update);
- `optimizer`: the backbone's Muon + AdamW update alone, on gradients of the right shapes;
- `sinkhorn`: the mHC Sinkhorn iterations in forward+backward (the difference to a model with
  one iteration, scaled to all of them);
- `moe ragged - blocks`: forward+backward with the MoE experts run by `ragged_dot` minus by
  blocks (what the CPU dispatch saves);
- `pipeline next()`: one batch from the data pipeline (windows, batching, hashing) in the
  caller's thread;
- `loop sync`: the step time when every step is waited for, minus when steps are only
  enqueued (what a per-step `block_until_ready` costs);
- `page faults per step`: minor page faults of the process per enqueued step (memory mapped
  afresh; see `--keep_freed_memory`, which sets glibc's malloc to reuse freed memory).

    python -m bench.step_profile [--preset cpu_small --repeats 10 --dispatch ragged
                                  --keep_freed_memory]
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable

import jax
from absl import app, flags

from bench.common import malloc_setting
from engram_jax import presets
from engram_jax.data import build_pipeline, encode_corpus
from engram_jax.train import loop
from engram_jax.train import optimizer as opt_lib

_PRESET = flags.DEFINE_string("preset", "cpu_small", "A preset.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls of each function.")
_DISPATCH = flags.DEFINE_enum(
  "dispatch", "auto", ["auto", "ragged", "blocks"], "MoE dispatch of the profiled model."
)
_KEEP = flags.DEFINE_bool(
  "keep_freed_memory", False, "Set glibc's malloc to reuse freed memory (no fresh pages)."
)


def medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Median seconds per call of each function, calls interleaved after one warm-up each."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _setup(exp, data_cfg, tokens):
  pipeline, trainer = loop.build_trainer(exp, data_cfg, tokens)
  t = exp.train
  state = jax.jit(lambda k: trainer.init(k, t.batch_size, t.seq_len))(jax.random.key(0))
  batch = trainer.shard_batch(next(iter(pipeline.train)))
  return pipeline, trainer, state, batch


def _with_model(exp, **changes):
  return dataclasses.replace(exp, model=dataclasses.replace(exp.model, **changes))


def _with_dispatch(exp, dispatch):
  if exp.model.moe is None:
    return exp
  moe = dataclasses.replace(exp.model.moe, dispatch=dispatch)
  return _with_model(exp, moe=moe)


def measure(preset: str, repeats: int, dispatch: str = "auto") -> dict:
  """The median seconds of every component (see the module docstring)."""
  exp = _with_dispatch(presets.get(preset), dispatch)
  t = exp.train
  data_cfg = loop.data_config(exp)
  tokens = encode_corpus(data_cfg)
  pipeline, trainer, state, batch = _setup(exp, data_cfg, tokens)

  def forward():
    rows = trainer.fetch_rows(state, batch["hash_ids"])
    return trainer._forward(state.params, state.balance, rows, batch)[0]

  forward = jax.jit(forward)
  grads = jax.jit(trainer.gradients)
  step = jax.jit(trainer.train_step)
  _, (g_params, _) = grads(state, batch)
  tx = opt_lib.backbone_optimizer(exp.optim, t.steps, state.params)
  update = jax.jit(tx.update)

  variants = {}
  for name, e in (
    ("one_sinkhorn", _with_model(exp, sinkhorn_iters=1)),
    ("ragged", _with_dispatch(exp, "ragged")),
    ("blocks", _with_dispatch(exp, "blocks")),
  ):
    _, tr, st, b = _setup(e, data_cfg, tokens)
    fn = jax.jit(tr.gradients)
    variants[name] = lambda fn=fn, st=st, b=b: fn(st, b)

  fns = {
    "forward": forward,
    "forward+backward": lambda: grads(state, batch),
    "step": lambda: step(state, batch),
    "optimizer": lambda: update(g_params, state.opt_state, state.params),
    **variants,
  }
  med = medians(fns, repeats)

  serial = build_pipeline(dataclasses.replace(pipeline.config, num_threads=0), tokens=tokens)
  batches = iter(serial.train)
  next(batches)
  pipe = []
  for _ in range(repeats):
    start = time.perf_counter()
    next(batches)
    pipe.append(time.perf_counter() - start)

  # The same steps enqueued back to back (the state donated) against waited for one by one.
  run = jax.jit(trainer.train_step, donate_argnums=0)
  st = jax.tree.map(lambda x: x.copy(), state)
  for _ in range(2):  # the second call may compile again (the outputs' layouts)
    st, m = run(st, batch)
    jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(repeats):
    st, m = run(st, batch)
    jax.block_until_ready(m)
  synced = (time.perf_counter() - start) / repeats
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  for _ in range(repeats):
    st, m = run(st, batch)
  jax.block_until_ready(m)
  enqueued = (time.perf_counter() - start) / repeats
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / repeats

  return {
    "tokens": t.batch_size * t.seq_len,
    "forward": med["forward"],
    "forward+backward": med["forward+backward"],
    "step": med["step"],
    "optimizer": med["optimizer"],
    # All iterations, from the difference to one iteration.
    "sinkhorn": (med["forward+backward"] - med["one_sinkhorn"])
    * exp.model.sinkhorn_iters
    / max(exp.model.sinkhorn_iters - 1, 1),
    "moe ragged - blocks": med["ragged"] - med["blocks"],
    "pipeline next()": statistics.median(pipe),
    "loop sync": synced - enqueued,
    "page faults per step": faults,
    "dispatch": trainer.model_cfg.moe.dispatch if trainer.model_cfg.moe else None,
  }


def main(argv):
  del argv
  setting = malloc_setting(_KEEP.value)
  r = measure(_PRESET.value, _REPEATS.value, _DISPATCH.value)
  print(
    f"preset {_PRESET.value}: {r['tokens']:,} tokens per step, medians of {_REPEATS.value} "
    f"interleaved calls; MoE dispatch {r['dispatch']!r} (auto: blocks on CPU); malloc " + setting
  )
  step = r["step"]
  for name in (
    "forward",
    "forward+backward",
    "step",
    "optimizer",
    "sinkhorn",
    "moe ragged - blocks",
    "pipeline next()",
    "loop sync",
  ):
    print(f"{name:<22}{r[name] * 1e3:9.1f} ms  {r[name] / step:6.2f} of the step")
  print(f"{'page faults per step':<22}{r['page faults per step']:9,.0f}")


if __name__ == "__main__":
  app.run(main)
