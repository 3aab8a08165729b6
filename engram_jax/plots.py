"""Plots (matplotlib, headless): loss curves from `metrics.jsonl` files, benchmark figures."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(path: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """(training (step, loss) pairs, validation (step, val_loss) pairs) of a metrics.jsonl."""
  train, val = [], []
  for line in Path(path).read_text().splitlines():
    if not line.strip():
      continue
    r = json.loads(line)
    if "loss" in r:
      train.append((r["step"], r["loss"]))
    if "val_loss" in r:
      val.append((r["step"], r["val_loss"]))
  return train, val


def compare_curves(runs: Mapping[str, str | Path], out: str | Path, title: str = "") -> None:
  """Plots the training (thin) and validation (markers) loss of several runs on one axis.

  With exactly two runs a second panel shows the first run's validation loss minus the
  second's: at this zoom the gap between close curves is visible.
  """
  curves = {name: read_metrics(path) for name, path in runs.items()}
  two = len(curves) == 2
  fig, axes = plt.subplots(
    1, 2 if two else 1, figsize=(11 if two else 7, 4.5), dpi=110, squeeze=False
  )
  ax = axes[0, 0]
  for i, (name, (train, val)) in enumerate(curves.items()):
    color = f"C{i}"
    if train:
      ax.plot(*zip(*train, strict=True), color=color, alpha=0.55, lw=1, label=f"{name} train")
    if val:
      ax.plot(*zip(*val, strict=True), color=color, marker="o", lw=2, label=f"{name} validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  if two:
    (a_name, (_, a_val)), (b_name, (_, b_val)) = curves.items()
    b_at = dict(b_val)
    steps = [s for s, _ in a_val if s in b_at]
    diff = [v - b_at[s] for s, v in a_val if s in b_at]
    ax2 = axes[0, 1]
    ax2.axhline(0, color="grey", lw=1)
    ax2.bar(
      steps,
      diff,
      width=(steps[1] - steps[0]) * 0.6 if len(steps) > 1 else 1,
      color=["C2" if d < 0 else "C3" for d in diff],
    )
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation loss difference (nats / token)")
    ax2.set_title(f"{a_name} minus {b_name}\n(below 0: {a_name} better)", fontsize=10)
    ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def loss_curve(metrics_path: str | Path, out: str | Path, title: str = "") -> None:
  """Plots one run's training and validation loss."""
  compare_curves({title or "run": metrics_path}, out, title)


def hit_rates(records: Sequence[Mapping], policies: Sequence[str], out: str | Path) -> None:
  """Tiered cache hit rates (records {"zipf", "fraction", "ideal", and each policy's hit rate},
  as `bench/memory_sections.py` writes them): one panel per Zipf exponent, the hit rate of each
  policy and the ideal against cache size."""
  exponents = sorted({rec["zipf"] for rec in records})
  fig, axes = plt.subplots(1, len(exponents), figsize=(5 * len(exponents), 4), dpi=110,
                           squeeze=False, sharey=True)  # fmt: skip
  for ax, a in zip(axes[0], exponents, strict=True):
    recs = sorted((rec for rec in records if rec["zipf"] == a), key=lambda rec: rec["fraction"])
    x = [100 * rec["fraction"] for rec in recs]
    for name in (*policies, "ideal"):
      style = {"linestyle": "--", "color": "gray"} if name == "ideal" else {"marker": "o"}
      ax.plot(x, [rec[name] for rec in recs], label=name, **style)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}%" for v in x])
    ax.set_xlabel("cache size (% of rows)")
    ax.set_title(f"Zipf exponent {a:g}")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("hit rate")
  axes[0, 0].legend()
  fig.suptitle("Tiered cache hit rate by policy")
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)
