"""Helpers shared by the lookup kernels: interpret-mode choice, tile sizes, input checks, and
the E8M0 scaling of 'mxfp8' rows (`times_e8m0`, also the host storage's decoding).

The kernels target Pallas's Triton backend, whose loads and stores must have a power-of-two
number of elements. A row of any width `Dh` is therefore moved as a few power-of-two column
chunks (its binary decomposition: 80 = 64 + 16), each chunk one contiguous load per row, and
token blocks are powers of two with the tail masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Tile budget of one program instance. A gather is bandwidth-bound: 32 KiB of rows in flight per
# program (4 warps) keeps enough loads outstanding without spilling registers.
GATHER_TILE_BYTES = 32 * 1024
# The backward keeps a float32 accumulator tile in registers for the whole reduction loop.
REDUCE_TILE_BYTES = 8 * 1024
MIN_BLOCK_ROWS = 16
MAX_BLOCK_ROWS = 1024


def resolve_interpret(interpret: bool | None) -> bool:
  """Chooses interpret mode: None means interpret unless the default backend is a GPU."""
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)


def _bitcast(xp, x, dtype):
  """The bits of `x` read as `dtype` (same item size): NumPy's `view`, or XLA's bitcast."""
  if xp is np:
    return np.asarray(x).view(dtype)
  return jax.lax.bitcast_convert_type(x, dtype)


def _pow2(k, xp):
  """2.0 ** k as float32 for integer k in [-126, 127] (int32): the exponent field alone."""
  return _bitcast(xp, (k + 127) << 23, xp.float32)


def times_e8m0(x, exponent, xp=jnp):
  """x * 2 ** (e - 127) for E8M0 bytes e (any integer dtype; 255 -> NaN), float32.

  The power is applied as two normal float32 factors of about 2 ** ((e - 127) / 2): the single
  factor 2**-127 (byte 0) is below float32's normal range and XLA flushes it to zero. Each factor
  is built from integer shifts and a bitcast only, so this lowers inside a Pallas kernel; a
  product below float32's normal range follows the platform's rule for subnormals (XLA:CPU
  flushes them to zero, NumPy keeps them); one past its range is inf (byte 255 is NaN still).

  Args:
    x: [...] float32 values (jax, or NumPy with `xp=np`), broadcast against `exponent`.
    exponent: [...] E8M0 exponent bytes as integers (uint8, int32).
    xp: jax.numpy (also inside kernels) or NumPy.

  Returns:
    [...] float32 x * 2 ** (e - 127), in the broadcast shape of x and exponent.
  """
  k = exponent.astype(xp.int32) - 127
  half = k >> 1  # floor(k / 2)
  with np.errstate(over="ignore"):  # NumPy: inf past float32's range, as XLA, without a warning
    out = x * _pow2(half, xp) * _pow2(k - half, xp)
  return xp.where(k == 128, xp.float32(xp.nan), out)


def column_chunks(width: int) -> tuple[tuple[int, int], ...]:
  """Splits a row width into power-of-two chunks, widest first.

  Args:
    width: Dh, the number of columns of a row.

  Returns:
    (start, size) pairs covering [0, width) without overlap; every size is a power of two, so a
    chunk whose byte size is a multiple of 16 is loaded with 16-byte vector loads.
  """
  chunks = []
  start = 0
  for bit in reversed(range(width.bit_length())):
    size = 1 << bit
    if width & size:
      chunks.append((start, size))
      start += size
  return tuple(chunks)


def block_rows_for(width: int, itemsize: int, tile_bytes: int) -> int:
  """The largest power of two of rows whose tile fits in `tile_bytes`, clamped to [16, 1024]."""
  rows = max(1, tile_bytes // max(1, width * itemsize))
  rows = 1 << (rows.bit_length() - 1)
  return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, rows)))


def check_block_rows(block_rows: int) -> int:
  """Validates a user-given block size (a power of two, as the Triton backend requires)."""
  if not isinstance(block_rows, int) or block_rows < 1 or block_rows & (block_rows - 1):
    raise ValueError(f"block_rows: expected a power of two, got {block_rows!r}")
  return block_rows


def check_table(table: jax.Array) -> None:
  """Checks that the table is rank 2 [R, Dh]."""
  if table.ndim != 2:
    raise ValueError(f"table: expected rank 2 [R, Dh], got shape {tuple(table.shape)}")


def check_ids(ids: jax.Array, offsets: jax.Array) -> None:
  """Checks kernel-level ids [N, H] against the per-head offsets [H].

  Args:
    ids: [N, H] integer per-head row ids.
    offsets: [H] integer first row of each head in the table.

  Raises:
    ValueError: on a wrong rank, a non-integer dtype, or mismatched H.
  """
  if ids.ndim != 2:
    raise ValueError(f"ids: expected rank 2 [N, H], got shape {tuple(ids.shape)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids: expected an integer dtype, got {ids.dtype}")
  if offsets.ndim != 1 or not jnp.issubdtype(offsets.dtype, jnp.integer):
    raise ValueError(
      f"offsets: expected a rank-1 integer array [H], got {offsets.dtype}{list(offsets.shape)}"
    )
  if ids.shape[1] != offsets.shape[0]:
    raise ValueError(
      f"ids: last axis ({ids.shape[1]}) must equal the number of offsets ({offsets.shape[0]})"
    )
