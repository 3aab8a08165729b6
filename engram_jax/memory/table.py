"""The layout of one Engram layer's memory: a flat multi-head table with per-head offsets.

Head j of a layer has `sizes[j]` rows (a prime); all heads live in one flat table of
`sum(sizes)` rows and head j reads row `ids[..., j] + offsets[j]` (spec §3). The layout is
independent of where the rows live: every backend of `engram_jax.memory` uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.memory import validation


@dataclasses.dataclass(frozen=True)
class TableLayout:
  """Sizes and offsets of one layer's heads.

  Attributes:
    sizes: rows per head (H values).
    dim: Dh, width of one row.
    init_std: standard deviation of the normal initialisation (the reference uses an
      `nn.Embedding`, i.e. 1.0).
  """

  sizes: tuple[int, ...]
  dim: int
  init_std: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
    if not self.sizes or min(self.sizes) < 1:
      raise ValueError(f"sizes: expected at least one positive head size, got {self.sizes}")
    if not isinstance(self.dim, int) or self.dim < 1:
      raise ValueError(f"dim: expected an int >= 1, got {self.dim!r}")
    if self.num_rows >= 2**31:
      raise ValueError(
        f"sizes: expected fewer than 2**31 rows in one layer's table (int32 row ids), "
        f"got {self.num_rows}"
      )

  @classmethod
  def from_sizes(cls, sizes: Sequence[int], dim: int, init_std: float = 1.0) -> TableLayout:
    return cls(tuple(sizes), dim, init_std)

  @property
  def num_heads(self) -> int:
    return len(self.sizes)

  @property
  def num_rows(self) -> int:
    return int(sum(self.sizes))

  @property
  def offsets(self) -> np.ndarray:
    """int32 [H]: exclusive cumulative sum of the sizes."""
    return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int32)

  @property
  def num_params(self) -> int:
    return self.num_rows * self.dim

  def init(self, key: jax.Array, dtype=jnp.float32) -> jax.Array:
    """A freshly initialised table [R, Dh] (use under `jax.eval_shape` for paper sizes)."""
    return (self.init_std * jax.random.normal(key, (self.num_rows, self.dim))).astype(dtype)

  def check_ids(self, ids) -> None:
    """Raises ValueError unless the last axis of `ids` has one entry per head."""
    if ids.ndim < 1 or ids.shape[-1] != self.num_heads:
      raise ValueError(
        f"hash ids: expected shape [..., H] with H = {self.num_heads} heads, got {tuple(ids.shape)}"
      )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"hash ids: expected an integer array, got dtype {ids.dtype}")

  def row_ids(self, ids: jax.Array) -> jax.Array:
    """Flat row ids: [..., H] -> [..., H] int32 (head j shifted by offsets[j]).

    No id wraps: ids of any integer dtype (int64 too) are clamped to the int32 range in their
    own dtype before the cast, and the sum saturates at 2**31 - 1 instead of overflowing. An
    id outside its table stays outside [0, R), where the backends clamp (or reject) it.
    """
    self.check_ids(ids)
    # [1, ..., 1, H], against ids [..., H]
    offsets = jnp.asarray(self.offsets).reshape((1,) * (ids.ndim - 1) + (self.num_heads,))
    int32 = np.iinfo(np.int32)
    return validation.clip_ids(ids, int32.min, int32.max - offsets) + offsets
