"""Interop with DeepSeek's official PyTorch Engram demo (`engram_demo_v1.py`).

`ReferenceEngram.from_demo` takes the demo's configuration, its tokenizer file and the state dict
of one demo Engram module (as NumPy arrays) and runs this project's real path on them:
compress -> hash -> table fetch -> Engram layer. `convert_demo_state_dict` is the weight mapping
on its own, for loading demo weights into a model.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.hashing import EngramHashing, NgramHasher
from engram_jax.layers.engram import Engram, check_engram_inputs
from engram_jax.memory import device
from engram_jax.memory.table import TableLayout
from engram_jax.tokenization import TokenizerCompressor

_DEMO_CONFIG_KEYS = (
  "engram_vocab_size",
  "max_ngram_size",
  "n_embed_per_ngram",
  "n_head_per_ngram",
  "layer_ids",
  "pad_id",
  "seed",
  "kernel_size",
  "hidden_size",
  "hc_mult",
  "module_layer",
)


def _get(state_dict: Mapping[str, Any], key: str) -> np.ndarray:
  if key not in state_dict:
    raise ValueError(f"state_dict: expected key {key!r} of the demo's Engram module, missing")
  return np.asarray(state_dict[key], dtype=np.float32)


def convert_demo_state_dict(
  state_dict: Mapping[str, Any], hc_mult: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Maps a demo Engram module's PyTorch state dict to this project's parameters.

  Args:
    state_dict: name -> array (PyTorch names, `Linear` weights [out, in], the conv weight
      [C, 1, W]); keys the layer does not use are ignored.
    hc_mult: M, the number of residual branches.

  Returns:
    (params of `layers.engram.Engram`, the flat table [R, Dh]).
  """
  m = hc_mult
  keys = [_get(state_dict, f"key_projs.{i}.weight") for i in range(m)]
  value = _get(state_dict, "value_proj.weight")
  # M x [D, Dm] + [D, Dm] -> [Dm, M+1, D]
  kv_kernel = np.stack([w.T for w in [*keys, value]], axis=1)
  kv_bias = np.stack(
    [_get(state_dict, f"key_projs.{i}.bias") for i in range(m)]
    + [_get(state_dict, "value_proj.bias")]
  )
  conv = _get(state_dict, "short_conv.conv.weight")  # [C, 1, W]
  params = {
    "kv_kernel": kv_kernel,
    "kv_bias": kv_bias,
    "key_norm": np.stack([_get(state_dict, f"norm1.{i}.weight") for i in range(m)]),
    "query_norm": np.stack([_get(state_dict, f"norm2.{i}.weight") for i in range(m)]),
    "conv_norm": np.stack([_get(state_dict, f"short_conv.norms.{i}.weight") for i in range(m)]),
    "conv_kernel": conv[:, 0, :].T.copy(),  # [C, W] -> [W, C]
  }
  return params, _get(state_dict, "multi_head_embedding.embedding.weight")


def demo_engram_config(config: Mapping[str, Any]) -> EngramConfig:
  """The `EngramConfig` of the demo's configuration (its `engram_vocab_size` are the bases).

  Raises:
    ValueError: a missing key, or values that break `EngramConfig`'s rules.
  """
  missing = [k for k in _DEMO_CONFIG_KEYS if k not in config]
  if missing:
    raise ValueError(f"config: expected the demo's keys {_DEMO_CONFIG_KEYS}, missing {missing}")
  return EngramConfig(
    max_ngram_size=int(config["max_ngram_size"]),
    heads_per_ngram=int(config["n_head_per_ngram"]),
    embed_per_ngram=int(config["n_embed_per_ngram"]),
    table_bases=tuple(int(v) for v in config["engram_vocab_size"]),
    layer_ids=tuple(int(i) for i in config["layer_ids"]),
    kernel_size=int(config["kernel_size"]),
    pad_token_id=int(config["pad_id"]),
    seed=int(config["seed"]),
  )


def load_demo_vectors(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], dict]:
  """Reads an `engram_demo_vectors.npz`: (config, state dict without 'sd/', other arrays)."""
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  config = ast.literal_eval(str(arrays.pop("config")))
  state_dict = {k[3:]: arrays.pop(k) for k in list(arrays) if k.startswith("sd/")}
  return config, state_dict, arrays


