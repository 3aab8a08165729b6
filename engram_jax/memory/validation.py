"""Validation of row ids and gradients: the out-of-range rule every backend shares.

Out-of-range ids, the one rule of every backend, table object and pure core alike, for any
integer dtype: ids are range-checked in int64 (never after a narrowing cast, so 2**32 + 5 is
out of range, not row 5) and clamped to [0, R), or rejected with a ValueError by a table created
with `out_of_range='raise'` (`prepare_ids`, what every table object does with its ids first).
The pure cores always clamp (`clip_ids`, jittable). `check_grads` checks that the gradients of
an update match its ids.

Shapes: R table rows, Dh row width, [...] ids of any shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# What a table object does with an id outside [0, R): clamp it, or raise a ValueError.
OUT_OF_RANGE = ("clamp", "raise")
_INT32 = np.iinfo(np.int32)


def check_ids(ids) -> None:
  """Raises ValueError unless `ids` is an integer array."""
  dtype = getattr(ids, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"ids: expected an integer array, got {type(ids).__name__} of {dtype}")


def check_out_of_range(out_of_range: str) -> str:
  """Returns `out_of_range` if it is one of `OUT_OF_RANGE`, else raises ValueError."""
  if out_of_range not in OUT_OF_RANGE:
    raise ValueError(f"out_of_range: expected one of {OUT_OF_RANGE}, got {out_of_range!r}")
  return out_of_range


def clip_ids(ids, lo, hi) -> jax.Array:
  """Integer ids clamped to [lo, hi] and cast to int32, without wrapping (pure; jit it).

  Ids of a dtype wider than int32 (int64 NumPy ids, int64 jax ids under x64, uint32) are first
  clamped to the int32 range in their own dtype, and only then cast: 2**32 + 5 becomes `hi`,
  not 5. NumPy ids are never passed through `jnp.asarray` (which, with x64 disabled, casts
  int64 to int32 by wrapping).

  Args:
    ids: [...] integer ids: a jax array (traced or not), a NumPy array or Python ints.
    lo: int32 lower bound: a scalar, or an array of ids' rank (e.g. [1, H] per head).
    hi: int32 upper bound (>= lo), like `lo`.

  Returns:
    [...] int32 jax array.
  """
  xp = jnp if isinstance(ids, jax.Array) else np
  ids = xp.asarray(ids)
  info = np.iinfo(ids.dtype)
  if info.min < _INT32.min or info.max > _INT32.max:
    ids = xp.clip(ids, max(info.min, _INT32.min), min(info.max, _INT32.max))
  return jnp.clip(jnp.asarray(ids.astype(np.int32)), lo, hi)


_jit_clip_ids = jax.jit(clip_ids, static_argnums=(1, 2))


def _check_range(ids: np.ndarray, num_rows: int) -> None:
  """Raises ValueError naming the first id of `ids` (NumPy) outside [0, num_rows), if any."""
  if ids.size == 0 or (ids.min() >= 0 and ids.max() < num_rows):
    return
  first = int(np.argmax(((ids < 0) | (ids >= num_rows)).reshape(-1)))
  where = tuple(int(i) for i in np.unravel_index(first, ids.shape))
  raise ValueError(
    f"ids: id {int(ids.reshape(-1)[first])} at index {where} is outside the table's rows "
    f"[0, {num_rows}) (out_of_range='raise'; 'clamp' clamps it)"
  )


def prepare_ids(ids, num_rows: int, out_of_range: str = "clamp") -> np.ndarray | jax.Array:
  """Flat row ids as int32 in [0, num_rows): what every table object does with its ids first.

  Host ids (NumPy arrays, Python ints) are range-checked in int64 (at least: uint64 ids above
  2**63 - 1 saturate there) before any narrowing cast, then clamped to [0, num_rows) or
  rejected. Jax arrays (already on device; int32 unless x64 is enabled) are clamped in their
  own dtype, then cast (`clip_ids`, on their device); 'raise' checks their min and max on the
  host first.

  Args:
    ids: [...] integer row ids.
    num_rows: R.
    out_of_range: 'clamp' (ids below 0 read row 0, ids from R on read row R - 1) or 'raise'.

  Returns:
    [...] int32 ids in [0, R): a NumPy array for host ids, a jax array for jax ids.

  Raises:
    ValueError: for non-integer ids, an unknown `out_of_range`, or (with 'raise') an id outside
      [0, R), naming the first such id, its index and the range.
  """
  check_out_of_range(out_of_range)
  if not hasattr(ids, "dtype"):
    ids = np.asarray(ids)  # Python ints (int64 in NumPy)
  check_ids(ids)
  if isinstance(ids, jax.Array):
    if out_of_range == "raise" and ids.size:
      lo, hi = jax.device_get((jnp.min(ids), jnp.max(ids)))
      if lo < 0 or hi >= num_rows:
        _check_range(np.asarray(ids), num_rows)
    return _jit_clip_ids(ids, 0, num_rows - 1)
  ids = np.asarray(ids)
  if np.can_cast(ids.dtype, np.int32):  # every value fits int32: checked exactly there
    exact = ids.astype(np.int32, copy=False)
  elif ids.dtype == np.uint64:
    exact = np.minimum(ids, np.uint64(np.iinfo(np.int64).max)).astype(np.int64)
  else:
    exact = ids.astype(np.int64, copy=False)
  if out_of_range == "raise":
    _check_range(exact, num_rows)
  return np.clip(exact, 0, num_rows - 1).astype(np.int32, copy=False)


def check_grads(ids, grads, dim: int) -> None:
  """Raises ValueError unless grads has shape ids.shape + (dim,)."""
  check_ids(ids)
  want = (*tuple(ids.shape), dim)
  if tuple(grads.shape) != want:
    raise ValueError(f"grads: expected shape {want} (ids.shape + (dim,)), got {grads.shape}")
