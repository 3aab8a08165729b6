"""Text generation from a trained run, reading the Engram rows from any memory backend.

The serving loop of paper §2.5: the hash ids of the next forward pass depend only on the tokens,
so they are computed on the host and the rows fetched from wherever the table lives (`device`,
`host`, `tiered`, ... through `engram_jax.memory.create`) before the jitted forward runs.

A `Generator` is built from the pieces of `engram_jax.run.load_run` (model config, params,
balancing biases, tables, tokenizer, Engram hashing) and a `tokens_to_logits` closure over the
model; nothing here imports the training code. A 'tiered' cache is calibrated from the prompt
stream: the row ids of the first prompt (or of any texts given to `calibrate`).

`generate` decodes incrementally: one prefill of the prompt, then one token per step with the
attention keys/values and the Engram convolution state in a `DecodeCache`; a new token's hash
ids need only the last N tokens. `next_token_logits` runs the full forward over a sequence
(scoring, and the reference the cached path is tested against).
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from engram_jax import memory, presets
from engram_jax.config import ModelConfig
from engram_jax.data import default_tokenizer_path
from engram_jax.data.tokenizer_train import SpecialTokenIds, special_token_ids
from engram_jax.hashing import EngramHashing
from engram_jax.model import EngramLM, init_decode_cache
from engram_jax.run import LoadedRun, load_run
from engram_jax.tokenization import load_tokenizer

# Sequences (and decoding caches) are padded to a multiple of this, so the forward compiles
# once per bucket.
_BUCKET = 64


def _bucket(n: int) -> int:
  return -(-n // _BUCKET) * _BUCKET


@dataclasses.dataclass
class Generator:
  """A trained model, its tokenizer and hashing, and one memory table per Engram layer.

  Attributes:
    model_cfg: the model.
    params: backbone parameters.
    balance: MoE balancing biases.
    tables: {layer: table object of `engram_jax.memory`}.
    tokenizer: the run's tokenizer.
    special_ids: its pad / bos / eos ids.
    hashing: the Engram wiring (compressor, hasher, layouts), or None without Engram.
  """

  model_cfg: ModelConfig
  params: dict
  balance: dict
  tables: dict
  tokenizer: tokenizers.Tokenizer
  special_ids: SpecialTokenIds
  hashing: EngramHashing | None

  @classmethod
  def from_checkpoint(
    cls,
    workdir: str | os.PathLike,
    preset: str | None = None,
    memory_kind: str = "device",
    tokenizer_file: str | None = None,
    **memory_options,
  ) -> Generator:
    """Loads a run (`engram_jax.run.load_run`: its model and tokenizer from run.json, which
    `preset` and `tokenizer_file` override) and puts its tables into `memory_kind` tables.

    Raises:
      FileNotFoundError, ValueError, CheckpointMismatch, NoGoodCheckpoint: see `load_run`.
    """
    run = load_run(workdir, preset=preset, tokenizer_file=tokenizer_file)
    return cls.from_run(run, memory_kind, **memory_options)

  @classmethod
  def from_run(cls, run: LoadedRun, memory_kind: str = "device", **memory_options) -> Generator:
    """A generator over a loaded run, its tables in `memory_kind` tables."""
    tables = {
      layer: memory.create(
        memory_kind, num_rows=rows.shape[0], dim=rows.shape[1], rows=rows, **memory_options
      )
      for layer, rows in run.tables.items()
    }
    return cls(
      run.model_cfg, run.params, run.balance, tables, run.tokenizer, run.special_ids, run.hashing
    )

  @classmethod
  def untrained(
    cls,
    preset: str,
    memory_kind: str = "device",
    tokenizer_file: str | None = None,
    seed: int = 0,
    **memory_options,
  ) -> Generator:
    """A freshly initialised model of `preset` (for measuring speed, or a baseline)."""
    tokenizer = load_tokenizer(tokenizer_file or default_tokenizer_path())
    model_cfg = dataclasses.replace(
      presets.get(preset).model, vocab_size=tokenizer.get_vocab_size()
    )
    hashing = None
    if model_cfg.engram is not None:
      hashing = EngramHashing.from_tokenizer(
        model_cfg.engram, tokenizer, init_std=model_cfg.engram_init_std
      )
    layouts = hashing.layouts if hashing is not None else {}
    k_model, k_tables = jax.random.split(jax.random.key(seed))
    rows = {layer: jnp.zeros((1, 1, lay.num_heads, lay.dim)) for layer, lay in layouts.items()}
    init = jax.jit(
      lambda k: nn.unbox(EngramLM(model_cfg).init(k, jnp.zeros((1, 1), jnp.int32), rows))
    )
    variables = init(k_model)
    tables = {
      layer: np.asarray(lay.init(jax.random.fold_in(k_tables, i)))
      for i, (layer, lay) in enumerate(sorted(layouts.items()))
    }
    run = LoadedRun(
      workdir=None,
      experiment=dataclasses.replace(presets.get(preset), model=model_cfg),
      tokenizer=tokenizer,
      special_ids=special_token_ids(tokenizer),
      hashing=hashing,
      step=0,
      params=variables["params"],
      balance=variables.get("balance", {}),
      tables=tables,
    )
    return cls.from_run(run, memory_kind, **memory_options)

  def __post_init__(self):
    model = EngramLM(self.model_cfg)

    def tokens_to_logits(params, balance, tokens, rows, positions=None, cache=None):
      """Logits [1, T, V] of raw tokens [1, T] and their Engram rows {layer: [1, T, H, Dh]};
      with a decoding cache, also the cache updated by these tokens."""
      variables = {"params": params, "balance": balance}
      if cache is None:
        return model.apply(variables, tokens, rows)[0], None
      logits, _, cache = model.apply(variables, tokens, rows, positions=positions, cache=cache)
      return logits, cache

    def logits_at(params, balance, tokens, rows, pos):
      return tokens_to_logits(params, balance, tokens, rows)[0][0, pos]  # [1, T, V] -> [V]

    def decode(params, balance, tokens, rows, positions, cache):
      logits, cache = tokens_to_logits(params, balance, tokens, rows, positions, cache)
      return logits[0, -1], cache  # [1, T, V] -> [V]

    self._logits = jax.jit(logits_at)
    self._decode = jax.jit(decode, donate_argnums=5)
    self._calibrated = False

  def calibrate(self, texts) -> None:
    """Fills each table's device cache (a 'tiered' table; others ignore it) with the rows the
    given texts read most: the prompt stream of a serving process."""
    if not self.tables:
      return
    ids = [np.asarray([self.tokenizer.encode(t).ids], np.int64) for t in texts]
    for layer, table in self.tables.items():
      layout = self.hashing.layouts[layer]
      table.calibrate(
        [np.asarray(layout.row_ids(self.hashing.hash_ids(x)[layer])) for x in ids if x.size]
      )
    self._calibrated = True

  def _rows(self, tokens: np.ndarray, last: int | None = None) -> dict:
    """Rows of every Engram layer for raw tokens [1, T]: {layer: [1, T, H, Dh]}, or only for
    the `last` positions ([1, last, H, Dh]); hashing sees all of `tokens` as context."""
    rows = {}
    if self.tables:
      hash_ids = self.hashing.hash_ids(tokens)  # {layer: [1, T, H]}, on the host
      for layer, layout in self.hashing.layouts.items():
        row_ids = np.asarray(layout.row_ids(hash_ids[layer]))  # [1, T, H] flat row ids
        if last is not None:
          row_ids = row_ids[:, -last:]  # [1, T, H] -> [1, last, H]
        rows[layer] = jnp.asarray(self.tables[layer].fetch(row_ids))  # [1, ., H, Dh]
    return rows

  def next_token_logits(self, ids: list[int]) -> np.ndarray:
    """Logits [V] of the token after `ids`."""
    t = len(ids)
    tokens = np.full((1, _bucket(t)), self.special_ids.pad, np.int64)
    tokens[0, :t] = ids
    rows = self._rows(tokens)
    return np.asarray(
      self._logits(self.params, self.balance, jnp.asarray(tokens, jnp.int32), rows, t - 1)
    )

  def greedy_without_cache(self, prompt: str, max_new_tokens: int) -> list[int]:
    """The new token ids of greedy decoding that runs `next_token_logits` (the full forward)
    for every token: the reference of `generate` (same tokens, stops after EOS too)."""
    ids = self.tokenizer.encode(prompt).ids
    out = list(ids)
    for _ in range(max_new_tokens):
      out.append(int(np.argmax(self.next_token_logits(out))))
      if out[-1] == self.special_ids.eos:
        break
    return out[len(ids) :]

  def generate(
    self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0
  ) -> str:
    """Continues `prompt`: greedy for temperature 0, else sampled.

    Raises:
      ValueError: an empty prompt, or max_new_tokens < 0.
    """
    ids = self.tokenizer.encode(prompt).ids
    if not ids:
      raise ValueError(f"prompt: expected at least one token, got {prompt!r}")
    if max_new_tokens < 0:
      raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if not self._calibrated:
      self.calibrate([prompt])
    rng = np.random.default_rng(seed)
    out = list(ids)
    cfg = self.model_cfg
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
      if nxt == self.special_ids.eos:
        break
      new = np.asarray([[nxt]], np.int64)
    return self.tokenizer.decode(out[len(ids) :])
