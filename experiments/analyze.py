"""Analyses a trained run: LogitLens, CKA, Engram gates, sensitivity, table diagnostics.

    python -m experiments.analyze --workdir=runs/cpu_small/engram \
      --baseline=runs/cpu_small/baseline --out=runs/cpu_small/analysis

Writes JSON files and plots into --out (default: WORKDIR/analysis; see
`engram_jax.analysis.report`). An --out that holds anything is refused: pass another one or move
it aside. Exit codes: 0 done, 1 error (one line; the traceback goes to a log file), 2 usage.
"""

import json
import sys

from absl import app, flags, logging

from engram_jax.analysis import AnalysisConfig, analyze_run
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.", required=True)
_BASELINE = flags.DEFINE_string(
  "baseline", None, "Another run to compare in the lens and CKA (e.g. WORKDIR/../baseline)."
)
_OUT = flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/analysis).")
_CORPUS = flags.DEFINE_multi_string(
  "corpus", [], "Corpus files; repeatable. Default: the run's, from its run.json."
)
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches", None, "Validation batches analysed (default: the run's eval_batches)."
)
_ORDER = flags.DEFINE_integer("ngram_order", 3, "Order of the sensitivity's frequent n-grams.")
_MIN_COUNT = flags.DEFINE_integer("min_count", 10, "Occurrences that make an n-gram frequent.")
_TEXT = flags.DEFINE_string("text", None, "Text of the gate map (default: validation tokens).")
_TOP_ROWS = flags.DEFINE_integer("top_rows", 10, "Most-read rows listed per hash head.")
_TABLE_TOKENS = flags.DEFINE_integer(
  "max_table_tokens", 1_000_000, "Training tokens hashed for the table diagnostics."
)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    config = AnalysisConfig(
      eval_batches=_EVAL_BATCHES.value,
      ngram_order=_ORDER.value,
      min_count=_MIN_COUNT.value,
      gate_text=_TEXT.value,
      top_rows=_TOP_ROWS.value,
      max_table_tokens=_TABLE_TOKENS.value,
    )
  except ValueError as e:
    cli.usage_exit("analyze", str(e))
  try:
    summary = analyze_run(_WORKDIR.value, _OUT.value, _BASELINE.value, tuple(_CORPUS.value), config)
  except Exception as e:  # one line; the traceback goes to a log file
    sys.exit(cli.report("analyze", e, None))
  print(
    json.dumps({k: summary[k] for k in ("out", "workdir", "step", "baseline", "files")}, indent=2)
  )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("analyze"))
