"""The training loop: data -> jitted steps -> metrics, evaluation, checkpoints, results.

`train(exp, workdir, ...)` writes into `workdir`:
  metrics.jsonl   one JSON object per logged step ({"step", "loss", "lr", ...}) and per
                  evaluation ({"step", "val_loss"})
  checkpoints/    orbax checkpoints (state + data iterator + config)
  results.json    final validation loss, throughput, parameter accounting
  loss_curve.png  training and validation loss against step

It survives interruption: SIGTERM (and Ctrl-C) save a checkpoint before exiting, `resume=True`
continues from the newest readable checkpoint with the same data order, and a NaN/inf loss
stops training without overwriting the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
import tqdm
from absl import logging

from engram_jax import params as params_lib
from engram_jax.config import ExperimentConfig
from engram_jax.data import DataConfig, build_pipeline, encode_corpus
from engram_jax.hashing import NgramHasher
from engram_jax.memory.table import TableLayout
from engram_jax.tokenization import TokenizerCompressor
from engram_jax.train import plots
from engram_jax.train import tables as tables_lib
from engram_jax.train.checkpoint import Checkpointer
from engram_jax.train.step import Trainer, checkpoint_tree, from_checkpoint_tree


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


class Interrupted(RuntimeError):
  """Training stopped on a signal after saving a checkpoint."""


def engram_hashing(model_cfg, tokenizer) -> tuple[Callable | None, dict[int, TableLayout]]:
  """The host hash function (raw tokens [B, T] -> {layer: [B, T, H]}) and the table layouts
  of a model's Engram layers with this tokenizer; (None, {}) without Engram."""
  engram = model_cfg.engram
  if engram is None:
    return None, {}
  compressor = TokenizerCompressor.from_tokenizer(tokenizer)
  pad = int(compressor(np.asarray([engram.pad_token_id]))[0])
  hasher = NgramHasher.from_config(engram, compressor.num_compressed, pad)

  def hash_fn(tokens: np.ndarray) -> dict[int, np.ndarray]:
    return hasher.hash_all(compressor(tokens))

  layouts = {
    layer: TableLayout.from_sizes(
      hasher.table_sizes(layer), engram.head_dim, model_cfg.engram_init_std
    )
    for layer in engram.layer_ids
  }
  return hash_fn, layouts


def build_trainer(
  exp: ExperimentConfig,
  data_cfg: DataConfig,
  tokens: np.ndarray | None = None,
  placement: tables_lib.Placement | None = None,
):
  """The data pipeline and the trainer of one experiment (the model's vocabulary is set to the
  tokenizer's; the tables are placed by `placement`, default one device)."""
  probe = build_pipeline(dataclasses.replace(data_cfg, num_threads=0), tokens=tokens)
  model_cfg = dataclasses.replace(exp.model, vocab_size=probe.vocab_size)
  hash_fn, layouts = engram_hashing(model_cfg, probe.tokenizer)
  pipeline = build_pipeline(data_cfg, hash_fn, tokens=tokens)
  placement = placement or tables_lib.Placement()
  if exp.train.batch_size % placement.shards:
    raise ValueError(
      f"batch_size: expected a multiple of the mesh size {placement.shards}, "
      f"got {exp.train.batch_size}"
    )
  trainer = Trainer(model_cfg, exp.optim, exp.train.steps, layouts, placement)
  return pipeline, trainer


def data_config(exp: ExperimentConfig, corpus_files=(), tokenizer_file=None) -> DataConfig:
  t = exp.train
  return DataConfig(
    corpus_files=tuple(corpus_files),
    tokenizer_file=tokenizer_file,
    seq_len=t.seq_len,
    batch_size=t.batch_size,
    val_fraction=t.val_fraction,
    val_batches=t.eval_batches,
    seed=t.seed,
  )


