"""Multi-head n-gram hashing (paper §2.2 eq. 1; spec §2).

For every Engram layer, orders n = 2..Ng and Hn heads per order, the suffix n-gram of compressed
ids ending at position t is mixed with per-layer odd multipliers and XOR, then reduced modulo a
prime table size that is distinct for every (layer, order, head) of the model.

`NgramHasher` runs on the host, in the compiled kernel of `kernel.py` (exact 64-bit integer
arithmetic, threaded over chunks of the sequence): the data pipeline hashes every batch before
the forward pass, so that a memory backend can prefetch the rows (paper §2.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engram_jax.config import EngramConfig, check_engram_args
from engram_jax.hashing import kernel
from engram_jax.hashing.primes import layer_multipliers, table_sizes_for_layers


class NgramHasher:
  """Multi-head n-gram hashing for every Engram layer of a model.

  Args:
    compressed_vocab_size: V', the number of compressed ids (multipliers are bounded by it).
    table_bases: one base per n-gram order 2..Ng.
    max_ngram_size: Ng.
    heads_per_ngram: Hn.
    layer_ids: the Engram layers (0-based block indices).
    pad_id: the *compressed* id of the pad token, used before the sequence start.
    seed: multiplier seed.

  Raises:
    ValueError: arguments that break `EngramConfig`'s rules, a vocabulary < 1, or a pad id
      outside [0, V').
  """

  def __init__(
    self,
    compressed_vocab_size: int,
    table_bases: Sequence[int],
    max_ngram_size: int,
    heads_per_ngram: int,
    layer_ids: Sequence[int],
    pad_id: int,
    seed: int,
  ):
    check_engram_args(
      max_ngram_size=max_ngram_size,
      heads_per_ngram=heads_per_ngram,
      table_bases=table_bases,
      layer_ids=layer_ids,
    )
    if not isinstance(compressed_vocab_size, (int, np.integer)) or compressed_vocab_size < 1:
      raise ValueError(
        f"compressed_vocab_size: expected an int >= 1, got {compressed_vocab_size!r}"
      )
    if not 0 <= int(pad_id) < compressed_vocab_size:
      raise ValueError(
        f"pad_id: expected a compressed id in [0, {compressed_vocab_size}), got {pad_id!r}"
      )
    self.compressed_vocab_size = int(compressed_vocab_size)
    self.table_bases = tuple(int(b) for b in table_bases)
    self.max_ngram_size = int(max_ngram_size)
    self.heads_per_ngram = int(heads_per_ngram)
    self.layer_ids = tuple(int(i) for i in layer_ids)
    self.pad_id = int(pad_id)
    self.seed = int(seed)
    self._sizes = table_sizes_for_layers(self.table_bases, self.heads_per_ngram, self.layer_ids)
    self._mults = {
      layer: layer_multipliers(self.compressed_vocab_size, self.max_ngram_size, seed, layer)
      for layer in self.layer_ids
    }
    self._kernel_args = {
      layer: kernel.kernel_args(
        self._mults[layer], self._sizes[layer], self.pad_id, self.heads_per_ngram
      )
      for layer in self.layer_ids
    }

  @classmethod
  def from_config(cls, cfg: EngramConfig, compressed_vocab_size: int, pad_id: int):
    """A hasher for `cfg`; `pad_id` is the compressed id of `cfg.pad_token_id`."""
    return cls(
      compressed_vocab_size,
      cfg.table_bases,
      cfg.max_ngram_size,
      cfg.heads_per_ngram,
      cfg.layer_ids,
      pad_id,
      cfg.seed,
    )

  @property
  def num_heads(self) -> int:
    """H = (Ng - 1) * Hn."""
    return (self.max_ngram_size - 1) * self.heads_per_ngram

  def _check_layer(self, layer_id) -> int:
    if layer_id not in self._mults:
      raise ValueError(
        f"layer_id: expected one of the hasher's Engram layers {self.layer_ids}, got {layer_id!r}"
      )
    return int(layer_id)

  def multipliers(self, layer_id: int) -> np.ndarray:
    """int64 [Ng]: the odd multipliers of `layer_id`."""
    return self._mults[self._check_layer(layer_id)].copy()

  def table_sizes(self, layer_id: int) -> list[int]:
    """The H prime table sizes of `layer_id`, order-major."""
    return list(self._sizes[self._check_layer(layer_id)])

  def check_ids(self, compressed_ids) -> np.ndarray:
    """Validates compressed ids [B, T] and returns them as int64.

    Raises:
      ValueError: wrong rank or dtype, or ids outside [0, V').
    """
    x = np.asarray(compressed_ids)
    if x.ndim != 2:
      raise ValueError(f"compressed ids: expected rank 2 [B, T], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"compressed ids: expected an integer array, got dtype {x.dtype}")
    if x.size and (int(x.min()) < 0 or int(x.max()) >= self.compressed_vocab_size):
      raise ValueError(
        f"compressed ids: expected ids in [0, {self.compressed_vocab_size}) (the compressed "
        f"vocabulary; larger ids could overflow int64), got range "
        f"[{int(x.min())}, {int(x.max())}]"
      )
    return np.ascontiguousarray(x, dtype=np.int64)

  def __call__(self, compressed_ids, layer_id: int, dead=None) -> np.ndarray:
    """Hash ids of one layer: compressed ids [B, T] -> int64 [B, T, H] (exact, spec §2).

    `dead` [B, T] bools (optional; DeepSeek-V4.1's image tokens): dead positions break the
    n-grams that span them (`_hash_blocked`).
    """
    layer = self._check_layer(layer_id)
    x = self.check_ids(compressed_ids)
    if dead is not None:
      return self._hash_blocked(x, layer, self._dead(x, dead))
    out = np.empty((*x.shape, self.num_heads), dtype=np.int64)
    kernel.run_blocks(self._blocks(x, layer, out))
    return out

  def _dead(self, x: np.ndarray, dead) -> np.ndarray:
    mask = np.asarray(dead)
    if mask.shape != x.shape or mask.dtype != bool:
      raise ValueError(
        f"dead: expected bools of the ids' shape {x.shape}, got {mask.dtype}{list(mask.shape)}"
      )
    return mask  # [B, T]

  def _hash_blocked(self, x: np.ndarray, layer: int, dead: np.ndarray) -> np.ndarray:
    """The hash with dead positions (V4.1 spec §3), vectorised NumPy in exact int64.

    Walking back from position t over shifts s = 0..Ng-1, slot s is blocked if t - s < 0 or a
    position in t-s..t is dead, and every later slot with it; blocked slots take the pad id.
    """
    b, t = x.shape
    mults = self._mults[layer]  # [Ng] int64, each product below 2**63
    sizes = np.asarray(self._sizes[layer], np.int64)  # [H]
    hn = self.heads_per_ngram
    out = np.empty((b, t, self.num_heads), np.int64)
    blocked = dead.copy()  # slot 0: the position itself
    mix = np.where(blocked, self.pad_id, x) * mults[0]  # [B, T]
    for k in range(1, self.max_ngram_size):
      prev = np.full((b, t), self.pad_id, np.int64)
      prev[:, k:] = x[:, :-k]  # x[t - k]; t - k < 0 reads the pad id
      dead_k = np.ones((b, t), bool)
      dead_k[:, k:] = dead[:, :-k]
      blocked = blocked | dead_k
      mix = mix ^ (np.where(blocked, self.pad_id, prev) * mults[k])
      heads = sizes[(k - 1) * hn : k * hn]  # [Hn]
      out[..., (k - 1) * hn : k * hn] = mix[..., None] % heads  # [B, T, 1] % [Hn]
    return out

  def hash_all(self, compressed_ids, dead=None) -> dict[int, np.ndarray]:
    """Hash ids of every Engram layer: {layer_id: int64 [B, T, H]} (`dead` as in `__call__`)."""
    if dead is not None:
      return {layer: self(compressed_ids, layer, dead) for layer in self.layer_ids}
    x = self.check_ids(compressed_ids)
    outs = {layer: np.empty((*x.shape, self.num_heads), np.int64) for layer in self.layer_ids}
    blocks = [fn for layer in self.layer_ids for fn in self._blocks(x, layer, outs[layer])]
    kernel.run_blocks(blocks)
    return outs

  def _blocks(self, x: np.ndarray, layer: int, out: np.ndarray) -> list:
    """One layer's kernel calls: x [B, T] -> out [B, T, H]."""
    return kernel.split_blocks(x, self._kernel_args[layer], self.max_ngram_size - 1, out)
