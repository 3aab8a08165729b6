"""Gate maps (paper Fig. 7): how strongly each Engram layer lets its memory in, token by token.

Every Engram layer computes a gate alpha [B, T, M] in (0, 1) per token and residual stream (it
sows it into the "intermediates" collection). A gate map runs the model over one text and keeps
each layer's gates; `write_gate_png` draws them as a heatmap (streams x tokens) and
`write_gate_html` writes a self-contained page with the text's tokens coloured by their gate
(the mean over streams; each token's per-stream values in its tooltip).
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import tokenizers

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
  from engram_jax.analysis.forward import AnalysisModel

# Tokens rendered in a gate heatmap at most (a longer text is cut, the HTML page keeps all).
_PNG_TOKENS = 160


@dataclasses.dataclass(frozen=True)
class GateMap:
  """The gates of every Engram layer over one text.

  Attributes:
    token_ids: the text's T raw token ids.
    token_texts: each token decoded on its own.
    gates: {Engram layer: [T, M] float32 gate values}.
  """

  token_ids: tuple[int, ...]
  token_texts: tuple[str, ...]
  gates: dict[int, np.ndarray]

  def to_json(self) -> dict:
    """A JSON-serialisable form: tokens, and each layer's [T, M] gates as nested lists."""
    return {
      "token_ids": list(self.token_ids),
      "tokens": list(self.token_texts),
      "gates": {str(layer): g.round(6).tolist() for layer, g in sorted(self.gates.items())},
    }


def gate_map(model: AnalysisModel, tokenizer: tokenizers.Tokenizer, text: str) -> GateMap:
  """The gates of every Engram layer of `model` over `text`.

  Raises:
    ValueError: a model without Engram, or a text without tokens.
  """
  if not model.has_engram:
    raise ValueError("model: expected a model with Engram layers, got one without")
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  if not ids:
    raise ValueError(f"text: expected at least one token, got {text!r}")
  out = model.forward(np.asarray([ids], np.int64))
  gates = {layer: g[0] for layer, g in out.gates.items()}  # [1, T, M] -> [T, M]
  texts = tuple(tokenizer.decode([i]) for i in ids)
  return GateMap(tuple(int(i) for i in ids), texts, gates)


def _label(text: str) -> str:
  """A token as a tick label: line breaks visible, no mathtext."""
  return text.replace("\n", "\u21b5").replace("$", r"\$")


def write_gate_png(gates: GateMap, path: str | os.PathLike) -> None:
  """Draws each layer's gates as a heatmap, streams by tokens (at most 160 tokens)."""
  t = min(len(gates.token_ids), _PNG_TOKENS)
  layers = sorted(gates.gates)
  width = min(max(6.0, 0.22 * t + 2.0), 40.0)
  fig, axes = plt.subplots(
    len(layers), 1, figsize=(width, 1.6 + 1.4 * len(layers)), dpi=110, squeeze=False
  )
  for ax, layer in zip(axes[:, 0], layers, strict=True):
    g = gates.gates[layer][:t].T  # [T, M] -> [M, T]
    im = ax.imshow(g, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(g.shape[0]), [f"stream {m}" for m in range(g.shape[0])])
    ax.set_xticks(range(t), [_label(s) for s in gates.token_texts[:t]], rotation=90, fontsize=7)
    ax.set_title(f"Engram gate, block {layer}")
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


_STYLE = (
  "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}"
  ".t{white-space:pre-wrap;font-family:monospace;padding:1px 0;border-radius:2px}"
  ".key span{display:inline-block;width:3em;text-align:center;font-family:monospace}"
)


def _span(text: str, gate_row: np.ndarray) -> str:
  mean = float(gate_row.mean())
  tip = "gate " + " ".join(f"{g:.3f}" for g in gate_row)
  return (
    f'<span class="t" style="background:rgba(230,85,13,{mean:.3f})" '
    f'title="{html.escape(tip)}">{html.escape(text)}</span>'
  )


def write_gate_html(gates: GateMap, path: str | os.PathLike, title: str = "Engram gates") -> None:
  """Writes a self-contained HTML page: per Engram layer, the text with every token's
  background as opaque as its gate (the mean over streams; the per-stream gates on hover).
  The tokens are HTML-escaped."""
  key = "".join(
    f'<span style="background:rgba(230,85,13,{v:.2f})">{v:.2f}</span>' for v in np.linspace(0, 1, 6)
  )
  parts = [
    "<!DOCTYPE html>",
    '<html><head><meta charset="utf-8">',
    f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
    f"<h1>{html.escape(title)}</h1>",
    f'<p class="key">gate (mean over streams): {key}</p>',
  ]
  for layer in sorted(gates.gates):
    g = gates.gates[layer]  # [T, M]
    spans = "".join(_span(text, g[i]) for i, text in enumerate(gates.token_texts))
    # No whitespace between the spans: the tokens carry their own.
    parts.append(f"<h2>block {layer} (mean gate {float(g.mean()):.3f})</h2><p>{spans}</p>")
  parts.append("</body></html>")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
