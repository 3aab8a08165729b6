"""Reading and writing safetensors checkpoints without loading them (DeepSeek-V4.1's format).

A safetensors file is an 8-byte little-endian u64 header length N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (the
metadata optional), then the data buffer; the offsets count from the start of that buffer
(byte 8 + N of the file). A large checkpoint is several such shards with a
`model.safetensors.index.json` ({"metadata", "weight_map": {tensor name: shard file name}}).

DeepSeek-V4.1's Engram tables are 188 GiB, so nothing here reads tensor data whole:

- `Checkpoint.open(path)` parses the headers only (a file, a list of files, or a directory);
  `Checkpoint.array(name)` memory-maps one tensor read-only, and `require` does the same after
  checking its dtype and shape. The Engram table of layer L serves a disk tier directly:

      ckpt = Checkpoint.open("DeepSeek-V4.1/")
      parts = {"values": ckpt.array("layers.1.engram.embed.weight"),   # [R, Dh] F8_E4M3
               "scale": ckpt.array("layers.1.engram.embed.scale")}     # [R, Dh/32] F8_E8M0
      table = memory.create("tiered", num_rows=R, dim=Dh, disk=(parts, "mxfp8"), ...)

- `write(path, tensors)` streams arrays (memmaps larger than RAM included) into a new file.

E8M0 exponents (F8_E8M0) map to uint8, the raw exponent bytes the 'mxfp8' storage type of
`engram_jax.memory.storage` keeps; writing uint8 as F8_E8M0 needs `dtypes={name: "F8_E8M0"}`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import pathlib
import struct
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np

# safetensors dtype name -> the NumPy dtype its bytes are read as.
DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64),
  "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "F8_E8M0": np.dtype(np.uint8),  # raw exponent bytes (the 'mxfp8' storage's scale)
}
INDEX_FILE = "model.safetensors.index.json"
METADATA_KEY = "__metadata__"
_HEADER_ALIGN = 8
_WRITE_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor's bytes are.

  Attributes:
    name: the tensor's name.
    dtype: its safetensors dtype name (a key of `DTYPES`).
    shape: its shape.
    path: the file holding it.
    offset: absolute byte offset of its first byte in `path`.
    nbytes: its size in bytes.
  """

  name: str
  dtype: str
  shape: tuple[int, ...]
  path: pathlib.Path
  offset: int
  nbytes: int


