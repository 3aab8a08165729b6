"""Engram against its iso-parameter MoE baseline: same data, steps, seed and schedule."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import logging

from engram_jax import plots, presets
from engram_jax.config import ExperimentConfig
from engram_jax.data import encode_corpus
from engram_jax.errors import UsageRefused
from engram_jax.run import folder
from engram_jax.train import loop


def train_and_compare(
  exp: ExperimentConfig,
  workdir: str | Path,
  *,
  corpus_files=(),
  tokenizer_file: str | None = None,
  resume: bool = False,
  overwrite: bool = False,
  progress: bool = True,
) -> dict:
  """Trains `exp` in `workdir/engram` and its baseline in `workdir/baseline`.

  Both runs are checked (`loop.prepare`) before either trains; `overwrite` moves the whole
  comparison folder aside.

  Returns:
    The Engram run's results plus `baseline_val_loss`, `val_loss_difference` (Engram minus
    baseline: negative means Engram is better) and the baseline's full results; also written
    to `workdir/results.json`, with both loss curves in `workdir/loss_curves.png`.
  """
  workdir = Path(workdir)
  baseline = presets.baseline_of(exp)
  data_cfg = loop.data_config(exp, corpus_files, tokenizer_file)
  runs = ((exp, workdir / "engram"), (baseline, workdir / "baseline"))
  if resume and overwrite:
    raise UsageRefused("--resume and --overwrite contradict each other: pass one of them")
  if overwrite and jax.process_index() == 0:
    contents = folder.run_contents(workdir) + [x for _, d in runs for x in folder.run_contents(d)]
    if contents:
      logging.warning("--overwrite: moved the old runs aside to %s", folder.move_aside(workdir))
  for e, d in runs:  # refuse before anything trains
    loop.prepare(e, d, data_cfg, resume=resume)
  # Encode the corpus once: both runs see exactly the same token stream and batches.
  tokens = encode_corpus(data_cfg)
  common = dict(
    corpus_files=corpus_files,
    tokenizer_file=tokenizer_file,
    resume=resume,
    tokens=tokens,
    progress=progress,
  )
  ours = loop.train(exp, workdir / "engram", label=exp.name, **common)
  theirs = loop.train(baseline, workdir / "baseline", label=baseline.name, **common)
  results = dict(ours)
  results["baseline_val_loss"] = theirs["val_loss"]
  results["val_loss_difference"] = ours["val_loss"] - theirs["val_loss"]
  results["baseline"] = theirs
  if jax.process_index() == 0:  # multi-host: one process writes
    workdir.mkdir(parents=True, exist_ok=True)
    folder.atomic_write(workdir / folder.RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    plots.compare_curves(
      {
        exp.name: workdir / "engram" / "metrics.jsonl",
        baseline.name: workdir / "baseline" / "metrics.jsonl",
      },
      workdir / "loss_curves.png",
      title=f"{exp.name} vs iso-parameter MoE baseline",
    )
  return results


def format_comparison(results: dict) -> str:
  """The two validation losses side by side."""
  base = results["baseline"]
  p, pb = results["params"], base["params"]
  rows = [
    f"{'':<22}{'Engram':>14}{'MoE baseline':>16}",
    f"{'validation loss':<22}{results['val_loss']:>14.4f}{base['val_loss']:>16.4f}",
    f"{'P_tot':<22}{p['p_tot']:>14,}{pb['p_tot']:>16,}",
    f"{'P_act':<22}{p['p_act']:>14,}{pb['p_act']:>16,}",
    f"{'tokens/s':<22}{results['tokens_per_sec'] or 0:>14,.0f}"
    f"{base['tokens_per_sec'] or 0:>16,.0f}",
    f"difference (Engram - baseline): {results['val_loss_difference']:+.4f} nats/token",
  ]
  return "\n".join(rows)
