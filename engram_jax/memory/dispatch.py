"""Chooses how a table lookup runs: the Pallas kernels or XLA's gather.

`lookup(table, ids, offsets)` reads row `ids[..., h] + offsets[h]` for every head h (the
differentiable lookup of a trainable table); `gather_rows(values, ids, storage, scale)` reads flat
rows of any storage type and decodes them (the owner's gather of a sharded table, a tiered
cache's hits); `decode_rows` decodes packed rows that already arrived (a host table's rows);
`optimizer.dedup_sum` gives the distinct ids of an update and the sum of each one's gradients,
the input of the sparse Adam step. Two implementations return identical rows:

- 'pallas': one fused gather kernel for all heads (`pallas_kernels.lookup`), whose gradient is
  the deterministic sort-and-sum scatter-add. Off a GPU it runs in Pallas interpret mode (slow,
  for tests).
- 'xla': `jnp.take` on the flat row ids, then `memory.storage.decode`; the gradient is XLA's
  scatter-add, and `optimizer.dedup_sum` is `jnp.unique` plus `segment_sum` (on a GPU a
  scatter-add with atomics, whose float sums vary from run to run; the Pallas sort-and-sum
  kernel `pallas_kernels.sparse_row_grads` sums each row's gradients in token order).

'auto' (the default; `MemoryConfig.lookup_impl` in an experiment) picks 'pallas' when the
default backend is a GPU and 'xla' elsewhere. The choice is made at trace time: a jitted
function keeps the implementation it was traced with.

Out-of-range rows are clamped to [0, R) by both implementations, the rule of every backend
(`engram_jax.memory.validation`): each head's ids are range-checked in their own dtype (int64
ids are never cast to int32 first, so 2**32 + 5 is out of range, not row 5) and clamped so that
their rows land in [0, R).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import LOOKUP_IMPLS
from engram_jax.memory import storage as storage_lib
from engram_jax.memory import validation
from pallas_kernels.gather import gather_decode
from pallas_kernels.lookup import lookup as pallas_lookup

IMPLEMENTATIONS = LOOKUP_IMPLS


def resolve_implementation(implementation: str = "auto") -> str:
  """Turns an implementation name into 'pallas' or 'xla'.

  Args:
    implementation: 'pallas', 'xla' or 'auto'.

  Returns:
    'pallas' or 'xla'.

  Raises:
    ValueError: for any other name.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return implementation


def _check(table: jax.Array, ids: jax.Array, offsets: jax.Array) -> None:
  if table.ndim != 2:
    raise ValueError(f"table: expected rank 2 [R, Dh], got shape {tuple(table.shape)}")
  if ids.ndim < 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids: expected an integer array [..., H], got {ids.dtype}{list(ids.shape)}")
  if offsets.ndim != 1 or not jnp.issubdtype(offsets.dtype, jnp.integer):
    raise ValueError(
      f"offsets: expected a rank-1 integer array [H], got {offsets.dtype}{list(offsets.shape)}"
    )
  if ids.shape[-1] != offsets.shape[0]:
    raise ValueError(
      f"ids: last axis ({ids.shape[-1]}) must equal the number of offsets ({offsets.shape[0]})"
    )


