"""Text generation from a trained checkpoint, reading the Engram rows from any memory backend.

The serving loop of paper §2.5: the hash ids of the next forward pass depend only on the tokens,
so they are computed on the host and the rows fetched from wherever the table lives (`device`,
`host`, `tiered`, ... through `engram_jax.memory.create`) before the jitted forward runs.

`generate` decodes incrementally: one prefill of the prompt, then one token per step with the
attention keys/values and the Engram convolution state in a `DecodeCache`; a new token's hash
ids need only the last N tokens. `next_token_logits` runs the full forward over a sequence
(scoring, and the reference the cached path is tested against).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import memory, presets
from engram_jax.config import experiment_from_dict
from engram_jax.data import encode_corpus
from engram_jax.model import init_decode_cache
from engram_jax.tokenization import load_tokenizer
from engram_jax.train import loop, rundir
from engram_jax.train import tables as tables_lib
from engram_jax.train.checkpoint import Checkpointer
from engram_jax.train.step import Trainer, checkpoint_tree, from_checkpoint_tree, table_key

# Sequences (and decoding caches) are padded to a multiple of this, so the forward compiles
# once per bucket.
_BUCKET = 64


def _bucket(n: int) -> int:
  return -(-n // _BUCKET) * _BUCKET


def _recorded_file(entry: dict, what: str, flag: str) -> str:
  """The path of a file recorded in run.json, which must still exist."""
  path = entry["path"]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the run's {what} {path} is missing; pass it with {flag}")
  return path


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
    preset: str | None = None,
    memory_kind: str = "device",
    corpus_files=None,
    tokenizer_file: str | None = None,
    **memory_options,
  ) -> Generator:
    """Loads the newest good checkpoint of a run and puts its tables into `memory_kind` tables.

    The model, tokenizer and corpus (which calibrates a tiered cache) are the run's, read from
    its `run.json`; `preset`, `corpus_files` and `tokenizer_file` override them (a run of an
    older version, without run.json, needs `preset` and the files it was trained with).
    Checkpoints are verified as in training but never moved: a corrupt step is skipped.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`, or a recorded file is missing.
      ValueError: no run.json and no preset; a tokenizer whose vocabulary is not the run's.
      CheckpointMismatch, NoGoodCheckpoint: see `Checkpointer.restore_latest`.
    """
    workdir = Path(workdir)
    ckpt_dir = workdir / rundir.CHECKPOINTS
    if not ckpt_dir.is_dir():
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train a run there first")
    record = rundir.read_run(workdir)
    if preset is not None:
      exp = presets.get(preset)
    elif record is not None:
      exp = experiment_from_dict(record["config"])
    else:
      raise ValueError(f"{workdir} has no {rundir.RUN_FILE} (an older run): pass its --preset")
    if tokenizer_file is None and record is not None:
      tokenizer_file = _recorded_file(record["tokenizer"], "tokenizer", "--tokenizer")
    if corpus_files is None:
      corpus_files = (
        [_recorded_file(f, "corpus file", "--corpus") for f in record["corpus"]] if record else ()
      )
    data_cfg = loop.data_config(exp, corpus_files, tokenizer_file)
    vocab = load_tokenizer(data_cfg.tokenizer_path()).get_vocab_size()
    trained_vocab = record["config"]["model"]["vocab_size"] if record else vocab
    if vocab != trained_vocab:
      raise ValueError(
        f"tokenizer {data_cfg.tokenizer_path()} has {vocab} ids; the run in {workdir} was "
        f"trained with a vocabulary of {trained_vocab} (its tokenizer: "
        f"{record['tokenizer']['path']}); pass that tokenizer with --tokenizer"
      )
    pipeline, trainer = loop.build_trainer(exp, data_cfg, encode_corpus(data_cfg))
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
      t = exp.train
      abstract = checkpoint_tree(trainer.abstract_state(t.batch_size, t.seq_len))
      restored = ckpt.restore_latest(abstract)
    finally:
      ckpt.close()
    if restored is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train a run there first")
    state = from_checkpoint_tree(restored[1])
    return cls._from_state(trainer, pipeline, state, memory_kind, memory_options)

  @classmethod
  def untrained(
    cls,
    preset: str,
    memory_kind: str = "device",
    corpus_files=(),
    tokenizer_file: str | None = None,
    seed: int = 0,
    **memory_options,
  ) -> Generator:
    """A freshly initialised model of `preset` (for measuring speed, or a baseline)."""
    exp = presets.get(preset)
    data_cfg = loop.data_config(exp, corpus_files, tokenizer_file)
    pipeline, trainer = loop.build_trainer(exp, data_cfg, encode_corpus(data_cfg))
    t = exp.train
    state = jax.jit(lambda k: trainer.init(k, t.batch_size, t.seq_len))(jax.random.key(seed))
    return cls._from_state(trainer, pipeline, state, memory_kind, memory_options)

  @classmethod
  def _from_state(cls, trainer, pipeline, state, memory_kind: str, memory_options: dict):
    """Puts the state's tables into `memory_kind` tables. A 'tiered' cache starts with the
    rows the first training batches read most, as in training (`tables.CALIBRATION_BATCHES`)."""
    tables = {}
    for layer in trainer.layouts:
      rows = np.asarray(state.tables[table_key(layer)].table)
      tables[layer] = memory.create(
        memory_kind, num_rows=rows.shape[0], dim=rows.shape[1], rows=rows, **memory_options
      )
    if memory_kind == "tiered":
      batches = list(itertools.islice(iter(pipeline.train), tables_lib.CALIBRATION_BATCHES))
      for layer, layout in trainer.layouts.items():
        tables[layer].calibrate([layout.row_ids(b["hash_ids"][layer]) for b in batches])
    return cls(trainer, state.params, state.balance, tables, pipeline)

  def __post_init__(self):
    def logits_at(params, balance, tokens, rows, pos):
      logits, _ = self.trainer.model.apply({"params": params, "balance": balance}, tokens, rows)
      return logits[0, pos]  # [1, Tp, V] -> [V]

    def decode(params, balance, tokens, rows, positions, cache):
      variables = {"params": params, "balance": balance}
      logits, _, cache = self.trainer.model.apply(
        variables, tokens, rows, positions=positions, cache=cache
      )
      return logits[0, -1], cache  # [1, T, V] -> [V]

    self._logits = jax.jit(logits_at)
    self._decode = jax.jit(decode, donate_argnums=5)
    self._hash_fn, _ = loop.engram_hashing(self.trainer.model_cfg, self.pipeline.tokenizer)

  def _rows(self, tokens: np.ndarray, last: int | None = None) -> dict:
    """Rows of every Engram layer for raw tokens [1, T]: {layer: [1, T, H, Dh]}, or only for
    the `last` positions ([1, last, H, Dh]); hashing sees all of `tokens` as context."""
    rows = {}
    if self.tables:
      hash_ids = self._hash_fn(tokens)  # {layer: [1, T, H]}, on the host
      for layer, layout in self.trainer.layouts.items():
        row_ids = hash_ids[layer] + layout.offsets  # [1, T, H]
        if last is not None:
          row_ids = row_ids[:, -last:]  # [1, T, H] -> [1, last, H]
        rows[layer] = jnp.asarray(self.tables[layer].fetch(row_ids))  # [1, ., H, Dh]
    return rows

  def next_token_logits(self, ids: list[int]) -> np.ndarray:
    """Logits [V] of the token after `ids`."""
    t = len(ids)
    tokens = np.full((1, _bucket(t)), self.pipeline.special_ids.pad, np.int64)
    tokens[0, :t] = ids
    rows = self._rows(tokens)
    return np.asarray(
      self._logits(self.params, self.balance, jnp.asarray(tokens, jnp.int32), rows, t - 1)
    )

  def greedy_without_cache(self, prompt: str, max_new_tokens: int) -> list[int]:
    """The new token ids of greedy decoding that runs `next_token_logits` (the full forward)
    for every token: the reference of `generate` (same tokens, stops after EOS too)."""
    ids = self.pipeline.tokenizer.encode(prompt).ids
    out = list(ids)
    for _ in range(max_new_tokens):
      out.append(int(np.argmax(self.next_token_logits(out))))
      if out[-1] == self.pipeline.special_ids.eos:
        break
    return out[len(ids) :]

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
    cfg = self.trainer.model_cfg
    context = cfg.engram.max_ngram_size if cfg.engram else 1  # tokens a new hash id reads
    cache = init_decode_cache(cfg, 1, _bucket(len(ids) + max_new_tokens))
    new = np.asarray([ids], np.int64)  # [1, T]: the prompt (prefill), then one token per step
    for _ in range(max_new_tokens):
      start = len(out) - new.shape[1]
      window = np.asarray([out[max(0, start - context + 1) :]], np.int64)  # context + new
      positions = jnp.arange(start, len(out), dtype=jnp.int32)[None]  # [1, T]
      logits, cache = self._decode(
        self.params,
        self.balance,
        jnp.asarray(new, jnp.int32),
        self._rows(window, last=new.shape[1]),
        positions,
        cache,
      )
      logits = np.asarray(logits)
      if temperature <= 0:
        nxt = int(np.argmax(logits))
      else:
        p = np.exp((logits - logits.max()) / temperature)
        nxt = int(rng.choice(len(p), p=p / p.sum()))
      out.append(nxt)
      if nxt == self.pipeline.special_ids.eos:
        break
      new = np.asarray([[nxt]], np.int64)
    return self.pipeline.tokenizer.decode(out[len(ids) :])
