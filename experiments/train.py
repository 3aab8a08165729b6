"""Trains a preset on a text corpus (default: the embedded KJV corpus and tokenizer).

    python -m experiments.train --preset=cpu_small --workdir=runs/cpu_small --compare_baseline
    python -m experiments.train --preset=cpu_small --workdir=runs/cpu_small --resume

Writes metrics.jsonl, results.json, a loss-curve PNG and orbax checkpoints into --workdir.
"""

import dataclasses
import json
import os
import sys

import jax
from absl import app, flags, logging

from engram_jax import presets
from engram_jax.train import compare, loop, tables

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
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in --workdir.")
_BASELINE = flags.DEFINE_bool(
  "compare_baseline", False, "Also train the iso-parameter MoE baseline and compare."
)
_MEMORY = flags.DEFINE_enum(
  "memory",
  "device",
  list(tables.KINDS),
  "Where the Engram tables live: one device's memory, pinned host "
  "memory, split over the --mesh devices, or pinned host memory "
  "under a device cache of the hottest rows (tiered).",
)
_MESH = flags.DEFINE_integer("mesh", 1, "Devices of the data-parallel mesh (all hosts).")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 for multi-host training."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _experiment():
  exp = presets.get(_PRESET.value)
  overrides = {
    name: flag.value
    for name, flag in (
      ("steps", _STEPS),
      ("batch_size", _BATCH),
      ("seq_len", _SEQ),
      ("seed", _SEED),
      ("checkpoint_every", _CKPT),
      ("eval_every", _EVAL),
    )
    if flag.value is not None
  }
  return dataclasses.replace(exp, train=dataclasses.replace(exp.train, **overrides))


def main(argv):
  del argv
  # Keep the terminal for the progress bar: orbax logs every save at INFO.
  logging.set_verbosity(logging.WARNING)
  try:
    exp = _experiment()
    missing = [p for p in _CORPUS.value if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"--corpus: file(s) not found: {missing}")
    if _TOKENIZER.value and not os.path.isfile(_TOKENIZER.value):
      raise FileNotFoundError(f"--tokenizer: file not found: {_TOKENIZER.value}")
    if _COORDINATOR.value:
      # Every process runs the same deterministic pipeline; each feeds its own devices' part.
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    tables.Placement(_MEMORY.value, tables.make_mesh(_MESH.value))
    if exp.train.batch_size % _MESH.value:
      raise ValueError(
        f"--batch_size: expected a multiple of --mesh={_MESH.value}, got {exp.train.batch_size}"
      )
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  kwargs = dict(
    corpus_files=tuple(_CORPUS.value),
    tokenizer_file=_TOKENIZER.value,
    resume=_RESUME.value,
    memory=_MEMORY.value,
    mesh_devices=_MESH.value,
  )
  try:
    if _BASELINE.value:
      results = compare.train_and_compare(exp, _WORKDIR.value, **kwargs)
      print(compare.format_comparison(results))
    else:
      results = loop.train(exp, _WORKDIR.value, label=exp.name, **kwargs)
      print(json.dumps({k: results[k] for k in ("val_loss", "tokens_per_sec")}, indent=2))
  except (loop.TrainingDiverged, loop.Interrupted) as e:
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main)
