"""The accuracy cost of each row storage type, measured on a trained model's validation loss
(the measurement of `bench/storage_accuracy.py`).

`storage_accuracy(workdir)` restores the newest checkpoint of a run written by
`engram_jax.train.loop.train`, rebuilds its data pipeline and trainer as the loop does, and
evaluates one pass of the validation batches (`loop.evaluate`) with the Engram tables:

- as trained;
- round-tripped through each storage type (`storage.round_trip`: the rows a model reads from a
  host or disk tier kept in that type);
- zeroed (every fetched row is 0; the Engram branch's biases and convolution still act): a
  reference point for how much the table contents contribute at all.

`format_table(result)` renders the result as a text table.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from engram_jax import presets
from engram_jax.data import encode_corpus
from engram_jax.memory import storage as storage_lib
from engram_jax.run.checkpoint import Checkpointer
from engram_jax.train import loop

ZEROED = "zeroed"


def _restore(workdir: Path, exp, corpus_files, tokenizer_file):
  """(step, state, pipeline, trainer) of the newest readable checkpoint in `workdir`."""
  ckpt_dir = workdir / "checkpoints"
  hint = "; run `make train` first (or pass the workdir of a finished training run)"
  # Checkpointer creates its directory: look before opening one.
  if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}{hint}")
  data_cfg = loop.data_config(exp, corpus_files, tokenizer_file)
  pipeline, trainer = loop.build_trainer(exp, data_cfg, encode_corpus(data_cfg))
  t = exp.train
  ckpt = Checkpointer(ckpt_dir)
  try:
    abstract = trainer.checkpoint_tree(trainer.abstract_state(t.batch_size, t.seq_len))
    restored = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(
      f"no checkpoint in {ckpt_dir} restores as preset {exp.name!r} with this corpus and "
      f"tokenizer{hint}"
    )
  step, tree, _, _ = restored
  state = trainer.from_checkpoint_tree(tree)
  return step, state, pipeline, trainer


def storage_accuracy(
  workdir: str | os.PathLike = "runs/cpu_small/engram",
  preset: str = "cpu_small",
  storages=storage_lib.STORAGE_TYPES,
  *,
  corpus_files=(),
  tokenizer_file: str | None = None,
) -> dict:
  """Validation loss of a trained model with its Engram tables in each storage type.

  Args:
    workdir: a training run's folder (the one holding `checkpoints/`).
    preset: the run's preset name (`engram_jax.presets`).
    storages: storage types to measure, from `storage.STORAGE_TYPES`.
    corpus_files: the run's text files; empty: the embedded corpus.
    tokenizer_file: the run's tokenizer.json; None: the embedded tokenizer.

  Returns:
    {"workdir", "preset", "step" (of the checkpoint), "dim" (Dh), "rows" (rows of all tables),
    "trained_val_loss", "results": [one dict per storage type, then one for the zeroed tables:
    {"storage", "row_bytes" (None when zeroed), "max_abs_error" (largest |round-tripped - trained|
    element over all tables), "max_error_bound" (largest `storage.error_bound`; None when
    zeroed), "val_loss", "val_engram_gate", "diff_vs_float32" (val_loss minus the loss with
    the tables as trained, which float32 reproduces exactly)}]}.

  Raises:
    FileNotFoundError: `workdir` has no readable checkpoint.
    ValueError: an unknown storage type or preset, a model without Engram, or a checkpoint of
      another preset.
  """
  for name in storages:
    storage_lib.check_storage(name)
  exp = presets.get(preset)
  if exp.model.engram is None:
    raise ValueError(f"preset {preset!r} has no Engram tables")
  workdir = Path(workdir)
  step, state, pipeline, trainer = _restore(workdir, exp, corpus_files, tokenizer_file)
  _, eval_step = trainer.jitted()
  trained_tables = {k: e.table for k, e in state.tables.items()}  # {layer key: [Rp, Dh]}
  dims = {int(t.shape[1]) for t in trained_tables.values()}
  if len(dims) != 1:
    raise ValueError(f"expected one row width over the Engram tables, got {sorted(dims)}")
  (dim,) = dims

  def evaluate(tables: dict) -> dict:
    new_state = state.replace(
      tables={k: e._replace(table=tables[k]) for k, e in state.tables.items()}
    )
    return loop.evaluate(eval_step, new_state, pipeline, trainer)

  def measure(name: str, tables: dict, row_bytes, bound) -> dict:
    metrics = evaluate(tables)
    error = max(float(jnp.max(jnp.abs(tables[k] - t))) for k, t in trained_tables.items())
    return {
      "storage": name,
      "row_bytes": row_bytes,
      "max_abs_error": error,
      "max_error_bound": bound,
      "val_loss": metrics["val_loss"],
      "val_engram_gate": metrics["val_engram_gate"],
    }

  trained = evaluate(trained_tables)["val_loss"]
  results, skipped = [], {}
  for name in storages:
    try:
      storage_lib.check_width(name, dim)
    except ValueError as err:  # e.g. mxfp8 needs whole 32-column blocks
      skipped[name] = str(err)
      continue
    tables = {k: storage_lib.round_trip(t, name) for k, t in trained_tables.items()}
    bound = max(float(jnp.max(storage_lib.error_bound(t, name))) for t in trained_tables.values())
    results.append(measure(name, tables, storage_lib.row_bytes(name, dim), bound))
  zeroed = {k: jnp.zeros_like(t) for k, t in trained_tables.items()}
  results.append(measure(ZEROED, zeroed, None, None))
  for r in results:
    r["diff_vs_float32"] = r["val_loss"] - trained
  return {
    "workdir": str(workdir),
    "preset": preset,
    "step": int(step),
    "dim": dim,
    "rows": sum(layout.num_rows for layout in trainer.layouts.values()),
    "trained_val_loss": trained,
    "results": results,
    "skipped": skipped,
  }


def format_table(result: dict) -> str:
  """The result of `storage_accuracy` as a text table."""
  lines = [
    f"{result['workdir']} (preset {result['preset']}), checkpoint at step {result['step']}: "
    f"{result['rows']:,} Engram rows of Dh = {result['dim']}",
    f"validation loss with the tables as trained: {result['trained_val_loss']:.6f}",
    f"{'storage':<10}{'bytes/row':>10}{'max abs error':>15}{'error bound':>13}"
    f"{'val loss':>11}{'vs float32':>13}",
  ]
  for r in result["results"]:
    row_bytes = "-" if r["row_bytes"] is None else str(r["row_bytes"])
    bound = "-" if r["max_error_bound"] is None else f"{r['max_error_bound']:.3e}"
    lines.append(
      f"{r['storage']:<10}{row_bytes:>10}{r['max_abs_error']:>15.3e}{bound:>13}"
      f"{r['val_loss']:>11.6f}{r['diff_vs_float32']:>+13.2e}"
    )
  for name, reason in result.get("skipped", {}).items():
    lines.append(f"{name:<10}not measured: {reason}")
  return "\n".join(lines)
