"""A guided tour of one Engram read: tokens -> compressed ids -> hash ids -> gates.

`explain(text)` runs the whole host + device path on one sentence with a freshly initialised
Engram layer and returns one row per token; `format_rows` renders them as a table. Used by
`make demo` (experiments/quickstart.py) and the quickstart notebook.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.hashing import EngramHashing
from engram_jax.layers.engram import Engram
from engram_jax.memory import device
from engram_jax.tokenization import load_tokenizer

EXAMPLE = "Only Alexander the Great could tame the horse Bucephalus."


def quickstart_config() -> EngramConfig:
  """A small memory for the tour: Ng = 3, Hn = 4, one Engram layer."""
  return EngramConfig(
    max_ngram_size=3,
    heads_per_ngram=4,
    embed_per_ngram=64,
    table_bases=(10_007, 10_007),
    layer_ids=(1,),
    kernel_size=4,
    pad_token_id=0,
    seed=0,
  )


@dataclasses.dataclass(frozen=True)
class TokenRow:
  """What Engram sees at one position."""

  position: int
  token: str
  raw_id: int
  compressed_id: int
  hash_ids: tuple[int, ...]
  gates: tuple[float, ...]


def explain(
  text: str,
  tokenizer_path: str | os.PathLike,
  cfg: EngramConfig | None = None,
  streams: int = 4,
  hidden_size: int = 64,
  seed: int = 0,
) -> list[TokenRow]:
  """Tokenizes, compresses and hashes `text`, then runs one Engram layer on random states.

  Args:
    text: the sentence.
    tokenizer_path: a Hugging Face `tokenizer.json`.
    cfg: the memory settings (default `quickstart_config()`); its first layer is used.
    streams: M, residual branches of the hidden state.
    hidden_size: D.
    seed: seeds the table, the layer and the hidden state.

  Returns:
    One `TokenRow` per token.
  """
  cfg = cfg or quickstart_config()
  tok = load_tokenizer(tokenizer_path)
  wiring = EngramHashing.from_tokenizer(cfg, tok)
  enc = tok.encode(text)
  if not enc.ids:
    raise ValueError(f"text: expected at least one token, got {text!r}")
  raw = np.asarray([enc.ids], dtype=np.int64)  # [1, T]
  compressed = wiring.compressor(raw)  # [1, T]
  layer = cfg.layer_ids[0]
  ids = wiring.hasher(compressed, layer)  # [1, T] -> [1, T, H]

  k_table, k_layer, k_hidden = jax.random.split(jax.random.key(seed), 3)
  layout = wiring.layouts[layer]
  rows = device.fetch(layout, layout.init(k_table), jnp.asarray(ids, jnp.int32))
  hidden = jax.random.normal(k_hidden, (1, raw.shape[1], streams, hidden_size))
  module = Engram(max_ngram_size=cfg.max_ngram_size, kernel_size=cfg.kernel_size)
  params = nn.unbox(module.init(k_layer, hidden, rows))
  _, state = module.apply(params, hidden, rows, mutable=["intermediates"])
  gates = np.asarray(state["intermediates"]["gate"][0])[0]  # [T, M]
  return [
    TokenRow(
      t,
      tok.decode([int(raw[0, t])]),
      int(raw[0, t]),
      int(compressed[0, t]),
      tuple(int(v) for v in ids[0, t]),
      tuple(float(g) for g in gates[t]),
    )
    for t in range(raw.shape[1])
  ]


def format_rows(rows: list[TokenRow]) -> str:
  """A fixed-width table of `explain`'s rows."""
  lines = [f"{'t':>3} {'token':<14} {'raw':>6} {'comp':>6}  {'hash ids (n=2 | n=3)':<58} gates"]
  for r in rows:
    half = len(r.hash_ids) // 2
    hashes = " ".join(map(str, r.hash_ids[:half])) + " | " + " ".join(map(str, r.hash_ids[half:]))
    gates = " ".join(f"{g:.3f}" for g in r.gates)
    lines.append(
      f"{r.position:>3} {r.token!r:<14} {r.raw_id:>6} {r.compressed_id:>6}  {hashes:<58} {gates}"
    )
  return "\n".join(lines)
