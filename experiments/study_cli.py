"""What the study scripts share: their flags, the command line of one run, and main()."""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Callable

from absl import app, flags, logging

from engram_jax import presets, studies
from experiments import cli

_PRESET = flags.DEFINE_string(
  "preset", "cpu_study", f"An Engram-MoE preset of {sorted(presets.PRESETS)}."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/studies", "Runs go to WORKDIR/<study>/<run>/.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds of every point (default: the study's).")
_STEPS = flags.DEFINE_integer("steps", None, "Steps of every run (default: the preset's).")
_CORPUS = flags.DEFINE_multi_string("corpus", [], "Text file(s) (default: the embedded corpus).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: embedded).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")


def seeds(default: list[int]) -> list[int]:
  """The --seeds flag as ints (or the study's default)."""
  try:
    return [int(s) for s in _SEEDS.value] if _SEEDS.value else default
  except ValueError:
    raise app.UsageError(f"--seeds: expected integers, got {_SEEDS.value}") from None


def floats(flag: flags.FlagHolder) -> list[float]:
  try:
    return [float(x) for x in flag.value]
  except ValueError:
    raise app.UsageError(f"--{flag.name}: expected numbers, got {flag.value}") from None


def main_for(
  study: str, make_runs: Callable, default_seeds: list[int], point_flag: Callable
) -> Callable:
  """An absl main that builds the study's runs from the preset and runs them.

  Args:
    study: the study's name.
    make_runs: (experiment, seeds, steps) -> its `StudyRun`s.
    default_seeds: the seeds without --seeds.
    point_flag: a run -> the flag that selects its point alone (e.g. '--rhos=0.8'), so that
      the recorded command reruns just that run.
  """

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
      exp = presets.get(_PRESET.value)
      runs = make_runs(exp, seeds(default_seeds), _STEPS.value)
      args = [f"--preset={_PRESET.value}"] + [f"--corpus={c}" for c in _CORPUS.value]
      if _TOKENIZER.value:
        args.append(f"--tokenizer={_TOKENIZER.value}")
      if _STEPS.value:
        args.append(f"--steps={_STEPS.value}")

      def command(run: studies.StudyRun) -> str:  # this study, this point and seed alone
        return shlex.join(
          [
            "python", "-m", f"experiments.{study}", f"--workdir={_WORKDIR.value}", *args,
            f"--seeds={run.coords['seed']}", point_flag(run),
          ]
        )  # fmt: skip

      summary = studies.run_study(
        study,
        runs,
        _WORKDIR.value,
        command,
        corpus_files=tuple(_CORPUS.value),
        tokenizer_file=_TOKENIZER.value,
        progress=_PROGRESS.value,
      )
    except app.UsageError:
      raise
    except Exception as e:  # one line; the traceback goes to a log file
      sys.exit(cli.report(study, e, None))
    print(studies.table(summary))
    if "fit" in summary:
      fit = summary["fit"]
      print(
        f"log-linear fit: {fit['slope_per_doubling']:+.4f} validation loss per doubling of the"
        f" tables (standard error {fit['slope_stderr'] * math.log(2):.4f}, {fit['points']} runs)"
      )
    print(f"wrote {_WORKDIR.value}/{study}.json and {study}.png")

  return main
