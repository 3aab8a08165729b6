"""DeepSeek-V4.1's Engram layers from the released checkpoint (spec: V41_ENGRAM_SPEC.md).

`V41Engram.from_checkpoint(config, checkpoint, tokenizer)` reads a V4.1 `config.json` (the flat
`inference/` keys or the Hugging Face form under `text_config`), the safetensors shards and the
model's `tokenizer.json`, and runs the released Engram layers:

    engram = V41Engram.from_checkpoint("config.json", "ckpt_dir/", "tokenizer.json")
    ids = engram.hash_ids(input_ids)               # {layer: [B, T, H] per-head ids}
    out = engram(hidden, input_ids, layer=1)       # [B, T, hc, D] -> [B, T, hc, D] (bf16)

The tables (float8_e4m3fn rows with an E8M0 exponent per 32 columns, 188.8 GiB at full size)
are never read whole: each layer's two tensors are memory-mapped from their shard file
(`interop.safetensors`) and served as the read-only disk tier of a 'tiered' table, under a
device cache of the hot rows. The key /
value projection stays in its FP8 block format (`layers.fp8`).

Dead positions: the reference vectors made by DeepSeek's V4.1 code mark image tokens with
token types >= 0 and text with -1; those image positions are dead (they break the n-grams that
span them and their gate is 0). `DEAD_IF` holds that rule. (The spec's prose states the opposite
sign; the vectors, which are the code's own output, decide here.)

Shapes: B batch, T tokens, hc residual streams, D model width, H = (N - 1) * heads heads per
layer, Dh row width (`engram_head_dim`), R rows of a layer's table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import memory
from engram_jax.hashing import NgramHasher
from engram_jax.interop.safetensors import Checkpoint
from engram_jax.layers.engram_v41 import V41EngramParams, v41_engram, v41_gates
from engram_jax.memory import storage
from engram_jax.memory.table import TableLayout
from engram_jax.tokenization import TokenizerCompressor, load_tokenizer

DEAD_IF: Callable[[np.ndarray], np.ndarray] = lambda token_types: np.asarray(token_types) >= 0
MX_BLOCK = 32
# (config key, accepted aliases); HF's config nests them under `text_config`.
_KEYS = {
  "dim": ("dim", "hidden_size"),
  "hc_mult": ("hc_mult",),
  "norm_eps": ("norm_eps", "rms_norm_eps"),
  "layer_ids": ("engram_layer_ids",),
  "vocab_base": ("engram_vocab_size",),
  "num_embeddings": ("engram_num_embeddings",),
  "max_ngram_size": ("engram_max_ngram_size",),
  "pad_id": ("engram_pad_id", "engram_pad_token_id"),
  "compressed_vocab_size": ("engram_compressed_vocab_size",),
  "heads_per_ngram": ("engram_n_heads",),
  "head_dim": ("engram_head_dim",),
}


@dataclasses.dataclass(frozen=True)
class V41Config:
  """The Engram settings of a V4.1 config.json (spec V4.1 §1).

  Attributes:
    dim: D, the model width.
    hc_mult: hc, residual streams.
    norm_eps: the gate norms' eps.
    layer_ids: the Engram blocks (0-based).
    vocab_base: the one base every order's prime search starts from.
    num_embeddings: rows of each layer's table (the sum of its primes).
    max_ngram_size: N.
    pad_id: the raw pad token id.
    compressed_vocab_size: V', checked against the tokenizer's compression.
    heads_per_ngram: heads per order.
    head_dim: Dh.
  """

  dim: int
  hc_mult: int
  norm_eps: float
  layer_ids: tuple[int, ...]
  vocab_base: int
  num_embeddings: tuple[int, ...]
  max_ngram_size: int
  pad_id: int
  compressed_vocab_size: int
  heads_per_ngram: int
  head_dim: int

  def __post_init__(self):
    if len(self.num_embeddings) != len(self.layer_ids):
      raise ValueError(
        f"engram_num_embeddings: expected one row count per Engram layer {self.layer_ids}, "
        f"got {list(self.num_embeddings)}"
      )
    if self.head_dim % MX_BLOCK:
      raise ValueError(f"engram_head_dim: expected a multiple of {MX_BLOCK}, got {self.head_dim}")

  @property
  def num_heads(self) -> int:
    """H = (N - 1) * heads per order."""
    return (self.max_ngram_size - 1) * self.heads_per_ngram

  @classmethod
  def from_dict(cls, raw: Mapping, source: str = "config") -> V41Config:
    """From a config dict (flat, or with the keys under `text_config`)."""
    cfg = raw.get("text_config", raw) if isinstance(raw, Mapping) else None
    if not isinstance(cfg, Mapping):
      raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    missing = [names[0] for names in _KEYS.values() if not any(n in cfg for n in names)]
    if missing:
      raise ValueError(
        f"{source}: missing keys {missing} (expected a DeepSeek-V4.1 config with Engram)"
      )
    values = {f: next(cfg[n] for n in names if n in cfg) for f, names in _KEYS.items()}
    for field in ("layer_ids", "num_embeddings"):
      values[field] = tuple(int(v) for v in values[field])
    return cls(**values)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> V41Config:
    path = pathlib.Path(path)
    try:
      raw = json.loads(path.read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"config: no file {path}") from None
    except json.JSONDecodeError as err:
      raise ValueError(f"config {path}: not JSON ({err})") from None
    return cls.from_dict(raw, str(path))


def v41_flash_engram() -> V41Config:
  """The released DeepSeek-V4.1-Flash Engram settings (spec V4.1 §1): two layers of 384 M rows
  of 256 MXFP8 values (264 bytes a row, 101.4 GB a layer)."""
  return V41Config(
    dim=5120,
    hc_mult=4,
    norm_eps=1e-20,
    layer_ids=(1, 14),
    vocab_base=16_000_000,
    num_embeddings=(384_006_168, 384_016_682),
    max_ngram_size=4,
    pad_id=2,
    compressed_vocab_size=99_092,
    heads_per_ngram=8,
    head_dim=256,
  )


def table_shapes(cfg: V41Config) -> dict[int, dict[str, jax.ShapeDtypeStruct]]:
  """{layer: {"values", "scale"}} the shapes and dtypes of each stored table (for
  `jax.eval_shape` and memory planning; nothing is allocated)."""
  return {
    layer: {
      "values": jax.ShapeDtypeStruct((rows, cfg.head_dim), jnp.float8_e4m3fn),
      "scale": jax.ShapeDtypeStruct((rows, cfg.head_dim // MX_BLOCK), jnp.uint8),
    }
    for layer, rows in zip(cfg.layer_ids, cfg.num_embeddings, strict=True)
  }


class MappedRows:
  """A layer's rows read straight from the mapped checkpoint on every fetch (no device cache):
  only the fetched rows' pages are read, then decoded on the host."""

  def __init__(self, parts: dict):
    self.parts = parts

  def fetch(self, ids) -> jax.Array:
    """Flat row ids [...] -> [..., Dh] bfloat16 rows."""
    flat = np.asarray(ids)
    got = {k: np.asarray(v[flat]) for k, v in self.parts.items()}  # reads those rows only
    return jnp.asarray(storage.decode(got, "mxfp8", np.float32), jnp.bfloat16)