class _SignalGuard:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      # Outside the main thread signals cannot be caught; training then runs unguarded.
      with contextlib.suppress(ValueError):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _append_jsonl(path: Path, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
  """Drops records after `step` (written after the checkpoint a resumed run restarts from)."""
  if not path.exists():
    return
  keep = [
    line
    for line in path.read_text().splitlines()
    if line.strip() and json.loads(line)["step"] <= step
  ]
  path.write_text("".join(line + "\n" for line in keep))


def evaluate(eval_step, state, pipeline, trainer: Trainer) -> dict:
  """Mean validation loss and Engram gate over one pass of the validation batches."""
  losses, gates = [], []
  for batch in pipeline.validation:
    m = eval_step(state, trainer.shard_batch(batch))
    losses.append(m["loss"])
    gates.append(m["engram_gate"])
  return {
    "val_loss": float(np.mean(jax.device_get(losses))),
    "val_engram_gate": float(np.mean(jax.device_get(gates))),
  }


def train(
  exp: ExperimentConfig,
  workdir: str | os.PathLike,
  *,
  corpus_files=(),
  tokenizer_file: str | None = None,
  resume: bool = False,
  tokens: np.ndarray | None = None,
  progress: bool = True,
  label: str = "train",
  on_step: Callable[[int], None] | None = None,
  memory: str = "device",
  mesh_devices: int = 1,
) -> dict:
  """Trains one experiment and returns its results (also written to `workdir/results.json`).

  Args:
    exp: the model, optimizer and training settings.
    workdir: output folder.
    corpus_files: text files; empty: the embedded corpus.
    tokenizer_file: a tokenizer.json; None: the embedded tokenizer.
    resume: continue from the newest readable checkpoint in `workdir` (up to `exp.train.steps`).
    tokens: an already-encoded corpus (to share one encoding between runs).
    progress: show a progress bar.
    label: the progress bar's name.
    on_step: called with the step number after every step (e.g. to stop from a notebook).
    memory: where the Engram tables live: 'device', 'host' or 'sharded'.
    mesh_devices: devices of the data-parallel mesh (1: no mesh).

  Raises:
    TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
    Interrupted: SIGTERM/SIGINT arrived; a checkpoint of the last finished step was saved.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # With several processes (multi-host) every process trains; process 0 alone writes the
  # metrics, results and plot (orbax coordinates the checkpoints itself).
  primary = jax.process_index() == 0
  data_cfg = data_config(exp, corpus_files, tokenizer_file)
  if tokens is None:
    tokens = encode_corpus(data_cfg)
  placement = tables_lib.Placement(memory, tables_lib.make_mesh(mesh_devices))
  pipeline, trainer = build_trainer(exp, data_cfg, tokens, placement)
  t = exp.train
  train_step, eval_step = trainer.jitted()
  init = jax.jit(lambda key: trainer.init(key, t.batch_size, t.seq_len))
  key = jax.random.key(t.seed)
  ckpt = Checkpointer(workdir / "checkpoints")
  metrics_path = workdir / "metrics.jsonl"
  config_record = {
    "experiment": exp.name,
    "memory": memory,
    "mesh_devices": mesh_devices,
    "model": repr(trainer.model_cfg),
    "optim": repr(exp.optim),
    "train": repr(t),
  }

  data_iter = iter(pipeline.train)

  def save(step, state):
    # The tiered caches are derived from the tables: checkpoints hold the tables alone.
    ckpt.save(step, checkpoint_tree(state), data_iter.get_state(), config_record)

  restored = None
  if resume:
    restored = ckpt.restore_latest(checkpoint_tree(trainer.abstract_state(t.batch_size, t.seq_len)))
  if restored is not None:
    start, tree, data_state, _ = restored
    # orbax restores into the target shardings but not always into their memory kind.
    state = trainer.place(from_checkpoint_tree(tree))
    data_iter.set_state(data_state)
    if primary:
      _truncate_metrics(metrics_path, start)
    logging.info("resumed %s from step %d", workdir, start)
  else:
    start, state = 0, trainer.place(init(key))
    if primary and metrics_path.exists():
      metrics_path.unlink()
  if memory == "tiered":
    # Which rows the cache holds: the most read in the first batches of the data.
    state = trainer.calibrate(
      state, itertools.islice(iter(pipeline.train), tables_lib.CALIBRATION_BATCHES)
    )

  counts = params_lib.count_params(trainer.model_cfg, t.seq_len)
  tokens_per_step = t.batch_size * t.seq_len
  last_eval = None
  timed_tokens, timed_seconds = 0, 0.0
  pending: tuple[int, dict] | None = None
  bar = tqdm.tqdm(
    total=t.steps, initial=start, desc=label, disable=not (progress and primary), dynamic_ncols=True
  )

  def flush(step_metrics: tuple[int, dict], tok_s: float) -> None:
    step, m = step_metrics
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
      raise TrainingDiverged(
        f"loss became {m['loss']} (grad norm {m['grad_norm']}, parameter norm "
        f"{m['param_norm']}) at step {step}; stopped. "
        f"The last good checkpoint in {ckpt.directory} is kept (steps {ckpt.steps()})."
      )
    if primary and (step % t.log_every == 0 or step == t.steps):
      _append_jsonl(metrics_path, {"step": step, **m, "tokens_per_sec": tok_s})
    bar.set_postfix(
      loss=f"{m['loss']:.3f}",
      lr=f"{m['lr']:.2e}",
      tok_s=f"{tok_s:,.0f}",
      max_load=f"{m['max_load']:.2f}",
      gate=f"{m['engram_gate']:.3f}",
      refresh=False,
    )

  with _SignalGuard() as guard:
    step = start
    batches: Iterator = data_iter
    while step < t.steps:
      if guard.received is not None:
        if pending is not None:
          flush(pending, timed_tokens / max(timed_seconds, 1e-9))
        if step not in ckpt.steps():  # the regular checkpoint may have just saved it
          save(step, state)
        bar.close()
        raise Interrupted(
          f"signal {guard.received}: saved a checkpoint at step {step} in "
          f"{ckpt.directory}; rerun with resume to continue"
        )
      tic = time.perf_counter()
      batch = trainer.shard_batch(next(batches))
      state, metrics = train_step(state, batch)
      step += 1
      # Read the previous step's metrics while this one runs (the device never waits).
      if pending is not None:
        flush(pending, timed_tokens / max(timed_seconds, 1e-9))
      pending = (step, metrics)
      if step > start + 1:  # the first step compiles: keep it out of the throughput
        jax.block_until_ready(metrics["loss"])
        timed_tokens += tokens_per_step
        timed_seconds += time.perf_counter() - tic
      bar.update(1)
      if on_step is not None:
        on_step(step)
      if step % t.eval_every == 0 or step == t.steps:
        flush(pending, timed_tokens / max(timed_seconds, 1e-9))
        pending = None
        last_eval = evaluate(eval_step, state, pipeline, trainer)
        if primary:
          _append_jsonl(metrics_path, {"step": step, **last_eval})
      if step % t.checkpoint_every == 0 or step == t.steps:
        if pending is not None:
          flush(pending, timed_tokens / max(timed_seconds, 1e-9))
          pending = None
        save(step, state)
  bar.close()
  ckpt.close()

  if last_eval is None:
    last_eval = evaluate(eval_step, state, pipeline, trainer)
  results = {
    "experiment": exp.name,
    "steps": t.steps,
    "val_loss": last_eval["val_loss"],
    "val_engram_gate": last_eval["val_engram_gate"],
    "tokens_per_sec": timed_tokens / timed_seconds if timed_seconds else None,
    "params": dataclasses.asdict(counts),
  }
  if primary:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots.loss_curve(metrics_path, workdir / "loss_curve.png", title=exp.name)
  return results
