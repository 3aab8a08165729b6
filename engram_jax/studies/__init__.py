"""The paper's studies as lists of runs, and a resumable runner (paper §3-§6; spec §6).

Each study is a function from an Engram-MoE experiment (the preset) to `StudyRun`s: a run's name,
its experiment (model, seed, steps) and the study's coordinates of it (rho, size, block,
variant). `run_study` trains the runs one after another in `WORKDIR/<study>/<run>/`, each a
normal training run (resumable: an interrupted study restarted skips finished runs and resumes
the unfinished one from its checkpoint), then writes `WORKDIR/<study>.json` (every run's command,
seed, commit, CPU and validation loss) and `WORKDIR/<study>.png`.

- `allocation`: the U-curve (paper Fig. 3 left): iso-parameter Engram-MoE models at allocation
  ratios rho (rho = 1: the pure MoE), `params.iso_param_engram`.
- `memory_scaling`: a fixed backbone with Engram tables scaled by factors (Fig. 3 right).
- `placement`: one Engram layer at each block in turn, and the same budget split over two
  blocks (§6.2).
- `ablations`: the paper's ablation table: shared gate, no gate, no tokenizer compression, no
  short convolution, 4-grams at the same table budget, table init std 1.0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
from collections.abc import Callable, Sequence

import numpy as np

from engram_jax import params as params_lib
from engram_jax import presets
from engram_jax.config import ExperimentConfig
from engram_jax.run import folder
from engram_jax.train import loop

STUDIES = ("allocation", "memory_scaling", "placement", "ablations")


@dataclasses.dataclass(frozen=True)
class StudyRun:
  """One run of a study.

  Attributes:
    name: the run's folder name (unique in the study).
    exp: its experiment.
    coords: the study's coordinates of the run (e.g. {"rho": 0.8}), with its seed.
  """

  name: str
  exp: ExperimentConfig
  coords: dict


def _with(exp: ExperimentConfig, seed: int, steps: int | None, **model_changes) -> ExperimentConfig:
  train = dataclasses.replace(exp.train, seed=seed, **({"steps": steps} if steps else {}))
  model = dataclasses.replace(exp.model, **model_changes) if model_changes else exp.model
  return dataclasses.replace(exp, model=model, train=train)


def _engram_of(exp: ExperimentConfig):
  if exp.model.engram is None or exp.model.moe is None:
    raise ValueError(f"preset {exp.name}: expected an Engram-MoE experiment (e.g. cpu_small)")
  return exp.model.engram


def allocation(
  exp: ExperimentConfig, rhos: Sequence[float], seeds: Sequence[int], steps: int | None = None
) -> list[StudyRun]:
  """Iso-parameter models at each rho (the preset's Engram settings, its MoE baseline)."""
  engram = _engram_of(exp)
  base = presets.baseline_of(exp)
  runs = []
  for rho in rhos:
    model = base.model if rho == 1.0 else params_lib.iso_param_engram(base.model, rho, engram)
    point = {
      "rho": rho,
      "routed_experts": model.moe.num_experts,
      "table_params": params_lib.count_params(model).engram_tables,
    }
    for seed in seeds:
      run_exp = dataclasses.replace(_with(base, seed, steps), model=model)
      runs.append(StudyRun(f"rho{rho:g}_seed{seed}", run_exp, {**point, "seed": seed}))
  return runs


def memory_scaling(
  exp: ExperimentConfig, factors: Sequence[float], seeds: Sequence[int], steps: int | None = None
) -> list[StudyRun]:
  """The preset's backbone with its table bases scaled by each factor (same Engram layers)."""
  engram = _engram_of(exp)
  runs = []
  for f in factors:
    bases = tuple(max(2, round(b * f)) for b in engram.table_bases)
    scaled = dataclasses.replace(engram, table_bases=bases)
    table_params = params_lib.count_params(dataclasses.replace(exp.model, engram=scaled))
    for seed in seeds:
      runs.append(
        StudyRun(
          f"x{f:g}_seed{seed}",
          _with(exp, seed, steps, engram=scaled),
          {"factor": f, "table_params": table_params.engram_tables, "seed": seed},
        )
      )
  return runs


def placement(
  exp: ExperimentConfig,
  seeds: Sequence[int],
  steps: int | None = None,
  split: tuple[int, int] | None = None,
) -> list[StudyRun]:
  """One Engram layer at each block in turn, and the budget split over two blocks (`split`,
  default the first two blocks after block 0)."""
  engram = _engram_of(exp)
  n = exp.model.num_layers
  variants = {f"block{i}": dataclasses.replace(engram, layer_ids=(i,)) for i in range(n)}
  a, b = split or (1, min(2, n - 1))
  if a != b:
    half = tuple(max(2, x // 2) for x in engram.table_bases)
    variants[f"blocks{a}+{b}"] = dataclasses.replace(engram, layer_ids=(a, b), table_bases=half)
  return [
    StudyRun(
      f"{name}_seed{seed}", _with(exp, seed, steps, engram=cfg), {"placement": name, "seed": seed}
    )
    for name, cfg in variants.items()
    for seed in seeds
  ]


def ablation_variants(exp: ExperimentConfig) -> dict[str, dict]:
  """{variant: model changes}: the paper's ablation table on the preset's Engram."""
  engram = _engram_of(exp)
  budget = sum(engram.table_bases)  # rows of one head of every order, summed
  four = dataclasses.replace(
    engram, max_ngram_size=4, table_bases=(max(2, budget // 3),) * 3
  )  # the same rows per head, over three orders
  return {
    "full": {},
    "shared_gate": {"engram": dataclasses.replace(engram, gating="shared")},
    "no_gate": {"engram": dataclasses.replace(engram, gating="none")},
    "no_compression": {"engram": dataclasses.replace(engram, compress_tokens=False)},
    "no_short_conv": {"engram": dataclasses.replace(engram, short_conv=False)},
    "4grams": {"engram": four},
    "init_std_1": {"engram_init_std": 1.0},
  }


def ablations(
  exp: ExperimentConfig, seeds: Sequence[int], steps: int | None = None, variants=None
) -> list[StudyRun]:
  """The ablation table's runs (`variants`: a subset of `ablation_variants` names)."""
  table = ablation_variants(exp)
  names = list(variants or table)
  unknown = [v for v in names if v not in table]
  if unknown:
    raise ValueError(f"variants: expected names from {sorted(table)}, got {unknown}")
  return [
    StudyRun(f"{v}_seed{seed}", _with(exp, seed, steps, **table[v]), {"variant": v, "seed": seed})
    for v in names
    for seed in seeds
  ]


def _cpu() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _trained_at(rundir: pathlib.Path) -> str | None:
  """The commit a run was trained at, from its run.json (None if unknown)."""
  record = rundir / folder.RUN_FILE
  return json.loads(record.read_text()).get("commit") if record.exists() else None


def run_study(
  study: str,
  runs: Sequence[StudyRun],
  workdir: str | os.PathLike,
  command: Callable[[StudyRun], str],
  *,
  corpus_files=(),
  tokenizer_file: str | None = None,
  progress: bool = True,
) -> dict:
  """Trains the runs that have no results yet and writes the study's summary and plot.

  Args:
    study: the study's name (`STUDIES`).
    runs: its runs.
    workdir: the study's parent folder: runs go to `workdir/<study>/<run>/`.
    command: the command line that reruns one run alone (recorded in the summary).
    corpus_files: text files; empty: the embedded corpus.
    tokenizer_file: a tokenizer.json; None: the embedded one.
    progress: progress bars.

  Returns:
    The summary written to `workdir/<study>.json`: its "commit" is the code that wrote it, each
    run's "trained_at" the commit it was trained at (from its run.json).
  """
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"{study}: run names must be unique, got {names}")
  root = pathlib.Path(workdir)
  rows = []
  for i, run in enumerate(runs):
    rundir = root / study / run.name
    results_file = rundir / folder.RESULTS_FILE
    if results_file.exists():
      results = json.loads(results_file.read_text())
    else:  # new, or interrupted: resume continues from the newest checkpoint
      results = loop.train(
        run.exp,
        rundir,
        corpus_files=corpus_files,
        tokenizer_file=tokenizer_file,
        resume=rundir.exists(),
        progress=progress,
        label=f"{study} {i + 1}/{len(runs)} {run.name}",
      )
    rows.append(
      {
        "name": run.name,
        **run.coords,
        "val_loss": results["val_loss"],
        "steps": results.get("steps"),
        "command": command(run),
        "workdir": str(rundir),
        "trained_at": _trained_at(rundir),
      }
    )
  summary = {
    "study": study,
    "commit": folder.git_commit(),
    "cpu": _cpu(),
    "runs": rows,
  }
  if study == "memory_scaling" and len({r["table_params"] for r in rows}) > 2:
    summary["fit"] = log_linear_fit(
      [r["table_params"] for r in rows], [r["val_loss"] for r in rows], [r["seed"] for r in rows]
    )
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / f".{study}.json.tmp"
  tmp.write_text(json.dumps(summary, indent=1))
  tmp.replace(root / f"{study}.json")  # derived from the runs' own results: rewritten whole
  plot(summary, root / f"{study}.png")
  return summary


def log_linear_fit(
  sizes: Sequence[float], losses: Sequence[float], seeds: Sequence[int] | None = None
) -> dict:
  """Least-squares fit of loss = intercept[seed] + slope * ln(size) over every run.

  With `seeds`, each seed has its own intercept (seeds share data order and initialisation,
  which shifts all of a seed's losses alike): the slope comes from the differences within each
  seed. Without, one intercept for all runs.

  Returns:
    {"slope": per e-fold of size, "slope_stderr": its standard error (n - seeds - 1 degrees of
    freedom), "slope_per_doubling": slope * ln 2, "intercept": the mean intercept, "points": n,
    "seeds": the number of intercepts}.

  Raises:
    ValueError: fewer points than intercepts + 2, or fewer than 2 distinct sizes.
  """
  x = np.log(np.asarray(sizes, np.float64))
  y = np.asarray(losses, np.float64)
  groups = np.unique(np.asarray(seeds), return_inverse=True)[1] if seeds is not None else None
  groups = np.zeros(x.size, np.int64) if groups is None else groups.reshape(-1)
  k = int(groups.max()) + 1
  if x.size < k + 2 or np.ptp(x) == 0:
    raise ValueError(
      f"log_linear_fit: expected >= {k + 2} points over >= 2 sizes, got {list(sizes)}"
    )
  mean_of = lambda v: (np.bincount(groups, v) / np.bincount(groups))[groups]  # per seed
  xc, yc = x - mean_of(x), y - mean_of(y)
  slope = float(xc @ yc / (xc @ xc))
  residual = yc - slope * xc
  stderr = float(np.sqrt(residual @ residual / (x.size - k - 1) / (xc @ xc)))
  return {
    "slope": slope,
    "slope_stderr": stderr,
    "slope_per_doubling": slope * float(np.log(2.0)),
    "intercept": float(np.mean(y - slope * x)),
    "points": int(x.size),
    "seeds": k,
  }


def _point_key(runs: Sequence[dict]) -> str:
  return next(k for k in ("rho", "factor", "placement", "variant") if k in runs[0])


def _by_point(runs: Sequence[dict], key: str) -> dict:
  """{point: [its runs' validation losses]} in the runs' order."""
  groups: dict = {}
  for r in runs:
    groups.setdefault(r[key], []).append(r["val_loss"])
  return groups


def table(summary: dict) -> str:
  """The study as a Markdown table: per point, each seed's validation loss, their mean and
  range (max - min), and the mean difference to the first point (the reference: rho = 1, the
  smallest table, block 0 or the full model) with its standard error over the seeds, paired
  (each seed against the same seed of the first point: seeds share data order and init)."""
  runs = summary["runs"]
  key = _point_key(runs)
  groups = _by_point(runs, key)
  seeds = sorted({r["seed"] for r in runs})
  extras = [k for k in ("routed_experts", "table_params") if k in runs[0]]
  point_of = {r[key]: r for r in runs}
  head = [key, *extras, *(f"seed {s}" for s in seeds), "mean", "range", "vs first (s.e.)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  first = None
  for point, losses in groups.items():
    by_seed = {r["seed"]: r["val_loss"] for r in runs if r[key] == point}
    first = by_seed if first is None else first
    paired = [by_seed[s] - first[s] for s in seeds if s in by_seed and s in first]
    diff = f"{np.mean(paired):+.4f}" if paired else ""
    if len(paired) > 1 and point != next(iter(groups)):
      diff += f" ({np.std(paired, ddof=1) / np.sqrt(len(paired)):.4f})"
    cells = [str(point), *(f"{point_of[point][k]:,}" for k in extras)]
    cells += [f"{by_seed[s]:.4f}" if s in by_seed else "" for s in seeds]
    cells += [f"{np.mean(losses):.4f}", f"{max(losses) - min(losses):.4f}", diff]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(summary: dict, path: pathlib.Path) -> None:
  """Validation loss per run coordinate: each seed's runs (grey) and their mean."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = summary["runs"]
  key = _point_key(runs)
  groups = _by_point(runs, key)
  xs = list(groups)
  means = [sum(v) / len(v) for v in groups.values()]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  positions = xs if key in ("rho", "factor") else list(range(len(xs)))
  where = dict(zip(xs, positions, strict=True))
  for seed in sorted({r["seed"] for r in runs}):  # seeds share data order: they move alike
    mine = [r for r in runs if r["seed"] == seed]
    ax.plot([where[r[key]] for r in mine], [r["val_loss"] for r in mine], ".-", color="0.75", lw=1)
  ax.plot(positions, means, "o-", color="C0", label="mean over seeds")
  if key == "factor":
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [f"x{x:g}" for x in xs])
  fit = summary.get("fit")
  if fit:  # the log-linear fit, drawn over the factors (size is proportional to factor)
    size_of = {r["factor"]: r["table_params"] for r in runs}
    line = [fit["intercept"] + fit["slope"] * np.log(size_of[x]) for x in xs]
    label = f"fit: {fit['slope_per_doubling']:+.4f} ± {fit['slope_stderr'] * np.log(2):.4f} / 2x"
    ax.plot(xs, line, "--", color="C3", label=label)
  ax.legend(loc="best", fontsize=8)
  if key in ("placement", "variant"):
    ax.set_xticks(positions, [str(x) for x in xs], rotation=30, ha="right")
  ax.set_xlabel(key)
  ax.set_ylabel("validation loss")
  ax.set_title(f"{summary['study']} ({len(runs)} runs; grey: each seed)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