@dataclasses.dataclass
class ReferenceEngram:
  """One demo Engram module reproduced with this project's components.

  Attributes:
    compressor: the tokenizer compression of the demo's tokenizer.
    hasher: the n-gram hasher of every demo Engram layer.
    layer_id: the layer whose weights were loaded.
    layout: that layer's table layout.
    table: [R, Dh] the layer's table.
    params: the `Engram` layer's parameters.
    hidden_size: D.
    hc_mult: M.
  """

  compressor: TokenizerCompressor
  hasher: NgramHasher
  layer_id: int
  layout: TableLayout
  table: jax.Array
  params: dict
  hidden_size: int
  hc_mult: int
  module: Engram

  @classmethod
  def from_demo(
    cls,
    config: Mapping[str, Any],
    tokenizer_file: str | os.PathLike,
    state_dict: Mapping[str, Any],
  ) -> ReferenceEngram:
    """Builds the module from the demo's config, tokenizer and state dict.

    Raises:
      ValueError: a missing or invalid config key (a module_layer outside layer_ids too), a
        missing state-dict entry, or a table whose shape or offsets disagree with the hasher's
        prime sizes.
      FileNotFoundError: the tokenizer file does not exist.
    """
    wiring = EngramHashing.from_file(demo_engram_config(config), tokenizer_file)
    layer = int(config["module_layer"])
    if layer not in wiring.layouts:
      raise ValueError(
        f"config: expected module_layer to be one of layer_ids {list(wiring.layouts)}, got {layer}"
      )
    layout = wiring.layouts[layer]
    m = int(config["hc_mult"])
    params, table = convert_demo_state_dict(state_dict, m)
    if table.shape != (layout.num_rows, layout.dim):
      raise ValueError(
        f"state_dict: expected a table of shape ({layout.num_rows}, {layout.dim}) for layer "
        f"{layer}, got {table.shape}"
      )
    demo_offsets = state_dict.get("multi_head_embedding.offsets")
    if demo_offsets is not None and not np.array_equal(demo_offsets, layout.offsets):
      raise ValueError(
        f"state_dict: the demo's head offsets {np.asarray(demo_offsets)} differ from the "
        f"hasher's {layout.offsets}"
      )
    module = Engram(
      max_ngram_size=int(config["max_ngram_size"]), kernel_size=int(config["kernel_size"])
    )
    return cls(
      wiring.compressor,
      wiring.hasher,
      layer,
      layout,
      jnp.asarray(table),
      jax.tree.map(jnp.asarray, params),
      int(config["hidden_size"]),
      m,
      module,
    )

  def hash_ids(self, input_ids) -> np.ndarray:
    """Raw token ids [B, T] -> this layer's hash ids [B, T, H] (int64)."""
    return self.hasher(self.compressor(input_ids), self.layer_id)

  def __call__(self, hidden, input_ids) -> np.ndarray:
    """Runs the module: hidden [B, T, M, D] and raw ids [B, T] -> [B, T, M, D] float32.

    Raises:
      ValueError: shapes that disagree with each other or with the demo's M and D.
    """
    hidden = np.asarray(hidden, dtype=np.float32)
    input_ids = np.asarray(input_ids)
    expected = ("B", "T", self.hc_mult, self.hidden_size)
    if hidden.ndim != 4 or hidden.shape[2:] != (self.hc_mult, self.hidden_size):
      raise ValueError(f"hidden: expected shape {expected}, got {hidden.shape}")
    if input_ids.shape != hidden.shape[:2]:
      raise ValueError(
        f"input_ids: expected shape [B, T] = {hidden.shape[:2]} matching hidden, "
        f"got {input_ids.shape}"
      )
    ids = jnp.asarray(self.hash_ids(input_ids), dtype=jnp.int32)
    rows = device.fetch(self.layout, self.table, ids)
    check_engram_inputs(hidden.shape, rows.shape)
    out = self.module.apply({"params": self.params}, jnp.asarray(hidden), rows)
    return np.asarray(out)
