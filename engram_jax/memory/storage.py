"""Row storage types of the host and disk tiers: float32, bfloat16, int8 with a per-row scale.

A table kept off the accelerator can be stored more compactly than the rows the model reads:

- 'float32': exact.
- 'bfloat16': half the bytes; each element keeps 8 significant bits, so the round-trip error of
  an element x is at most |x| * 2**-8 (round to nearest even).
- 'int8': a quarter of the bytes plus one float32 scale per row. Symmetric per-row quantisation:
  scale = max|row| / 127, q = round(row / scale); the round-trip error of every element is at
  most scale / 2 = max|row| / 254. An all-zero row gets scale 0 and stays exactly zero.

`encode` / `decode` work on NumPy arrays (host tiers) and on jax arrays (inside a jitted
fetch), each with its own array module. `round_trip(table, storage)` converts a table to a
storage type and back: evaluate a model with the round-tripped tables to measure the accuracy
cost of a storage type. `save_memmap` / `open_memmap` write and map the disk tier.

Shapes: R rows, Dh row width; `...` any leading axes.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np

from engram_jax.config import STORAGE_TYPES

_INT8_MAX = 127.0


def check_storage(storage: str) -> str:
  """Returns `storage` if it names a storage type, else raises ValueError."""
  if storage not in STORAGE_TYPES:
    raise ValueError(f"storage: expected one of {STORAGE_TYPES}, got {storage!r}")
  return storage


def value_dtype(storage: str) -> np.dtype:
  """The dtype of the stored values of a storage type."""
  check_storage(storage)
  return np.dtype({"float32": np.float32, "bfloat16": jnp.bfloat16, "int8": np.int8}[storage])


def row_bytes(storage: str, dim: int) -> int:
  """Bytes one row of width `dim` occupies (values plus the int8 scale)."""
  return dim * value_dtype(storage).itemsize + (4 if storage == "int8" else 0)


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def encode(rows, storage: str) -> dict:
  """Converts float rows to a storage type.

  Args:
    rows: [..., Dh] float rows (NumPy or jax).
    storage: one of `STORAGE_TYPES`.

  Returns:
    {"values": [..., Dh] in `value_dtype(storage)`} plus, for 'int8', {"scale": [...] float32};
    NumPy arrays for NumPy input, jax arrays otherwise.
  """
  check_storage(storage)
  xp = _xp(rows)
  if storage != "int8":
    return {"values": xp.asarray(rows, dtype=value_dtype(storage))}  # no copy if already so
  rows = rows.astype(np.float32)
  scale = xp.max(xp.abs(rows), axis=-1) / np.float32(_INT8_MAX)  # [..., Dh] -> [...]
  safe = xp.where(scale > 0, scale, np.float32(1))
  q = xp.clip(xp.round(rows / safe[..., None]), -_INT8_MAX, _INT8_MAX)  # [..., Dh]
  return {"values": q.astype(np.int8), "scale": scale.astype(np.float32)}


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
  if storage != "int8":
    return _xp(values).asarray(values, dtype=dtype)  # no copy if already in `dtype`
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
  max|row| / 254 (half a quantisation step).
  """
  check_storage(storage)
  xp = _xp(rows)
  rows = rows.astype(np.float32)
  if storage == "float32":
    return xp.zeros_like(rows)
  if storage == "bfloat16":
    return xp.abs(rows) * np.float32(2.0**-8)
  amax = xp.max(xp.abs(rows), axis=-1, keepdims=True)  # [..., Dh] -> [..., 1]
  return xp.broadcast_to(amax / np.float32(2 * _INT8_MAX), rows.shape)


def save_memmap(directory, table, storage: str, chunk_rows: int = 1 << 20) -> pathlib.Path:
  """Writes a table to disk in a storage type, for the read-only disk tier.

  Args:
    directory: a new or empty directory; gets `values.npy`, `scale.npy` (int8) and
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
  # .npy has no bfloat16: its bits are stored as uint16 and viewed back by `open_memmap`.
  disk_dtype = np.uint16 if storage == "bfloat16" else value_dtype(storage)
  values = np.lib.format.open_memmap(
    directory / "values.npy", mode="w+", dtype=disk_dtype, shape=(r, dh)
  )
  scale = None
  if storage == "int8":
    scale = np.lib.format.open_memmap(
      directory / "scale.npy", mode="w+", dtype=np.float32, shape=(r,)
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


def open_memmap(directory) -> tuple[dict, str]:
  """Maps a table written by `save_memmap` read-only: ({"values", ["scale"]}, storage)."""
  directory = pathlib.Path(directory)
  meta = json.loads((directory / "storage.json").read_text())
  storage = check_storage(meta["storage"])
  parts = {"values": np.load(directory / "values.npy", mmap_mode="r").view(value_dtype(storage))}
  if storage == "int8":
    parts["scale"] = np.load(directory / "scale.npy", mmap_mode="r")
  if list(parts["values"].shape) != meta["shape"]:
    raise ValueError(f"{directory}: values shape {parts['values'].shape} != {meta['shape']}")
  return parts, storage
