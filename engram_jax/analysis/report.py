"""Every analysis of a trained run, written to one folder (`experiments/analyze.py`).

`analyze_run(workdir, out)` loads the run (`engram_jax.run.load_run`), reads its corpus (the
files recorded in its run.json, or others given) and splits it as training did, then writes:

  analysis.json       what was analysed (run, step, baseline, corpus, token counts) and the files
  logit_lens.json/png KL(final || block) per block, of the run and of the baseline (Fig. 4a)
  cka.json/png        linear CKA of the run's blocks against the baseline's (or its own), with
                      the soft alignment of each baseline block (Fig. 4b-c)
  gates.json, gate_map.png, gate_map.html
                      the Engram gates over one text (Fig. 7)
  sensitivity.json/png
                      validation loss with Engram zeroed, per token category (Fig. 7 / §6.4)
  tables.json, table_row_norms.png
                      per hash head: rows touched by the training windows, collisions, row
                      norms, the most-read rows decoded to their n-grams

The last three need Engram; for a run without it they are skipped. The folder is written
under a temporary name and renamed at the end, so it never holds half an analysis, and an
existing non-empty `out` is refused (nothing is overwritten).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from absl import logging

from engram_jax.analysis import cka as cka_lib
from engram_jax.analysis import figures, gates, lens, sensitivity, tables
from engram_jax.analysis.forward import AnalysisModel
from engram_jax.data import DataConfig, encode_corpus, split_tokens
from engram_jax.data.pipeline import Windows
from engram_jax.errors import UsageRefused
from engram_jax.run import LoadedRun, folder, load_run

DEFAULT_OUT = "analysis"


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """How much to analyse.

  Attributes:
    eval_batches: validation batches (of the run's batch size) for the lens, CKA and
      sensitivity; None: the run's own `eval_batches`.
    ngram_order: n of the sensitivity's frequent n-grams (n - 1 context tokens + the target).
    min_count: K, occurrences in the training split from which an n-gram is frequent.
    gate_text: the text of the gate map; None: the first 64 tokens of the validation split.
    top_rows: most-read rows listed per hash head.
    max_table_tokens: tokens of training windows hashed for the table diagnostics.
    cka_top_k: blocks averaged by the CKA soft alignment.
  """

  eval_batches: int | None = None
  ngram_order: int = 3
  min_count: int = 10
  gate_text: str | None = None
  top_rows: int = 10
  max_table_tokens: int = 1_000_000
  cka_top_k: int = 3

  def __post_init__(self):
    checks = [
      ("eval_batches", self.eval_batches is None or self.eval_batches >= 1, "None or >= 1"),
      ("ngram_order", self.ngram_order >= 2, "an int >= 2"),
      ("min_count", self.min_count >= 1, "an int >= 1"),
      ("top_rows", self.top_rows >= 0, "an int >= 0"),
      ("max_table_tokens", self.max_table_tokens >= 1, "an int >= 1"),
      ("cka_top_k", self.cka_top_k >= 1, "an int >= 1"),
    ]
    for name, ok, expected in checks:
      if not ok:
        raise ValueError(f"AnalysisConfig.{name}: expected {expected}, got {getattr(self, name)!r}")


def check_out(out: Path) -> None:
  """Raises UsageRefused if `out` exists and is not an empty folder."""
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UsageRefused(
      f"{out} already exists and is not empty; pass another --out, or move it aside to "
      "analyse again"
    )


def corpus_files(workdir: Path, given=()) -> list[str]:
  """The corpus files to analyse: `given`, or those recorded in the run's run.json.

  Raises:
    FileNotFoundError: a recorded file is gone, or there is no record and none given.
  """
  if given:
    return [str(p) for p in given]
  record = folder.read_run(workdir)
  if record is None:
    raise FileNotFoundError(f"{workdir} has no {folder.RUN_FILE}; pass its corpus with --corpus")
  paths = [entry["path"] for entry in record["corpus"]]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"the run's corpus file {path} is missing; pass it with --corpus")
  return paths


def _windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
  """The first `count` windows [n, T + 1] of a stream (as the pipeline cuts it)."""
  w = Windows(tokens, seq_len)
  return np.stack([w[i] for i in range(min(count, len(w)))]) if len(w) else np.zeros((0, 0))


def _write_json(path: Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=1) + "\n")


def _analyze(
  run: LoadedRun, base: LoadedRun | None, paths: list[str], cfg: AnalysisConfig, tmp: Path
) -> dict:
  """Writes every analysis into `tmp`; returns the contents of analysis.json."""
  exp = run.experiment
  t, b = exp.train.seq_len, exp.train.batch_size
  data_cfg = DataConfig(corpus_files=tuple(paths), seq_len=t, batch_size=b)
  stream = encode_corpus(data_cfg, tokenizer=run.tokenizer)
  train_tokens, val_tokens = split_tokens(stream, exp.train.val_fraction)
  n_batches = cfg.eval_batches or exp.train.eval_batches
  val = _windows(val_tokens, t, n_batches * b)  # [n, T + 1]
  if val.shape[0] == 0:
    raise ValueError(f"the validation split of {paths} is shorter than one window of {t + 1}")
  batches = [val[i : i + b] for i in range(0, val.shape[0], b)]  # [<= B, T + 1] each
  inputs = [w[:, :-1] for w in batches]  # [<= B, T]
  model = AnalysisModel.from_run(run)
  baseline = AnalysisModel.from_run(base) if base is not None else None
  files = []

  logging.info("analysis: logit lens over %d tokens", val.shape[0] * t)
  curves = {"run": lens.logit_lens(model, inputs)}
  if baseline is not None:
    curves["baseline"] = lens.logit_lens(baseline, inputs)
  _write_json(tmp / "logit_lens.json", {k: v.tolist() for k, v in curves.items()})
  figures.write_lens_png(curves, tmp / "logit_lens.png")
  files += ["logit_lens.json", "logit_lens.png"]

  logging.info("analysis: CKA")
  reps = cka_lib.block_representations(model, inputs)
  other = cka_lib.block_representations(baseline, inputs) if baseline is not None else reps
  name_b = "baseline" if baseline is not None else "run"
  matrix = cka_lib.cka_matrix(reps, other)  # [L_run, L_b]
  _write_json(
    tmp / "cka.json",
    {
      "rows": "run",
      "columns": name_b,
      "cka": matrix.tolist(),
      "top_k": cfg.cka_top_k,
      "soft_alignment": cka_lib.soft_alignment(matrix, cfg.cka_top_k).tolist(),
    },
  )
  figures.write_cka_png(matrix, "run", name_b, tmp / "cka.png")
  files += ["cka.json", "cka.png"]

  if model.has_engram:
    logging.info("analysis: gate map")
    text = cfg.gate_text or run.tokenizer.decode([int(i) for i in val[0, :64]])
    gate_map = gates.gate_map(model, run.tokenizer, text)
    _write_json(tmp / "gates.json", gate_map.to_json())
    gates.write_gate_png(gate_map, tmp / "gate_map.png")
    gates.write_gate_html(gate_map, tmp / "gate_map.html", f"Engram gates of {run.workdir}")
    files += ["gates.json", "gate_map.png", "gate_map.html"]

    logging.info("analysis: sensitivity to zeroing Engram")
    counts = sensitivity.NgramCounts.from_tokens(
      train_tokens, cfg.ngram_order, run.model_cfg.vocab_size
    )
    result = sensitivity.sensitivity(model, batches, counts, cfg.min_count)
    _write_json(tmp / "sensitivity.json", result)
    figures.write_sensitivity_png(result, tmp / "sensitivity.png")
    files += ["sensitivity.json", "sensitivity.png"]

    logging.info("analysis: table diagnostics")
    windows = _windows(train_tokens, t, max(1, cfg.max_table_tokens // t))[:, :-1]  # [n, T]
    usage = tables.table_usage(run.hashing, windows)
    diag = tables.table_diagnostics(usage, run.tables, run.tokenizer, cfg.top_rows)
    _write_json(tmp / "tables.json", {"tokens": int(windows.size), "layers": diag})
    tables.write_row_norm_png(usage, run.tables, tmp / "table_row_norms.png")
    files += ["tables.json", "table_row_norms.png"]

  return {
    "workdir": str(run.workdir),
    "step": run.step,
    "baseline": str(base.workdir) if base is not None else None,
    "baseline_step": base.step if base is not None else None,
    "corpus": paths,
    "validation_tokens": int(val.shape[0] * t),
    "config": dataclasses.asdict(cfg),
    "files": files,
  }


def analyze_run(
  workdir: str | os.PathLike,
  out: str | os.PathLike | None = None,
  baseline: str | os.PathLike | None = None,
  corpus: tuple[str, ...] = (),
  config: AnalysisConfig = AnalysisConfig(),
) -> dict:
  """Writes every analysis of a trained run into `out` (see the module docstring).

  Args:
    workdir: the run's folder.
    out: the output folder (default: WORKDIR/analysis); it must not exist or be empty.
    baseline: another run's folder (e.g. the iso-parameter MoE baseline), compared on the same
      tokens in the lens and CKA.
    corpus: corpus files; default: the run's recorded corpus.
    config: how much to analyse.

  Returns:
    The contents of analysis.json.

  Raises:
    UsageRefused: `out` holds something.
    FileNotFoundError: no checkpoint, or a missing corpus or tokenizer file.
    ValueError: a baseline with another vocabulary, or a corpus too short.
  """
  workdir = Path(workdir)
  out = Path(out) if out is not None else workdir / DEFAULT_OUT
  check_out(out)
  paths = corpus_files(workdir, corpus)
  run = load_run(workdir)
  base = load_run(baseline) if baseline is not None else None
  if base is not None and base.model_cfg.vocab_size != run.model_cfg.vocab_size:
    raise ValueError(
      f"baseline: expected the run's vocabulary of {run.model_cfg.vocab_size} ids, got "
      f"{base.model_cfg.vocab_size}"
    )
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
  tmp.mkdir()
  try:
    summary = {"out": str(out), **_analyze(run, base, paths, config, tmp)}
    _write_json(tmp / "analysis.json", summary)
    check_out(out)  # nothing appeared there meanwhile
    os.rename(tmp, out)  # replaces an empty folder, never a full one
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)  # only our own unfinished folder
    raise
  logging.info("analysis written to %s", out)
  return summary
