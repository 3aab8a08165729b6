"""Loss-curve plots from `metrics.jsonl` files (matplotlib, headless)."""

from __future__ import annotations

import json
from collections.abc import Mapping
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
  """Plots the training (thin) and validation (markers) loss of several runs on one axis."""
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  for i, (name, path) in enumerate(runs.items()):
    color = f"C{i}"
    train, val = read_metrics(path)
    if train:
      ax.plot(*zip(*train, strict=True), color=color, alpha=0.55, lw=1, label=f"{name} train")
    if val:
      ax.plot(*zip(*val, strict=True), color=color, marker="o", lw=2, label=f"{name} validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def loss_curve(metrics_path: str | Path, out: str | Path, title: str = "") -> None:
  """Plots one run's training and validation loss."""
  compare_curves({title or "run": metrics_path}, out, title)
