"""Trains a preset on a text corpus (default: the embedded KJV corpus and tokenizer).

    python -m experiments.train --preset=cpu_small --workdir=runs/cpu_small --compare_baseline
    python -m experiments.train --preset=cpu_small --workdir=runs/cpu_small --resume

Writes run.json, metrics.jsonl, results.json, a loss-curve PNG and orbax checkpoints into
--workdir. A workdir that holds a run is refused unless --resume (continue it) or --overwrite
(move it aside) is given. Exit codes: 0 done, 1 error (one line; the traceback is in
WORKDIR/error.log), 2 usage (nothing changed), 75 interrupted after saving a checkpoint (rerun
the same command with --resume).
"""

import json
import os
import sys

import jax
from absl import app, flags, logging

from engram_jax import config, presets, sharding
from engram_jax.config import MEMORY_KINDS, REMAT_POLICIES, MeshConfig
from engram_jax.train import compare, loop, malloc
from experiments import cli

_PRESET = flags.DEFINE_string("preset", "cpu_small", f"One of {sorted(presets.PRESETS)}.")
_CORPUS = flags.DEFINE_multi_string(
  "corpus", [], "Text files (.txt, .gz, .xz); repeatable. Default: the embedded corpus."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: embedded).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
_STEPS = flags.DEFINE_integer("steps", None, "Total steps (with --resume: continue up to it).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences per batch.")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per sequence.")
_SEED = flags.DEFINE_integer("seed", None, "Seed of parameters, tables and data order.")
_CKPT = flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
_EVAL = flags.DEFINE_integer("eval_every", None, "Steps between validation passes.")
_RESUME = flags.DEFINE_bool(
  "resume",
  False,
  "Continue the run in --workdir from its newest good checkpoint (a missing or empty workdir "
  "starts a new run, so a preempted job can be restarted with the same command).",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Move a run already in --workdir aside to WORKDIR.old-<time>; start anew."
)
_LR = flags.DEFINE_float("learning_rate", None, "Peak learning rate of the backbone.")
_TABLE_LR = flags.DEFINE_float(
  "engram_lr_mult", None, "The Engram tables' learning rate as a multiple of --learning_rate."
)
_SPIKE = flags.DEFINE_float(
  "spike_factor",
  None,
  "Stop when a loss exceeds this multiple of the running median (0: only NaN/inf stop).",
)
_BASELINE = flags.DEFINE_bool(
  "compare_baseline", False, "Also train the iso-parameter MoE baseline and compare."
)
_MEMORY = flags.DEFINE_enum(
  "memory",
  "device",
  list(MEMORY_KINDS),
  "Where the Engram tables live: one device's memory, pinned host "
  "memory, split over the --mesh devices, or pinned host memory "
  "under a device cache of the hottest rows (tiered).",
)
_MESH = flags.DEFINE_string(
  "mesh",
  "1",
  "The device mesh over all hosts: a count of data-parallel devices ('8'), or axis=size pairs "
  "of data, fsdp, tensor, expert ('data=2,fsdp=2,expert=2').",
)
_REMAT = flags.DEFINE_enum(
  "remat",
  None,
  list(REMAT_POLICIES),
  "Rematerialisation of each block: 'full' recomputes its forward in the backward pass, "
  "'dots_saveable' keeps only matmul results (default: the preset's, 'none').",
)
_SCAN = flags.DEFINE_bool(
  "scan_layers",
  None,
  "Scan each run of repeated blocks (one compiled block per run, parameters stacked; "
  "default: the preset's, off). A run keeps the form it started with.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 for multi-host training."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_KEEP = flags.DEFINE_bool(
  "keep_freed_memory",
  False,
  "Set glibc's malloc to reuse freed memory instead of mapping fresh pages for every step's "
  "buffers (faster on CPU: no page faults; the process keeps its peak memory; same results).",
)


def _experiment():
  """The preset with the flags' overrides (validated by the configs)."""
  flagged = (
    ("train.steps", _STEPS),
    ("train.batch_size", _BATCH),
    ("train.seq_len", _SEQ),
    ("train.seed", _SEED),
    ("train.checkpoint_every", _CKPT),
    ("train.eval_every", _EVAL),
    ("train.spike_factor", _SPIKE),
    ("optim.lr", _LR),
    ("optim.engram_lr_mult", _TABLE_LR),
    ("model.remat", _REMAT),
    ("model.scan_layers", _SCAN),
  )
  overrides = {key: flag.value for key, flag in flagged if flag.value is not None}
  overrides["memory.kind"] = _MEMORY.value
  overrides |= {f"mesh.{axis}": size for axis, size in MeshConfig.parse(_MESH.value).shape.items()}
  return config.override(presets.get(_PRESET.value), overrides)


def _check_flags():
  """The experiment, after the checks that need no data (usage errors: exit 2)."""
  exp = _experiment()
  missing = [p for p in _CORPUS.value if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"--corpus: file(s) not found: {missing}")
  if _TOKENIZER.value and not os.path.isfile(_TOKENIZER.value):
    raise FileNotFoundError(f"--tokenizer: file not found: {_TOKENIZER.value}")
  if _RESUME.value and _OVERWRITE.value:
    raise ValueError("--resume and --overwrite contradict each other: pass one of them")
  if _COORDINATOR.value:
    # Every process runs the same deterministic pipeline; each feeds its own devices' part.
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  sharding.make_mesh(exp.mesh)  # more devices than jax sees: a usage error
  return exp


def main(argv):
  del argv
  # Keep the terminal for the progress bar: orbax logs every save at INFO.
  logging.set_verbosity(logging.WARNING)
  if _KEEP.value and not malloc.keep_freed_memory():  # before JAX starts its threads
    cli.usage_exit("train", malloc.NOT_GLIBC)
  try:
    exp = _check_flags()
  except (ValueError, FileNotFoundError) as e:
    cli.usage_exit("train", str(e))
  kwargs = dict(
    corpus_files=tuple(_CORPUS.value),
    tokenizer_file=_TOKENIZER.value,
    resume=_RESUME.value,
    overwrite=_OVERWRITE.value,
  )
  try:
    if _BASELINE.value:
      results = compare.train_and_compare(exp, _WORKDIR.value, **kwargs)
      print(compare.format_comparison(results))
    else:
      results = loop.train(exp, _WORKDIR.value, label=exp.name, **kwargs)
      print(json.dumps({k: results[k] for k in ("val_loss", "tokens_per_sec")}, indent=2))
  except Exception as e:  # every failure is one line; the traceback goes to error.log
    sys.exit(cli.report("train", e, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("train"))
