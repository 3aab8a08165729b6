"""The training loop: data -> jitted steps -> metrics, evaluation, checkpoints, results.

`train(exp, workdir, ...)` writes into `workdir` (see `engram_jax.run.folder` for the rules):
  run.json        the run's identity (preset, resolved config, data files and their sha256, ...)
  metrics.jsonl   one JSON object per logged step ({"step", "loss", "lr", ...}) and per
                  evaluation ({"step", "val_loss"})
  checkpoints/    orbax checkpoints (state + data iterator + config + checksums)
  results.json    final validation loss, throughput, parameter accounting
  loss_curve.png  training and validation loss against step

It never loses a run: a workdir that holds one is refused without `resume` (or moved aside with
`overwrite`); `resume=True` checks the recorded identity, restores the newest checkpoint that
passes verification (corrupt ones are moved to `checkpoints/corrupt/`) and continues with the
same data order, bit-exactly; SIGTERM (and Ctrl-C) save a checkpoint before exiting; a NaN/inf
loss, or one far above its running median, stops training and moves the checkpoints saved from
the step before it to `checkpoints/diverged/`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
import tqdm
from absl import logging

from engram_jax import errors, plots
from engram_jax import params as params_lib
from engram_jax import sharding as sharding_lib
from engram_jax.config import ExperimentConfig
from engram_jax.data import DataConfig, build_pipeline, encode_corpus
from engram_jax.errors import Interrupted, TrainingDiverged, UsageRefused
from engram_jax.hashing import EngramHashing
from engram_jax.memory import backends as backend_lib
from engram_jax.memory.table import TableLayout
from engram_jax.run import folder
from engram_jax.run.checkpoint import DIVERGED, Checkpointer, SaveFailed
from engram_jax.tokenization import load_tokenizer
from engram_jax.train import monitors
from engram_jax.train.step import Trainer

__all__ = ["Interrupted", "TrainingDiverged", "prepare", "train"]


def engram_hashing(model_cfg, tokenizer) -> tuple[Callable | None, dict[int, TableLayout]]:
  """The host hash function (raw tokens [B, T] -> {layer: [B, T, H]}) and the table layouts
  of a model's Engram layers with this tokenizer; (None, {}) without Engram."""
  engram = model_cfg.engram
  if engram is None:
    return None, {}
  wiring = EngramHashing.from_tokenizer(engram, tokenizer, init_std=model_cfg.engram_init_std)
  return wiring.hash_ids, wiring.layouts