def lookup(
  table: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  *,
  implementation: str = "auto",
) -> jax.Array:
  """Reads every head's row from one flat table.

  Shapes: ... any leading axes (e.g. B, T), H heads, R table rows, Dh row width, N tokens.

  Args:
    table: [R, Dh] the flat table of all heads.
    ids: [..., H] integer row ids, each relative to its head's offset.
    offsets: [H] integer first row of each head.
    implementation: 'pallas', 'xla' or 'auto' (Pallas on a GPU, XLA elsewhere).

  Returns:
    [..., H, Dh] rows in the table's dtype.

  Raises:
    ValueError: for an unknown implementation, a table that is not 2-D, non-integer ids or
      offsets, or ids whose last axis differs from the number of offsets.
  """
  table = jnp.asarray(table)
  if not isinstance(ids, jax.Array):
    ids = np.asarray(ids)  # keeps int64 (jnp.asarray would wrap it to int32 with x64 off)
  offsets = jnp.asarray(offsets)
  _check(table, ids, offsets)
  chosen = resolve_implementation(implementation)
  *lead, h = ids.shape
  offsets = offsets.astype(jnp.int32)
  # Head h's ids clamped to [-offsets[h], R - 1 - offsets[h]] (its rows to [0, R)) in their
  # own dtype before the int32 cast: [..., H] -> [N, H] int32.
  flat_ids = validation.clip_ids(
    ids.reshape(-1, h), -offsets[None, :], table.shape[0] - 1 - offsets[None, :]
  )
  if chosen == "pallas":
    rows = pallas_lookup(table, flat_ids, offsets)
  else:
    flat_rows = flat_ids + offsets[None, :]  # [N, H] + [1, H] -> [N, H]
    rows = jnp.take(table, flat_rows, axis=0, mode="clip")  # [N, H] -> [N, H, Dh]
  return rows.reshape(*lead, h, table.shape[1])  # [N, H, Dh] -> [..., H, Dh]


def gather_rows(
  values: jax.Array,
  ids: jax.Array,
  storage: str = "float32",
  scale: jax.Array | None = None,
  dtype=None,
  implementation: str = "auto",
) -> jax.Array:
  """Reads flat rows of a stored table and decodes them (no gradient).

  Shapes: ... any leading axes, R rows, Dh row width, N = prod(...) ids.

  Args:
    values: [R, Dh] the stored values (`storage.value_dtype(storage)`, or any float table for
      'float32').
    ids: [...] integer row ids, already in [0, R) (out-of-range ids are clamped).
    storage: one of `STORAGE_TYPES`.
    scale: the stored scale of 'int8' ([R]) or 'mxfp8' ([R, Dh/32]) rows, else None.
    dtype: the rows' dtype; None keeps a float table's dtype (float32 for quantised rows).
    implementation: 'pallas', 'xla' or 'auto'.

  Returns:
    [..., Dh] rows.
  """
  chosen = resolve_implementation(implementation)
  storage_lib.check_storage(storage)
  if dtype is None:
    dtype = values.dtype if storage not in storage_lib.SCALED else jnp.float32
  shape = jnp.shape(ids)
  flat = jnp.clip(jnp.asarray(ids).reshape(-1), 0, values.shape[0] - 1).astype(jnp.int32)  # [N]
  if chosen == "pallas":
    kernel_storage = storage if storage in storage_lib.SCALED else "float32"
    rows = gather_decode(
      values,
      flat[:, None],
      jnp.zeros((1,), jnp.int32),
      storage=kernel_storage,
      scale=scale,
      dtype=dtype,
    )[:, 0]  # [N, 1, Dh] -> [N, Dh]
  else:
    parts = {"values": jnp.take(values, flat, axis=0)}  # [N, Dh]
    if scale is not None:
      parts["scale"] = jnp.take(scale, flat, axis=0)  # [N] or [N, Dh/32]
    rows = storage_lib.decode(parts, storage, dtype)
  return rows.reshape(*shape, values.shape[1])  # [N, Dh] -> [..., Dh]


def decode_rows(
  values: jax.Array,
  storage: str,
  scale: jax.Array | None = None,
  dtype=jnp.float32,
  implementation: str = "auto",
) -> jax.Array:
  """Decodes packed stored rows [N, Dh] (row i -> row i) into `dtype`."""
  if storage not in storage_lib.SCALED and values.dtype == jnp.dtype(dtype):
    return values  # nothing to decode
  if resolve_implementation(implementation) == "xla":
    parts = {"values": values} if scale is None else {"values": values, "scale": scale}
    return storage_lib.decode(parts, storage, dtype)
  return gather_rows(
    values, jnp.arange(values.shape[0], dtype=jnp.int32), storage, scale, dtype, "pallas"
  )
