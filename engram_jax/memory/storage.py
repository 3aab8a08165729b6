"""Row storage types of the host and disk tiers: float32, bfloat16, int8, MXFP8.

A table kept off the accelerator can be stored more compactly than the rows the model reads:

- 'float32': exact.
- 'bfloat16': half the bytes; each element keeps 8 significant bits, so the round-trip error of
  an element x is at most |x| * 2**-8 (round to nearest even).
- 'int8': a quarter of the bytes plus one float32 scale per row. Symmetric per-row quantisation:
  scale = max|row| / 127, q = round(row / scale); the round-trip error of every element is at
  most scale / 2 = max|row| / 254. An all-zero row gets scale 0 and stays exactly zero.
- 'mxfp8': the released DeepSeek-V4.1 format, a little over a quarter of the bytes: float8_e4m3fn
  values with one E8M0 exponent byte per 32 columns (`MX_BLOCK`), the byte e standing for
  2 ** (e - 127) (0 is 2**-127, 255 is NaN). Encoding picks e = 127 + ceil(log2(amax / 448))
  per block (448 is e4m3's largest value; an all-zero block gets e = 127) and rounds
  value / 2 ** (e - 127) to the nearest e4m3 value (ties to even). Each element keeps 4
  significant bits: the round-trip error of x is at most |x| * 2**-4, or half of e4m3's smallest
  step (2**-10 times the block's scale) below its normal range.

The quantised types ('int8', 'mxfp8': `SCALED`) are serving copies, read-only. The decoding on
an accelerator is one fused kernel with the gather (`pallas_kernels.gather.gather_decode`); the
functions here are its plain reference and the host tiers' NumPy path, with the kernel's E8M0
arithmetic (`pallas_kernels.common.times_e8m0`).

`encode` / `decode` work on NumPy arrays (host tiers) and on jax arrays (inside a jitted
fetch), each with its own array module. `round_trip(table, storage)` converts a table to a
storage type and back: evaluate a model with the round-tripped tables to measure the accuracy
cost of a storage type. `save_memmap` / `open_memmap` write and map the disk tier;
`check_parts` checks parts mapped elsewhere (a safetensors checkpoint's tensors) before a disk
tier serves them.

Shapes: R rows, Dh row width, Dh/32 E8M0 exponents of an 'mxfp8' row; `...` any leading axes.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from engram_jax.config import STORAGE_TYPES
from engram_jax.layers import fp8
from pallas_kernels.common import times_e8m0

_INT8_MAX = 127.0
_E4M3_MAX = 448.0
MX_BLOCK = 32
SCALED = ("int8", "mxfp8")


def check_storage(storage: str) -> str:
  """Returns `storage` if it names a storage type, else raises ValueError."""
  if storage not in STORAGE_TYPES:
    raise ValueError(f"storage: expected one of {STORAGE_TYPES}, got {storage!r}")
  return storage


def value_dtype(storage: str) -> np.dtype:
  """The dtype of the stored values of a storage type."""
  check_storage(storage)
  return np.dtype(
    {
      "float32": np.float32,
      "bfloat16": jnp.bfloat16,
      "int8": np.int8,
      "mxfp8": ml_dtypes.float8_e4m3fn,
    }[storage]
  )


def storage_of(values_dtype) -> str:
  """The storage type whose stored values have this dtype (a float table: 'float32')."""
  dtype = np.dtype(values_dtype)
  if dtype == np.int8:
    return "int8"
  if dtype == np.dtype(ml_dtypes.float8_e4m3fn):
    return "mxfp8"
  return "float32"


def check_width(storage: str, dim: int) -> None:
  """Raises ValueError where a row width cannot be stored in a storage type."""
  if storage == "mxfp8" and dim % MX_BLOCK:
    raise ValueError(f"storage 'mxfp8': expected a row width divisible by {MX_BLOCK}, got {dim}")


def row_bytes(storage: str, dim: int) -> int:
  """Bytes one row of width `dim` occupies (values plus the int8 scale or E8M0 exponents)."""
  extra = {"int8": 4, "mxfp8": dim // MX_BLOCK}.get(storage, 0)
  return dim * value_dtype(storage).itemsize + extra


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def encode(rows, storage: str) -> dict:
  """Converts float rows to a storage type.

  Args:
    rows: [..., Dh] float rows (NumPy or jax).
    storage: one of `STORAGE_TYPES`.

  Returns:
    {"values": [..., Dh] in `value_dtype(storage)`} plus, for 'int8', {"scale": [...] float32},
    for 'mxfp8', {"scale": [..., Dh/32] uint8 E8M0 exponents}; NumPy arrays for NumPy input,
    jax arrays otherwise.
  """
  check_storage(storage)
  xp = _xp(rows)
  if storage == "mxfp8":
    return _encode_mxfp8(xp, rows)
  if storage != "int8":
    return {"values": xp.asarray(rows, dtype=value_dtype(storage))}  # no copy if already so
  rows = rows.astype(np.float32)
  scale = xp.max(xp.abs(rows), axis=-1) / np.float32(_INT8_MAX)  # [..., Dh] -> [...]
  safe = xp.where(scale > 0, scale, np.float32(1))
  q = xp.clip(xp.round(rows / safe[..., None]), -_INT8_MAX, _INT8_MAX)  # [..., Dh]
  return {"values": q.astype(np.int8), "scale": scale.astype(np.float32)}


def _encode_mxfp8(xp, rows) -> dict:
  *lead, dh = rows.shape
  check_width("mxfp8", dh)
  blocks = rows.astype(np.float32).reshape(*lead, dh // MX_BLOCK, MX_BLOCK)  # [..., Dh/32, 32]
  amax = xp.max(xp.abs(blocks), axis=-1)  # [..., Dh/32]
  # log2 of the block's amax over 448, rounded up (exactly, from the float's own exponent):
  # the smallest power of two that fits it.
  power = fp8.ceil_log2(xp.where(amax > 0, amax, _E4M3_MAX) / np.float32(_E4M3_MAX), xp)
  exponent = xp.clip(power + 127, 0, 254).astype(np.int32)  # [..., Dh/32]
  scaled = times_e8m0(blocks, 254 - exponent[..., None], xp)  # / 2 ** (e - 127): exact
  codes = xp.clip(scaled, -_E4M3_MAX, _E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
  return {"values": codes.reshape(*lead, dh), "scale": exponent.astype(np.uint8)}


# e4m3fn code (as a byte) -> its float32 value: one table lookup per code is several times faster
# than NumPy's element-wise cast of the float8 type.
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _decode_mxfp8_numpy(values: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
  """NumPy `decode` of mxfp8 rows: values [..., Dh], E8M0 bytes [..., Dh/32] -> [..., Dh]."""
  *lead, dh = values.shape
  out = _E4M3_VALUES[np.asarray(values).view(np.uint8)]  # [..., Dh] float32
  # One factor 2 ** (e - 127) per block: NumPy keeps float32 subnormals (2**-127), unlike XLA.
  factor = times_e8m0(np.float32(1), np.asarray(scale), np)  # [..., Dh/32]
  blocks = out.reshape(*lead, dh // MX_BLOCK, MX_BLOCK)
  # Large codes times large exponents pass float32's range: inf, as the device decode gives.
  with np.errstate(over="ignore"):
    np.multiply(blocks, factor[..., None], out=blocks)  # [..., Dh/32, 32] * [..., Dh/32, 1]
  return out.astype(dtype, copy=False)


def decode(parts: dict, storage: str, dtype=np.float32):
  """Converts stored rows back to floats.

  Args:
    parts: the output of `encode` (or rows gathered from it, same keys).
    storage: the storage type of `parts`.
    dtype: the dtype of the rows returned.

  Returns:
    [..., Dh] rows in `dtype`.
  """
  check_storage(storage)
  values = parts["values"]
  xp = _xp(values)
  if storage == "mxfp8" and xp is np:
    return _decode_mxfp8_numpy(values, parts["scale"], dtype)
  if storage == "mxfp8":
    *lead, dh = values.shape
    blocks = values.astype(np.float32).reshape(*lead, dh // MX_BLOCK, MX_BLOCK)
    # [..., Dh/32, 32] * [..., Dh/32, 1] -> [..., Dh]
    decoded = times_e8m0(blocks, parts["scale"][..., None], xp)  # [..., Dh/32, 32]
    return decoded.reshape(*lead, dh).astype(dtype)
  if storage != "int8":
    return xp.asarray(values, dtype=dtype)  # no copy if already in `dtype`
  # [..., Dh] * [..., 1]
  return (values.astype(np.float32) * parts["scale"][..., None]).astype(dtype)


def round_trip(table, storage: str, dtype=np.float32, chunk_rows: int = 1 << 20):
  """A table converted to a storage type and back (the rows a model reads from that tier).

  Args:
    table: [R, Dh] float rows, NumPy or jax (jax input is round-tripped in one piece).
    storage: one of `STORAGE_TYPES`.
    dtype: the dtype of the result.
    chunk_rows: NumPy tables are converted this many rows at a time (bounded temporaries).

  Returns:
    [R, Dh] rows in `dtype`, NumPy for NumPy input.
  """
  if not isinstance(table, np.ndarray):
    return decode(encode(jnp.asarray(table), storage), storage, dtype)
  out = np.empty(table.shape, dtype)
  for start in range(0, table.shape[0], chunk_rows):
    part = table[start : start + chunk_rows]
    out[start : start + chunk_rows] = decode(encode(part, storage), storage, dtype)
  return out


def decode_table(
  parts: dict, storage: str, dtype=np.float32, chunk_rows: int = 1 << 20
) -> np.ndarray:
  """A whole stored table (e.g. memmaps from `open_memmap`) decoded chunk by chunk: [R, Dh]."""
  values = parts["values"]
  out = np.empty(values.shape, dtype)
  for start in range(0, values.shape[0], chunk_rows):
    chunk = {k: np.asarray(v[start : start + chunk_rows]) for k, v in parts.items()}
    out[start : start + chunk_rows] = decode(chunk, storage, dtype)
  return out


def error_bound(rows, storage: str):
  """The largest round-trip error each element of `rows` may have (same shape as `rows`).

  float32: 0; bfloat16: |x| * 2**-8 (half a unit in the 8th significant bit); int8:
  max|row| / 254 (half a quantisation step) + max|row| * 2**-22 (float32 rounding); mxfp8:
  |x| * 2**-4 plus half of e4m3's smallest step at the block's scale (2**-10 * scale).
  """
  check_storage(storage)
  xp = _xp(rows)
  rows = rows.astype(np.float32)
  if storage == "float32":
    return xp.zeros_like(rows)
  if storage == "bfloat16":
    return xp.abs(rows) * np.float32(2.0**-8)
  if storage == "mxfp8":
    exponent = _encode_mxfp8(xp, rows)["scale"]  # [..., Dh/32]
    floor = xp.repeat(times_e8m0(np.float32(2.0**-10), exponent, xp), MX_BLOCK, axis=-1)
    return xp.abs(rows) * np.float32(2.0**-4) + floor
  amax = xp.max(xp.abs(rows), axis=-1, keepdims=True)  # [..., Dh] -> [..., 1]
  # Half a step, plus the float32 rounding of the scale, the quotient and the product (a few
  # units in the last place of amax: measured up to 6e-6 of half a step).
  return xp.broadcast_to(amax * np.float32(1 / (2 * _INT8_MAX) + 2.0**-22), rows.shape)


def save_memmap(directory, table, storage: str, chunk_rows: int = 1 << 20) -> pathlib.Path:
  """Writes a table to disk in a storage type, for the read-only disk tier.

  Args:
    directory: a new or empty directory; gets `values.npy`, `scale.npy` (int8, mxfp8) and
      `storage.json`.
    table: [R, Dh] float rows (NumPy, jax, or a NumPy memmap), written in chunks.
    storage: one of `STORAGE_TYPES`.
    chunk_rows: rows encoded at a time.

  Returns:
    The directory.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  r, dh = table.shape
  check_width(storage, dh)
  disk_dtype = _disk_dtype(storage)
  values = np.lib.format.open_memmap(
    directory / "values.npy", mode="w+", dtype=disk_dtype, shape=(r, dh)
  )
  scale = None
  if storage in SCALED:
    scale_dtype, scale_shape = (
      (np.float32, (r,)) if storage == "int8" else (np.uint8, (r, dh // MX_BLOCK))
    )
    scale = np.lib.format.open_memmap(
      directory / "scale.npy", mode="w+", dtype=scale_dtype, shape=scale_shape
    )
  for start in range(0, r, chunk_rows):
    parts = encode(np.asarray(table[start : start + chunk_rows]), storage)
    values[start : start + chunk_rows] = parts["values"].view(disk_dtype)
    if scale is not None:
      scale[start : start + chunk_rows] = parts["scale"]
  values.flush()
  if scale is not None:
    scale.flush()
  (directory / "storage.json").write_text(json.dumps({"storage": storage, "shape": [r, dh]}))
  return directory


def _disk_dtype(storage: str) -> np.dtype:
  """.npy has no bfloat16 or float8: their bits are stored as unsigned integers of the same
  width and viewed back by `open_memmap`."""
  return np.dtype({"bfloat16": np.uint16, "mxfp8": np.uint8}.get(storage, value_dtype(storage)))


def check_parts(parts, storage: str, num_rows: int, dim: int, where: str = "disk") -> dict:
  """Checks stored parts against a table of `num_rows` rows of width `dim` in a storage type.

  Args:
    parts: {"values": [R, Dh], and for 'int8' "scale": [R] float32, for 'mxfp8' "scale":
      [R, Dh/32] uint8}, NumPy arrays or memmaps (e.g. tensors of a safetensors checkpoint).
    storage: one of `STORAGE_TYPES`.
    num_rows: R.
    dim: Dh.
    where: what the parts are, for the error messages.

  Returns:
    `parts`.

  Raises:
    ValueError: other keys, shapes or dtypes than the storage type stores.
  """
  check_storage(storage)
  check_width(storage, dim)
  expected = {"values": (value_dtype(storage), (num_rows, dim))}
  if storage == "int8":
    expected["scale"] = (np.dtype(np.float32), (num_rows,))
  elif storage == "mxfp8":
    expected["scale"] = (np.dtype(np.uint8), (num_rows, dim // MX_BLOCK))
  if not isinstance(parts, dict) or parts.keys() != expected.keys():
    keys = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
    raise ValueError(f"{where}: expected parts {sorted(expected)} for {storage!r}, got {keys}")
  for key, (dtype, shape) in expected.items():
    got = parts[key]
    if not isinstance(got, np.ndarray):
      raise ValueError(f"{where}: expected {key} as a NumPy array or memmap, got {type(got)}")
    if got.dtype != dtype or got.shape != shape:
      raise ValueError(
        f"{where}: {storage} {key}: expected {dtype} {shape}, got {got.dtype} {got.shape}"
      )
  return parts


def open_memmap(directory) -> tuple[dict, str]:
  """Maps a table written by `save_memmap` read-only: ({"values", ["scale"]}, storage)."""
  directory = pathlib.Path(directory)
  meta = json.loads((directory / "storage.json").read_text())
  storage = check_storage(meta["storage"])
  parts = {"values": np.load(directory / "values.npy", mmap_mode="r").view(value_dtype(storage))}
  if storage in SCALED:
    parts["scale"] = np.load(directory / "scale.npy", mmap_mode="r")
  if list(parts["values"].shape) != meta["shape"]:
    raise ValueError(f"{directory}: values shape {parts['values'].shape} != {meta['shape']}")
  return parts, storage
