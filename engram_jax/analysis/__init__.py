"""Analysis of trained runs: the paper's Fig. 4 (LogitLens, CKA) and Fig. 7 (gates, sensitivity).

- `forward`: `AnalysisModel`, a loaded run's model that returns its logits, every block's output
  streams, the LogitLens divergences and the Engram gates; `engram_zeroed` removes every Engram
  branch at inference;
- `lens`: KL(final || block readout) per block;
- `cka`: linear CKA, CKA matrices between two models' blocks, soft alignment;
- `gates`: gate maps of a text, as a heatmap PNG and a self-contained HTML page;
- `sensitivity`: the loss with Engram zeroed, on frequent-n-gram continuations and the rest;
- `tables`: per hash head, rows touched, collisions, row norms, most-read rows as n-grams;
- `report`: `analyze_run`, all of them written for a run (`experiments/analyze.py`).
"""

from engram_jax.analysis.cka import block_representations, cka_matrix, linear_cka, soft_alignment
from engram_jax.analysis.forward import AnalysisModel, ForwardOutputs, engram_zeroed
from engram_jax.analysis.gates import GateMap, gate_map, write_gate_html, write_gate_png
from engram_jax.analysis.lens import kl_divergence, logit_lens, readout
from engram_jax.analysis.report import AnalysisConfig, analyze_run
from engram_jax.analysis.sensitivity import NgramCounts, frequent_mask, sensitivity, token_losses
from engram_jax.analysis.tables import HeadUsage, table_diagnostics, table_usage

__all__ = [
  "AnalysisConfig",
  "AnalysisModel",
  "ForwardOutputs",
  "GateMap",
  "HeadUsage",
  "NgramCounts",
  "analyze_run",
  "block_representations",
  "cka_matrix",
  "engram_zeroed",
  "frequent_mask",
  "gate_map",
  "kl_divergence",
  "linear_cka",
  "logit_lens",
  "readout",
  "sensitivity",
  "soft_alignment",
  "table_diagnostics",
  "table_usage",
  "token_losses",
  "write_gate_html",
  "write_gate_png",
]