def _tensor(layer: int, name: str) -> str:
  return f"layers.{layer}.engram.{name}"


class V41Engram:
  """The released Engram layers of a V4.1 checkpoint (built by `from_checkpoint`).

  Attributes:
    config: the Engram settings.
    tokenizer: the model's tokenizer (`tokenizers.Tokenizer`).
    compressor: raw token id -> compressed id (rebuilt from the tokenizer).
    hasher: the n-gram hasher of every Engram layer.
    layouts: {layer: TableLayout} each layer's head sizes and offsets.
    tables: {layer: memory table} each layer's rows, served from the mapped checkpoint.
    params: {layer: V41EngramParams} the gate and projection weights (in device memory).
  """

  def __init__(self, config, tokenizer, compressor, hasher, layouts, tables, params):
    self.config = config
    self.tokenizer = tokenizer
    self.compressor = compressor
    self.hasher = hasher
    self.layouts = layouts
    self.tables = tables
    self.params = params

  @classmethod
  def from_checkpoint(
    cls,
    config: str | os.PathLike | Mapping,
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    cache_fraction: float = 0.01,
  ) -> V41Engram:
    """Imports the Engram layers of a V4.1 checkpoint.

    Args:
      config: a config.json path or its dict.
      checkpoint: a safetensors file, a list of them, or a directory of shards (with
        `model.safetensors.index.json`).
      tokenizer: the model's tokenizer.json.
      cache_fraction: the share of each table's rows the device cache holds (the 'tiered'
        backend over the mapped file; its hot rows are found online, policy 'lfu'); 0 reads
        every fetched row from the mapped file (`MappedRows`).

    Raises:
      ValueError: a config without Engram keys, a tokenizer whose compressed vocabulary
        disagrees with the config, a missing tensor or one of the wrong dtype or shape.
    """
    cfg = (
      config
      if isinstance(config, V41Config)
      else (
        V41Config.from_dict(config) if isinstance(config, Mapping) else V41Config.from_file(config)
      )
    )
    tok = load_tokenizer(tokenizer)
    compressor = TokenizerCompressor.from_tokenizer(tok)
    if compressor.num_compressed != cfg.compressed_vocab_size:
      raise ValueError(
        f"tokenizer {tokenizer}: its compression gives {compressor.num_compressed} ids, the "
        f"config says engram_compressed_vocab_size={cfg.compressed_vocab_size}"
      )
    pad = int(compressor(np.asarray([cfg.pad_id]))[0])
    bases = [cfg.vocab_base] * (cfg.max_ngram_size - 1)
    hasher = NgramHasher(
      compressor.num_compressed,
      bases,
      cfg.max_ngram_size,
      cfg.heads_per_ngram,
      cfg.layer_ids,
      pad,
      seed=0,
    )
    ckpt = Checkpoint.open(checkpoint)
    layouts, tables, params = {}, {}, {}
    hc, d, h, dh = cfg.hc_mult, cfg.dim, cfg.num_heads, cfg.head_dim
    for layer, rows in zip(cfg.layer_ids, cfg.num_embeddings, strict=True):
      layouts[layer] = TableLayout.from_sizes(hasher.table_sizes(layer), dh, 0.0)
      if layouts[layer].num_rows != rows:
        raise ValueError(
          f"engram_num_embeddings: layer {layer} hashes into {layouts[layer].num_rows} rows, "
          f"the config says {rows}"
        )
      parts = {
        "values": ckpt.require(_tensor(layer, "embed.weight"), "F8_E4M3", (rows, dh)),
        "scale": ckpt.require(_tensor(layer, "embed.scale"), "F8_E8M0", (rows, dh // MX_BLOCK)),
      }
      out = (hc + 1) * d
      params[layer] = V41EngramParams(
        jnp.asarray(ckpt.require(_tensor(layer, "q_weight"), "BF16", (hc, d))),
        jnp.asarray(ckpt.require(_tensor(layer, "k_weight"), "BF16", (hc, d))),
        jnp.asarray(ckpt.require(_tensor(layer, "wkv.weight"), "F8_E4M3", (out, h * dh))),
        jnp.asarray(
          ckpt.require(
            _tensor(layer, "wkv.scale"), "F8_E8M0", (-(-out // MX_BLOCK), h * dh // MX_BLOCK)
          )
        ),
      )
      if cache_fraction == 0:
        storage.check_parts(parts, "mxfp8", rows, dh, _tensor(layer, "embed"))
        tables[layer] = MappedRows(parts)
      else:
        tables[layer] = memory.create(
          "tiered",
          num_rows=rows,
          dim=dh,
          dtype=jnp.bfloat16,
          disk=(parts, "mxfp8"),
          cache_fraction=cache_fraction,
        )
    return cls(cfg, tok, compressor, hasher, layouts, tables, params)

  def _dead(self, input_ids, token_types) -> np.ndarray:
    shape = np.shape(input_ids)
    if token_types is None:
      return np.zeros(shape, bool)
    if np.shape(token_types) != shape:
      raise ValueError(
        f"token_types: expected the shape of input_ids {shape}, got {np.shape(token_types)}"
      )
    return DEAD_IF(token_types)

  def hash_ids(self, input_ids, token_types=None) -> dict[int, np.ndarray]:
    """Raw token ids [B, T] (and token types) -> {layer: int64 [B, T, H] per-head ids}.

    Hashing reads only the last N - 1 positions: to hash new tokens incrementally, pass the
    previous N - 1 tokens (and types) in front of them and keep the last positions' ids.
    """
    dead = self._dead(input_ids, token_types)
    return self.hasher.hash_all(self.compressor(input_ids), dead)

  def rows(self, layer: int, per_head_ids: np.ndarray) -> np.ndarray:
    """[B, T, H] per-head ids -> [B, T, H, Dh] decoded rows (bfloat16) from the layer's table."""
    flat = self.layouts[layer].row_ids(per_head_ids)  # offsets added
    return self.tables[layer].fetch(flat)

  def _inputs(self, hidden, input_ids, layer, token_types):
    if layer not in self.params:
      raise ValueError(
        f"layer: expected one of the Engram layers {self.config.layer_ids}, got {layer!r}"
      )
    b, t = np.shape(input_ids)
    want = (b, t, self.config.hc_mult, self.config.dim)
    if tuple(np.shape(hidden)) != want:
      raise ValueError(
        f"hidden: expected shape {want} [B, T, hc, D], got {tuple(np.shape(hidden))}"
      )
    dead = self._dead(input_ids, token_types)
    ids = self.hasher(self.compressor(input_ids), layer, dead)
    return self.rows(layer, ids), dead

  def __call__(self, hidden, input_ids, layer: int, token_types=None):
    """One Engram layer: hidden [B, T, hc, D] and raw token ids [B, T] -> [B, T, hc, D] bf16."""
    rows, dead = self._inputs(hidden, input_ids, layer, token_types)
    return v41_engram(
      self.params[layer],
      jnp.asarray(hidden, jnp.bfloat16),
      rows,
      jnp.asarray(dead),
      eps=float(self.config.norm_eps),
    )

  def gates(self, hidden, input_ids, layer: int, token_types=None):
    """[B, T, hc] each stream's gate at `layer` (what `__call__` scales the value by)."""
    rows, dead = self._inputs(hidden, input_ids, layer, token_types)
    return v41_gates(
      self.params[layer],
      jnp.asarray(hidden, jnp.bfloat16),
      rows,
      jnp.asarray(dead),
      eps=float(self.config.norm_eps),
    )
