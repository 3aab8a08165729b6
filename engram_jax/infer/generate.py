"""Text generation from a trained checkpoint, reading the Engram rows from any memory backend.

The serving loop of paper §2.5: the hash ids of the next forward pass depend only on the tokens,
so they are computed on the host and the rows fetched from wherever the table lives (`device`,
`host`, `tiered`, ... through `engram_jax.memory.create`) before the jitted forward runs. The
backbone re-reads the whole (padded) sequence every step: simple and exact, meant for
studying a model, not for throughput.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import memory, presets
from engram_jax.data import encode_corpus
from engram_jax.train import loop
from engram_jax.train.checkpoint import Checkpointer
from engram_jax.train.step import Trainer, checkpoint_tree, from_checkpoint_tree, table_key

# Sequences are padded to a multiple of this, so the forward compiles once per bucket.
_BUCKET = 64


@dataclasses.dataclass
class Generator:
  """A trained model, its tokenizer and hasher, and one memory table per Engram layer.

  Attributes:
    trainer: the model and table layouts.
    params: backbone parameters.
    balance: MoE balancing biases.
    tables: {layer: table object of `engram_jax.memory`}.
    pipeline: the data pipeline (tokenizer, hash function).
  """

  trainer: Trainer
  params: dict
  balance: dict
  tables: dict
  pipeline: object

  @classmethod
  def from_checkpoint(
    cls,
    workdir: str | os.PathLike,
    preset: str,
    memory_kind: str = "device",
    corpus_files=(),
    tokenizer_file: str | None = None,
    **memory_options,
  ) -> Generator:
    """Loads the newest checkpoint of a run and puts its tables into `memory_kind` tables.

    Raises:
      FileNotFoundError: no readable checkpoint in `workdir`.
    """
    exp = presets.get(preset)
    data_cfg = loop.data_config(exp, corpus_files, tokenizer_file)
    pipeline, trainer = loop.build_trainer(exp, data_cfg, encode_corpus(data_cfg))
    ckpt_dir = Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train the preset first")
    ckpt = Checkpointer(ckpt_dir)
    try:
      t = exp.train
      abstract = checkpoint_tree(trainer.abstract_state(t.batch_size, t.seq_len))
      restored = ckpt.restore_latest(abstract)
    finally:
      ckpt.close()
    if restored is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir} restores as preset {preset!r}")
    state = from_checkpoint_tree(restored[1])
    tables = {}
    for layer in trainer.layouts:
      rows = np.asarray(state.tables[table_key(layer)].table)
      tables[layer] = memory.create(
        memory_kind, num_rows=rows.shape[0], dim=rows.shape[1], rows=rows, **memory_options
      )
    return cls(trainer, state.params, state.balance, tables, pipeline)

  def __post_init__(self):
    def logits_at(params, balance, tokens, rows, pos):
      logits, _ = self.trainer.model.apply({"params": params, "balance": balance}, tokens, rows)
      return logits[0, pos]  # [1, Tp, V] -> [V]

    self._logits = jax.jit(logits_at)
    self._hash_fn, _ = loop.engram_hashing(self.trainer.model_cfg, self.pipeline.tokenizer)

  def next_token_logits(self, ids: list[int]) -> np.ndarray:
    """Logits [V] of the token after `ids`."""
    t = len(ids)
    tp = -(-t // _BUCKET) * _BUCKET
    tokens = np.full((1, tp), self.pipeline.special_ids.pad, np.int64)
    tokens[0, :t] = ids
    rows = {}
    if self.tables:
      hash_ids = self._hash_fn(tokens)  # {layer: [1, Tp, H]}, on the host
      for layer, layout in self.trainer.layouts.items():
        row_ids = hash_ids[layer] + layout.offsets  # [1, Tp, H]
        rows[layer] = jnp.asarray(self.tables[layer].fetch(row_ids))  # [1, Tp, H, Dh]
    return np.asarray(
      self._logits(self.params, self.balance, jnp.asarray(tokens, jnp.int32), rows, t - 1)
    )

  def generate(
    self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0
  ) -> str:
    """Continues `prompt`: greedy for temperature 0, else sampled.

    Raises:
      ValueError: an empty prompt, or max_new_tokens < 0.
    """
    ids = self.pipeline.tokenizer.encode(prompt).ids
    if not ids:
      raise ValueError(f"prompt: expected at least one token, got {prompt!r}")
    if max_new_tokens < 0:
      raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    rng = np.random.default_rng(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
      logits = self.next_token_logits(out)
      if temperature <= 0:
        nxt = int(np.argmax(logits))
      else:
        p = np.exp((logits - logits.max()) / temperature)
        nxt = int(rng.choice(len(p), p=p / p.sum()))
      out.append(nxt)
      if nxt == self.pipeline.special_ids.eos:
        break
    return self.pipeline.tokenizer.decode(out[len(ids) :])