def _no_duplicates(where: str):
  def hook(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
      duplicate = next(k for k in keys if keys.count(k) > 1)
      raise ValueError(f"{where}: header names {duplicate!r} twice")
    return dict(pairs)

  return hook


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and checks one safetensors file's header (reads only the header).

  Args:
    path: a .safetensors file.

  Returns:
    ({name: TensorInfo}, the file's `__metadata__` or {}).

  Raises:
    ValueError: a header beyond the file, malformed JSON or entries, an unknown dtype, offsets
      outside the data, or a byte count that is not prod(shape) * itemsize.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    if size < 8:
      raise ValueError(f"{path}: expected at least 8 bytes (the header length), got {size}")
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
      raise ValueError(f"{path}: header length {n} goes beyond the file ({size} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw, object_pairs_hook=_no_duplicates(str(path)))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: expected a JSON object as header, got {type(header).__name__}")
  metadata = header.pop(METADATA_KEY, None) or {}
  if not isinstance(metadata, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise ValueError(f"{path}: expected {METADATA_KEY} to map strings to strings")
  data_start, data_size = 8 + n, size - 8 - n
  tensors = {
    name: _tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()
  }
  return tensors, metadata


def _tensor_info(path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
  """One header entry, checked."""
  where = f"{path}: tensor {name!r}"
  if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
    raise ValueError(f"{where}: expected an entry with dtype, shape and data_offsets")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if dtype not in DTYPES:
    raise ValueError(f"{where}: unknown dtype {dtype!r}, expected one of {sorted(DTYPES)}")
  if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
    raise ValueError(f"{where}: expected a shape of non-negative ints, got {shape!r}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
    raise ValueError(f"{where}: expected data_offsets [begin, end], got {offsets!r}")
  begin, end = offsets
  if not begin <= end <= data_size:
    raise ValueError(f"{where}: data_offsets {offsets} outside the data ({data_size} bytes)")
  expected = math.prod(shape) * DTYPES[dtype].itemsize
  if end - begin != expected:
    raise ValueError(
      f"{where}: {end - begin} bytes for {dtype} {shape}, expected {expected} (prod(shape) * "
      f"{DTYPES[dtype].itemsize})"
    )
  return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class Checkpoint:
  """The tensors of one or more safetensors files, memory-mapped on demand (never read whole).

  Attributes:
    path: what it was opened from.
    files: the files it reads, in order.
  """

  def __init__(self, path, tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]):
    self.path = path
    self._tensors = dict(tensors)
    self._metadata = dict(metadata)
    self.files = tuple(dict.fromkeys(info.path for info in self._tensors.values()))

  @classmethod
  def open(cls, path) -> Checkpoint:
    """Parses the headers of a checkpoint.

    Args:
      path: one .safetensors file, a list or tuple of them, or a directory: with
        `model.safetensors.index.json` its weight_map says which shard holds each tensor,
        without one every `*.safetensors` file in it is read.

    Returns:
      The checkpoint.

    Raises:
      FileNotFoundError: no such file, or a directory without safetensors files.
      ValueError: a malformed header or index, or a tensor name in two files.
    """
    if isinstance(path, (list, tuple)):
      return cls._from_files(path, [pathlib.Path(p) for p in path], None)
    path = pathlib.Path(path)
    if not path.is_dir():
      if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
      return cls._from_files(path, [path], None)
    index = path / INDEX_FILE
    if index.exists():
      weight_map = _weight_map(index)
      files = [path / f for f in dict.fromkeys(weight_map.values())]
      return cls._from_files(path, files, {n: path / f for n, f in weight_map.items()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"checkpoint {path}: no {INDEX_FILE} and no *.safetensors files")
    return cls._from_files(path, files, None)

  @classmethod
  def _from_files(
    cls, where, files: Sequence[pathlib.Path], weight_map: dict[str, pathlib.Path] | None
  ) -> Checkpoint:
    tensors, metadata = {}, {}
    for file in files:
      found, meta = read_header(file)
      metadata |= meta
      for name, info in found.items():
        if weight_map is not None and weight_map.get(name) != file:
          continue  # the index names another shard (or none) for it
        if name in tensors:
          first = tensors[name].path
          raise ValueError(f"checkpoint {where}: tensor {name!r} in both {first} and {file}")
        tensors[name] = info
    if weight_map is not None:
      for name, file in weight_map.items():
        if name not in tensors:
          raise ValueError(f"checkpoint {where}: index puts {name!r} in {file}, which lacks it")
    return cls(where, tensors, metadata)

  @property
  def names(self) -> list[str]:
    """The tensor names, sorted."""
    return sorted(self._tensors)

  @property
  def metadata(self) -> dict[str, str]:
    """The files' `__metadata__`, merged (a later file's value wins)."""
    return dict(self._metadata)

  def __contains__(self, name) -> bool:
    return name in self._tensors

  def __len__(self) -> int:
    return len(self._tensors)

  def __repr__(self) -> str:
    return f"Checkpoint({str(self.path)!r}: {len(self)} tensors in {len(self.files)} files)"

  def info(self, name: str) -> TensorInfo:
    """Where tensor `name` is (KeyError if there is none)."""
    if name not in self._tensors:
      close = difflib.get_close_matches(name, self._tensors, n=3) or self.names[:3]
      examples = ", ".join(repr(c) for c in close)
      raise KeyError(
        f"checkpoint {self.path}: no tensor {name!r} (has {len(self)} tensors, e.g. {examples})"
      )
    return self._tensors[name]

  def array(self, name: str) -> np.memmap:
    """Tensor `name` as a read-only memmap of its dtype (`DTYPES`) and shape; reads no data."""
    info = self.info(name)
    # A zero-size tensor maps nothing; offset 0 avoids mapping at the end of the file.
    offset = info.offset if info.nbytes else 0
    return np.memmap(info.path, DTYPES[info.dtype], mode="r", offset=offset, shape=info.shape)

  def require(
    self, name: str, dtype: str | None = None, shape: Sequence[int | None] | None = None
  ) -> np.memmap:
    """`array(name)` after checking its dtype and shape.

    Args:
      name: the tensor.
      dtype: the expected safetensors dtype name (None: any).
      shape: the expected shape; None (the whole shape or one dimension) matches any.

    Returns:
      The read-only memmap.

    Raises:
      KeyError: no such tensor.
      ValueError: another dtype or shape.
    """
    info = self.info(name)
    if dtype is not None and info.dtype != dtype:
      raise ValueError(f"{name}: expected dtype {dtype}, got {info.dtype}")
    if shape is not None and (
      len(shape) != len(info.shape)
      or any(e is not None and e != d for e, d in zip(shape, info.shape, strict=True))
    ):
      expected = tuple("*" if e is None else e for e in shape)
      raise ValueError(f"{name}: expected shape {expected}, got {info.shape}")
    return self.array(name)


def _weight_map(index: pathlib.Path) -> dict[str, str]:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: expected JSON with a weight_map ({e!r})") from None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{index}: expected weight_map to map tensor names to file names")
  return weight_map


def dtype_name(dtype) -> str:
  """The safetensors name of a NumPy dtype (uint8: 'U8'; F8_E8M0 only by override)."""
  dtype = np.dtype(dtype).newbyteorder("<")
  for name, known in DTYPES.items():
    if known == dtype and name != "F8_E8M0":
      return name
  raise ValueError(f"dtype: expected one of the safetensors dtypes, got {dtype}")


def write(
  path,
  tensors: Mapping[str, np.ndarray],
  metadata: Mapping[str, str] | None = None,
  dtypes: Mapping[str, str] | None = None,
) -> pathlib.Path:
  """Writes a new safetensors file, streaming each array in chunks (memmaps larger than RAM).

  Args:
    path: the file to create (an existing one is never overwritten).
    tensors: {name: array}, laid out in this order; NumPy arrays, memmaps, or anything with
      `shape`, `dtype` and slicing along the first axis.
    metadata: the header's `__metadata__`, strings to strings.
    dtypes: {name: safetensors dtype name} overriding the one the array's dtype implies, for
      bytes of another type of the same width (uint8 exponents written as F8_E8M0).

  Returns:
    The path.

  Raises:
    FileExistsError: `path` exists.
    ValueError: an unknown dtype, an override of another width, or non-string metadata.
  """
  path = pathlib.Path(path)
  if path.exists():
    raise FileExistsError(f"{path}: already exists; refusing to overwrite it")
  header, layout, position = {}, [], 0
  if metadata is not None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise ValueError("metadata: expected a dict of strings to strings")
    header[METADATA_KEY] = dict(metadata)
  dtypes = dict(dtypes or {})
  if unknown := dtypes.keys() - tensors.keys():
    raise ValueError(f"dtypes: names {sorted(unknown)} are not among the tensors")
  for name, array in tensors.items():
    stored = np.dtype(array.dtype).newbyteorder("<")
    dtype = dtypes.get(name) or dtype_name(stored)
    if dtype not in DTYPES or DTYPES[dtype].itemsize != stored.itemsize:
      raise ValueError(f"dtypes[{name!r}]: expected a {stored.itemsize}-byte dtype, got {dtype!r}")
    nbytes = math.prod(array.shape) * stored.itemsize
    header[name] = {
      "dtype": dtype,
      "shape": list(array.shape),
      "data_offsets": [position, position + nbytes],
    }
    layout.append((array, stored))
    position += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % _HEADER_ALIGN)
  try:
    with open(path, "xb") as f:
      f.write(struct.pack("<Q", len(encoded)))
      f.write(encoded)
      for array, stored in layout:
        _write_array(f, array, stored)
  except BaseException:
    path.unlink(missing_ok=True)  # no half-written checkpoint left behind
    raise
  return path


def _write_array(f, array, stored: np.dtype) -> None:
  """Writes an array's bytes, little-endian, a bounded number of rows at a time."""
  if len(array.shape) == 0 or array.shape[0] == 0:
    chunks = [array]
  else:
    row_bytes = max(1, math.prod(array.shape[1:]) * stored.itemsize)
    step = max(1, _WRITE_CHUNK_BYTES // row_bytes)
    chunks = (array[start : start + step] for start in range(0, array.shape[0], step))
  for chunk in chunks:
    chunk = np.ascontiguousarray(np.asarray(chunk).astype(stored, copy=False))
    f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
