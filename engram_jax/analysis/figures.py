"""Figures of the analysis (matplotlib, headless): LogitLens curves, CKA heatmap, sensitivity."""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def write_lens_png(curves: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """KL(final || block) against the block index, one line per model ({name: [L]})."""
  fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
  for name, kl in curves.items():
    ax.plot(np.arange(len(kl)), kl, marker="o", label=name)
  ax.set_xlabel("block (0-based)")
  ax.set_ylabel("KL(final || block readout) (nats)")
  ax.set_title("LogitLens")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_cka_png(cka: np.ndarray, name_a: str, name_b: str, path: str | os.PathLike) -> None:
  """The [La, Lb] CKA matrix as a heatmap (rows: blocks of `name_a`, columns: of `name_b`)."""
  fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
  im = ax.imshow(cka, origin="lower", cmap="magma", vmin=0.0, vmax=1.0)
  ax.set_ylabel(f"{name_a} block")
  ax.set_xlabel(f"{name_b} block")
  ax.set_title("linear CKA")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_sensitivity_png(result: dict, path: str | os.PathLike) -> None:
  """Loss with and without Engram per token category, and its increase
  (`sensitivity.sensitivity`'s result)."""
  cats = {k: v for k, v in result["categories"].items() if v["tokens"]}
  x = np.arange(len(cats))
  labels = [f"{k}\n({v['tokens']} tokens)" for k, v in cats.items()]
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
  ax.bar(x - 0.2, [v["loss"] for v in cats.values()], 0.4, label="with Engram")
  ax.bar(x + 0.2, [v["loss_engram_zeroed"] for v in cats.values()], 0.4, label="Engram zeroed")
  ax.set_xticks(x, labels)
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.legend(loc="lower right")
  ax2.bar(x, [v["loss_increase"] for v in cats.values()], 0.5, color="C3")
  ax2.axhline(0, color="grey", lw=1)
  ax2.set_xticks(x, labels)
  ax2.set_ylabel("loss increase with Engram zeroed (nats / token)")
  fig.suptitle(f"order-{result['order']} n-grams seen >= {result['min_count']} times: frequent")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
