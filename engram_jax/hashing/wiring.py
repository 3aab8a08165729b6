"""The Engram wiring of a model: tokenizer compression -> n-gram hasher -> table layouts.

`EngramHashing` is the one place this chain is built: the training loop (whose data pipeline
calls `hash_ids`), the benchmarks, the quickstart and the demo interop all take it from here.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tokenizers

from engram_jax.config import EngramConfig
from engram_jax.hashing.hasher import NgramHasher
from engram_jax.memory.table import TableLayout
from engram_jax.tokenization import TokenizerCompressor, load_tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class EngramHashing:
  """Compression, hashing and table layouts of every Engram layer of a model.

  Attributes:
    compressor: raw token id -> compressed id.
    hasher: the n-gram hasher of every Engram layer; its pad id is the compressed id of the
      config's `pad_token_id`.
    layouts: {layer_id: TableLayout}, each layer's prime head sizes, head width Dh and initial
      standard deviation.
  """

  compressor: TokenizerCompressor
  hasher: NgramHasher
  layouts: dict[int, TableLayout]

  @classmethod
  def from_tokenizer(
    cls, cfg: EngramConfig, tokenizer: tokenizers.Tokenizer, init_std: float = 1.0
  ) -> EngramHashing:
    """The wiring of `cfg` with a loaded tokenizer.

    Args:
      cfg: the Engram settings.
      tokenizer: the model's tokenizer.
      init_std: standard deviation of the tables' initial rows (1.0: the reference's
        `nn.Embedding`; a model uses its `engram_init_std`).

    Raises:
      ValueError: `cfg.pad_token_id` outside the tokenizer's vocabulary.
    """
    if cfg.compress_tokens:
      compressor = TokenizerCompressor.from_tokenizer(tokenizer)
    else:  # the ablation without tokenizer compression: raw ids go to the hasher
      compressor = TokenizerCompressor.identity(tokenizer.get_vocab_size(with_added_tokens=True))
    pad = int(compressor(np.asarray([cfg.pad_token_id]))[0])
    hasher = NgramHasher.from_config(cfg, compressor.num_compressed, pad)
    layouts = {
      layer: TableLayout.from_sizes(hasher.table_sizes(layer), cfg.head_dim, init_std)
      for layer in cfg.layer_ids
    }
    return cls(compressor, hasher, layouts)

  @classmethod
  def from_file(
    cls, cfg: EngramConfig, tokenizer_path: str | os.PathLike, init_std: float = 1.0
  ) -> EngramHashing:
    """`from_tokenizer` with the tokenizer read from a `tokenizer.json`.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not a tokenizer.json, or as `from_tokenizer`.
    """
    return cls.from_tokenizer(cfg, load_tokenizer(tokenizer_path), init_std)

  def hash_ids(self, tokens) -> dict[int, np.ndarray]:
    """Raw token ids [B, T] -> {layer_id: int64 [B, T, H]}: compress, then hash every layer.

    Safe to call from several threads at once (the data pipeline's readers do).

    Raises:
      ValueError: ids that are not integers, not rank 2, negative or outside the vocabulary.
    """
    return self.hasher.hash_all(self.compressor(tokens))  # [B, T] -> {layer: [B, T, H]}
