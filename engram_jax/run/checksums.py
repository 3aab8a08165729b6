"""Checksums of a pytree of arrays, computed from the host bytes and independent of sharding.

A leaf's checksum is the sum, modulo 2**64, of one mixed 64-bit word per element:
`mix(bits(x[i]) + i * GOLDEN)` with i the element's global flat index and `mix` the splitmix64
finaliser (a compiled Numba loop). A sum does not depend on how the array is split, so each
process adds up the shards it holds (one replica of each) and the partial sums are added over
the processes: the same leaf gives the same checksum on one device, on a mesh, in pinned host
memory or restored onto another mesh, and any changed, swapped or moved element changes it
(with probability 1 - 2**-64).

`record(tree)` gives {leaf path: {"shape", "dtype", "checksum"}}; `structure_mismatch` and
`first_bad_leaf` compare two records and name the first leaf that differs.
"""

from __future__ import annotations

import hashlib
import json

import jax
import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_MASK = (1 << 64) - 1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _mixed_sum(words: np.ndarray, base: np.ndarray) -> np.uint64:
  """Sum over a [rows, last] block of `mix(word + pos * GOLDEN)`, with pos = base[row] + col
  and `mix` splitmix64's finaliser (uint64 arithmetic, wrapping)."""
  total = np.uint64(0)
  for r in range(words.shape[0]):
    b = base[r]
    for c in range(words.shape[1]):
      x = np.uint64(words[r, c]) + (b + np.uint64(c)) * _GOLDEN
      x = (x ^ (x >> _S30)) * _MIX1
      x = (x ^ (x >> _S27)) * _MIX2
      total += x ^ (x >> _S31)
  return total


def _bits(x: np.ndarray) -> np.ndarray:
  """The elements' bit patterns as unsigned integers of the same width."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    return x.view(np.uint8)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _shard_sum(data: np.ndarray, index: tuple, shape: tuple) -> int:
  """The sum of mixed words of one shard `data` at `index` (slices) of a global `shape`."""
  if data.size == 0:
    return 0
  if not shape:  # a scalar: one element at index 0
    return int(_mixed_sum(_bits(data.reshape(1, 1)), np.zeros((1,), np.uint64)))
  strides = np.cumprod((*shape[1:], 1)[::-1])[::-1].astype(np.uint64)  # global, in elements
  starts = [s.indices(n)[0] for s, n in zip(index, shape, strict=True)]  # shard origin
  local = data.shape
  words = _bits(data).reshape(-1, local[-1])  # [rows, last]
  # Global flat index of the first element of each row of the [rows, last] view.
  outer = np.indices(local[:-1]).reshape(len(local) - 1, -1) if len(local) > 1 else None
  base = np.full((words.shape[0],), np.uint64(starts[-1]), np.uint64)
  if outer is not None:
    for d in range(len(local) - 1):
      base += (outer[d].astype(np.uint64) + np.uint64(starts[d])) * strides[d]
  total = int(_mixed_sum(words, base))
  return total & _MASK


def leaf_checksum(x) -> int:
  """The checksum of this process's part of one array (NumPy or jax, any sharding); add the
  processes' values modulo 2**64 for the whole array (`record` does)."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    shape = tuple(x.shape)
    total = 0
    for shard in x.addressable_shards:
      if shard.replica_id == 0:
        total += _shard_sum(np.asarray(shard.data), shard.index, shape)
    return total & _MASK
  x = np.asarray(x)
  return _shard_sum(x, tuple(slice(None) for _ in x.shape), tuple(x.shape))


def _sum_over_processes(values: list[int]) -> list[int]:
  if jax.process_count() == 1 or not values:
    return values
  from jax.experimental import multihost_utils

  # 64-bit sums travel as four 16-bit pieces in int32 (jax runs without x64).
  pieces = np.asarray([[(v >> (16 * k)) & 0xFFFF for k in range(4)] for v in values], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(pieces))  # [processes, leaves, 4]
  out = []
  for leaf in range(len(values)):
    total = sum(
      int(gathered[p, leaf, k]) << (16 * k) for p in range(gathered.shape[0]) for k in range(4)
    )
    out.append(total & _MASK)
  return out


def leaf_paths(tree) -> list[tuple[str, object]]:
  """(path string, leaf) of every leaf, in tree order."""
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def describe(tree) -> dict[str, dict]:
  """{leaf path: {"shape", "dtype"}} of arrays or shape structs (no checksums)."""
  return {
    path: {
      "shape": list(np.shape(x)),
      "dtype": str(np.dtype(getattr(x, "dtype", None) or np.asarray(x).dtype)),
    }
    for path, x in leaf_paths(tree)
  }


def record(tree) -> dict[str, dict]:
  """{leaf path: {"shape", "dtype", "checksum"}} of a pytree of arrays (every process calls
  this; the checksums are of the whole arrays)."""
  paths = leaf_paths(tree)
  sums = _sum_over_processes([leaf_checksum(x) for _, x in paths])
  out = describe(tree)
  for (path, _), s in zip(paths, sums, strict=True):
    out[path]["checksum"] = f"{s:016x}"
  return out


def json_checksum(obj) -> str:
  """sha256 of a JSON-serialisable object in canonical form (sorted keys)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def structure_mismatch(
  saved: dict[str, dict], wanted: dict[str, dict], subset: bool = False
) -> str | None:
  """None if both records have the same leaves (`subset`: the wanted ones are among the saved
  ones) with the same shapes and dtypes; else a sentence naming the first difference."""
  for path in wanted:
    if path not in saved:
      return f"leaf {path} is missing from the checkpoint"
  for path in saved:
    if path not in wanted and not subset:
      return f"the checkpoint has a leaf {path} that this model does not have"
  for path, want in wanted.items():
    got = saved[path]
    if list(got["shape"]) != list(want["shape"]) or got["dtype"] != want["dtype"]:
      return (
        f"leaf {path} is {got['dtype']}{list(got['shape'])} in the checkpoint, "
        f"{want['dtype']}{list(want['shape'])} in this model"
      )
  return None


def first_bad_leaf(saved: dict[str, dict], restored: dict[str, dict]) -> str | None:
  """The path of the first leaf whose checksum differs between two records, or None."""
  for path, want in saved.items():
    if restored.get(path, {}).get("checksum") != want.get("checksum"):
      return path
  return None