def build_trainer(exp: ExperimentConfig, data_cfg: DataConfig, tokens: np.ndarray | None = None):
  """The data pipeline and the trainer of one experiment (the model's vocabulary is set to the
  tokenizer's; the tables live where `exp.memory` says, on the mesh of `exp.mesh`).

  Raises:
    ValueError: the mesh asks for more devices than jax sees, or a data problem.
  """
  probe = build_pipeline(dataclasses.replace(data_cfg, num_threads=0), tokens=tokens)
  model_cfg = dataclasses.replace(exp.model, vocab_size=probe.vocab_size)
  hash_fn, layouts = engram_hashing(model_cfg, probe.tokenizer)
  pipeline = build_pipeline(data_cfg, hash_fn, tokens=tokens)
  mesh = sharding_lib.make_mesh(exp.mesh)
  backend = backend_lib.backend(exp.memory, mesh, table_axes=exp.mesh.table_axes)
  trainer = Trainer(model_cfg, exp.optim, exp.train.steps, layouts, backend, exp.mesh.rules)
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


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` decided: the run's identity, whether to resume, and lines to announce."""

  record: dict
  resume: bool
  notes: tuple[str, ...]


def resolved(exp: ExperimentConfig, data_cfg: DataConfig) -> ExperimentConfig:
  """The experiment with the model's vocabulary set to the tokenizer's."""
  vocab = load_tokenizer(data_cfg.tokenizer_path()).get_vocab_size()
  return dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=vocab))


def prepare(
  exp: ExperimentConfig,
  workdir: str | os.PathLike,
  data_cfg: DataConfig,
  *,
  resume: bool,
  overwrite: bool = False,
) -> Prepared:
  """Checks that a run may start (or resume) in `workdir`, changing nothing unless
  `overwrite` moves an old run aside.

  Raises:
    UsageRefused: `resume` with `overwrite`.
    RunExists: the workdir holds a run, without `resume` or `overwrite`.
    RunMismatch: `resume` with settings that change the recorded run's model or data, or
      `steps` below its newest checkpoint.
  """
  if resume and overwrite:
    raise UsageRefused("--resume and --overwrite contradict each other: pass one of them")
  workdir = Path(workdir)
  record = folder.identity(resolved(exp, data_cfg), data_cfg)
  contents = folder.run_contents(workdir)
  notes = []
  if resume and not contents:
    notes.append(f"--resume: no run in {workdir}; starting a new one")
    resume = False
  elif resume:
    notes += folder.check_resume(workdir, record)
  elif contents:
    if not overwrite:
      raise folder.refuse_existing(workdir, contents)
    if jax.process_index() == 0:
      notes.append(f"--overwrite: moved the old run aside to {folder.move_aside(workdir)}")
  return Prepared(record, resume, tuple(notes))


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
  overwrite: bool = False,
  tokens: np.ndarray | None = None,
  progress: bool = True,
  label: str = "train",
  on_step: Callable[[int], None] | None = None,
) -> dict:
  """Trains one experiment and returns its results (also written to `workdir/results.json`).

  Args:
    exp: the model, optimizer and training settings, and where the tables live (`exp.memory`,
      on the mesh of `exp.mesh`).
    workdir: output folder.
    corpus_files: text files; empty: the embedded corpus.
    tokenizer_file: a tokenizer.json; None: the embedded tokenizer.
    resume: continue the run in `workdir` from its newest good checkpoint (up to
      `exp.train.steps`); a missing or empty workdir starts a new run.
    overwrite: move a run already in `workdir` aside to `workdir.old-<time>` and start anew.
    tokens: an already-encoded corpus (to share one encoding between runs).
    progress: show a progress bar.
    label: the progress bar's name.
    on_step: called with the step number after every step (e.g. to stop from a notebook).

  Raises:
    RunExists, RunMismatch, UsageRefused: see `prepare` (nothing changed).
    CheckpointMismatch: the newest checkpoint holds another model.
    NoGoodCheckpoint: checkpoints exist but none passes verification.
    TrainingDiverged: the loss became NaN/inf or spiked (checkpoints from the step before are
      moved to `checkpoints/diverged/`; earlier ones are kept).
    Interrupted: SIGTERM/SIGINT arrived; a checkpoint of the last finished step was saved.
  """
  workdir = Path(workdir)
  # With several processes (multi-host) every process trains; process 0 alone writes the
  # metrics, results and plot (orbax coordinates the checkpoints itself).
  primary = jax.process_index() == 0
  data_cfg = data_config(exp, corpus_files, tokenizer_file)
  prepared = prepare(
    exp,
    workdir,
    data_cfg,
    resume=resume,
    overwrite=overwrite,
  )
  _barrier("prepare")
  if primary:
    for note in prepared.notes:
      logging.warning("%s", note)
  if tokens is None:
    tokens = encode_corpus(data_cfg)
  pipeline, trainer = build_trainer(exp, data_cfg, tokens)
  t = exp.train
  workdir.mkdir(parents=True, exist_ok=True)
  train_step, eval_step = trainer.jitted(exp.train.batch_size, exp.train.seq_len)
  key = jax.random.key(t.seed)
  ckpt = Checkpointer(workdir / folder.CHECKPOINTS)
  metrics_log = folder.MetricsLog(workdir / folder.METRICS_FILE, enabled=primary)
  config_record = {
    "experiment": exp.name,
    "memory": repr(exp.memory),
    "mesh": repr(exp.mesh),
    "model": repr(trainer.model_cfg),
    "optim": repr(exp.optim),
    "train": repr(t),
  }

  data_iter = iter(pipeline.train)

  def save(step, state):
    # What the backend derives from the tables (a tiered cache) is not saved.
    ckpt.save(step, trainer.checkpoint_tree(state), data_iter.get_state(), config_record)
    metrics_log.sync()

  restored = None
  if prepared.resume:
    abstract = trainer.abstract_state(t.batch_size, t.seq_len)
    restored = ckpt.restore_latest(trainer.checkpoint_tree(abstract))
  if restored is not None:
    start, tree, data_state, _ = restored
    # orbax restores into the target shardings but not always into their memory kind.
    state = trainer.place(trainer.from_checkpoint_tree(tree))
    data_iter.set_state(data_state)
    logging.info("resumed %s from step %d", workdir, start)
  else:
    if prepared.resume and primary:
      logging.warning("--resume: no checkpoint in %s yet; training from step 0", ckpt.directory)
    start, state = 0, trainer.create_state(key, t.batch_size, t.seq_len)
  if primary:
    metrics_log.cut_back(start)  # records written after the restored checkpoint go
    folder.write_run(workdir, prepared.record, resumed_from=start if prepared.resume else None)

  def calibration_batches():  # read only by a backend that keeps a cache
    yield from itertools.islice(iter(pipeline.train), backend_lib.CALIBRATION_BATCHES)

  # What the backend derives from the tables (a tiered cache: the rows the first batches read
  # most).
  state = trainer.calibrate(state, calibration_batches())

  counts = params_lib.count_params(trainer.model_cfg, t.seq_len)
  last_eval = None
  clock = monitors.Throughput(t.batch_size * t.seq_len)
  pending: tuple[int, dict] | None = None
  spikes = monitors.SpikeDetector(t.spike_factor, t.spike_window, exp.optim.warmup_steps)
  bar = tqdm.tqdm(
    total=t.steps, initial=start, desc=label, disable=not (progress and primary), dynamic_ncols=True
  )

  def diverged(first_bad: int, why: str) -> TrainingDiverged:
    # Checkpoints from step `first_bad` on hold the diverged parameters: they are moved aside.
    moved = [s for s in ckpt.steps() if s >= first_bad]
    for s in moved:
      ckpt.quarantine(s, DIVERGED)
    good = ckpt.steps()
    kept = f"the last good checkpoint is step {good[-1]}" if good else "no checkpoint is left"
    moved_text = f"checkpoints {moved} moved to {DIVERGED}/; " if moved else ""
    bar.close()
    return TrainingDiverged(
      f"{why}; stopped. {moved_text}{kept} in {ckpt.directory}. Resume with --resume and a "
      "lower --learning_rate"
    )

  def flush(step_metrics: tuple[int, dict]) -> None:
    step, m = step_metrics
    m = {k: float(v) for k, v in jax.device_get(m).items()}  # waits for `step` to finish
    tok_s = clock.finished(step)
    # The loss of `step` is that of the parameters of step - 1; the norms are of step's.
    if not math.isfinite(m["loss"]):
      raise diverged(step - 1, f"loss became {m['loss']} at step {step}")
    if not all(math.isfinite(m[k]) for k in ("grad_norm", "param_norm")):
      raise diverged(
        step,
        f"the update of step {step} is not finite (loss {m['loss']:.4g}, grad norm "
        f"{m['grad_norm']}, parameter norm {m['param_norm']})",
      )
    spike = spikes.check(step, m["loss"])
    if spike is not None:
      raise diverged(step - 1, spike)
    if step % t.log_every == 0 or step == t.steps:
      metrics_log.append({"step": step, **m, "tokens_per_sec": tok_s})
    bar.set_postfix(
      loss=f"{m['loss']:.3f}",
      lr=f"{m['lr']:.2e}",
      tok_s=f"{tok_s:,.0f}",
      max_load=f"{m['max_load']:.2f}",
      gate=f"{m['engram_gate']:.3f}",
      refresh=False,
    )

  try:
    with monitors.SignalGuard() as guard, bar:
      step = start
      batches: Iterator = data_iter
      while step < t.steps:
        if guard.received is not None:
          if pending is not None:
            flush(pending)
          if step not in ckpt.steps():  # the regular checkpoint may have just saved it
            save(step, state)
          bar.close()
          raise Interrupted(
            f"signal {guard.received}: saved a checkpoint at step {step} in "
            f"{ckpt.directory}; rerun with --resume to continue"
          )
        batch = trainer.shard_batch(next(batches))
        state, metrics = train_step(state, batch)
        step += 1
        # Read the previous step's metrics while this one runs (the device never waits; no
        # step is waited for on its own).
        if pending is not None:
          flush(pending)
        pending = (step, metrics)
        bar.update(1)
        if on_step is not None:
          on_step(step)
        if step % t.eval_every == 0 or step == t.steps:
          flush(pending)
          pending = None
          with clock.paused():
            last_eval = evaluate(eval_step, state, pipeline, trainer)
            metrics_log.append({"step": step, **last_eval})
        if step % t.checkpoint_every == 0 or step == t.steps:
          if pending is not None:
            flush(pending)
            pending = None
          with clock.paused():
            save(step, state)
  except Exception as e:
    if isinstance(e, errors.RunError) or errors.os_error_of(e) is None:
      raise
    # Disk full, read-only, permission denied: say what failed and what is kept.
    good = ckpt.steps()
    kept = f"the last good checkpoint, step {good[-1]}, is kept" if good else "no checkpoint yet"
    what = f"saving the checkpoint of step {e.step} failed: " if isinstance(e, SaveFailed) else ""
    raise errors.RunError(f"{what}{errors.one_line(e)[1]}; {kept} in {ckpt.directory}") from e
  ckpt.close()

  if last_eval is None:
    last_eval = evaluate(eval_step, state, pipeline, trainer)
  results = {
    "experiment": exp.name,
    "steps": t.steps,
    "val_loss": last_eval["val_loss"],
    "val_engram_gate": last_eval["val_engram_gate"],
    "tokens_per_sec": clock.rate(),
    "params": dataclasses.asdict(counts),
  }
  if primary:
    folder.atomic_write(workdir / folder.RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    plots.loss_curve(metrics_log.path, workdir / "loss_curve.png", title=exp.name)
  return results


def _barrier(name: str) -> None:
  """Waits for every process (multi-host) so that process 0's file moves are seen by all."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
