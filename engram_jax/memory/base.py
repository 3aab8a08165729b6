"""What every table backend shares: the interface, the state, the statistics.

A table object (`engram_jax.memory.create(kind, ...)`) holds one flat table [R, Dh] and its
sparse Adam moments wherever its backend keeps them, and answers:

- `fetch(ids) -> rows [..., Dh]`: ids are flat row ids of any shape (per-head offsets are the
  `TableLayout`'s job: `layout.row_ids(hash_ids)`);
- `apply_gradients(ids, grads, lr, optim_cfg)`: lazy Adam on the rows `ids` touched
  (`engram_jax.memory.optimizer.sparse_adam_update` semantics);
- `stats()`: fetches, rows, bytes moved, hit rates where they apply.

Each backend module also has a pure-functional core for a jitted train step; see its docstring.

Out-of-range ids follow one rule on every backend (`memory.validation`): clamped to [0, R), or
rejected by a table created with `out_of_range='raise'`. Host gathers and their reused buffers
are `memory.host_buffers`.

Shapes: R table rows, Rp padded rows (R rounded up by a backend), Dh row width, N fetched ids
(repeats allowed).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import OptimConfig
from engram_jax.memory.optimizer import TableOptState, init_table_state
from engram_jax.memory.validation import check_out_of_range, prepare_ids

# Rows drawn per random block by `init_rows`: any row range can be generated on its own.
INIT_BLOCK_ROWS = 1 << 16


class TableState(NamedTuple):
  """A table and its sparse Adam state: the pytree the pure-functional cores pass around.

  Attributes:
    table: [R, Dh] rows (a backend may pad them to [Rp, Dh], e.g. to a multiple of the shards).
    opt: the moments `TableOptState(mu [R, Dh], nu [R, Dh], count [])`, or None for a
      read-only table.
  """

  table: jax.Array
  opt: TableOptState | None


def padded_rows(num_rows: int, multiple: int) -> int:
  """R rounded up to a multiple of `multiple` (the shards, or the alignment every backend's
  training state shares); padding rows are never addressed."""
  return -(-num_rows // multiple) * multiple


def init_state(table: jax.Array) -> TableState:
  """A state with zero moments (placed where the caller's jit or `device_put` puts them)."""
  return TableState(table, init_table_state(table))


def state_items(state: TableState) -> dict:
  """The arrays of a state under their checkpoint names: table (and mu, nu, count)."""
  items = {"table": state.table}
  return items | state.opt._asdict() if state.opt is not None else items


def init_rows(
  num_rows: int,
  dim: int,
  seed: int,
  *,
  init_std: float = 1.0,
  start: int = 0,
  stop: int | None = None,
  dtype=np.float32,
) -> np.ndarray:
  """Rows [start, stop) of a normally initialised table, identical for every backend.

  Block b of `INIT_BLOCK_ROWS` rows is drawn from `np.random.default_rng((seed, b))`, so a
  shard or a chunk can be generated without the rest of the table.

  Returns:
    [stop - start, Dh] NumPy rows in `dtype`.
  """
  stop = num_rows if stop is None else stop
  if not 0 <= start <= stop <= num_rows:
    raise ValueError(f"rows [{start}, {stop}): expected a range inside [0, {num_rows})")
  out = np.empty((stop - start, dim), dtype)
  for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
    lo = block * INIT_BLOCK_ROWS
    hi = min(lo + INIT_BLOCK_ROWS, num_rows)
    rows = np.random.default_rng((seed, block)).standard_normal((hi - lo, dim), np.float32)
    a, b = max(lo, start), min(hi, stop)
    out[a - start : b - start] = (init_std * rows[a - lo : b - lo]).astype(dtype)
  return out


@dataclasses.dataclass
class Stats:
  """Counters of one table object since creation or `reset_stats()`.

  Attributes:
    fetches: `fetch` calls.
    rows_fetched: ids fetched (repeats counted).
    bytes_fetched: bytes of the rows returned.
    bytes_to_device: bytes that crossed from host memory into device memory (host, tiered).
    bytes_exchanged: bytes sent between devices by the sharded exchange (ids, rows, grads).
    hits / misses: ids served from the device cache / from the tier below (tiered).
    updates: `apply_gradients` calls.
    rows_updated: ids passed to `apply_gradients` (repeats counted).
  """

  fetches: int = 0
  rows_fetched: int = 0
  bytes_fetched: int = 0
  bytes_to_device: int = 0
  bytes_exchanged: int = 0
  hits: int = 0
  misses: int = 0
  updates: int = 0
  rows_updated: int = 0

  def as_dict(self) -> dict:
    """The counters plus `hit_rate` (hits / (hits + misses); None before any tiered fetch)."""
    out = dataclasses.asdict(self)
    total = self.hits + self.misses
    out["hit_rate"] = self.hits / total if total else None
    return out


class MemoryTable(abc.ABC):
  """The interface of every backend (see the module docstring).

  Attributes:
    kind: the backend's name, one of `engram_jax.config.MEMORY_KINDS`.
    num_rows: R.
    dim: Dh.
    dtype: dtype of the rows `fetch` returns.
    out_of_range: 'clamp' or 'raise': what `fetch` and `apply_gradients` do with ids outside
      [0, R) (`prepare_ids`).
  """

  kind: str = ""

  def __init__(self, num_rows: int, dim: int, dtype, out_of_range: str = "clamp"):
    if not isinstance(num_rows, int) or num_rows < 1:
      raise ValueError(f"num_rows: expected an int >= 1, got {num_rows!r}")
    if not isinstance(dim, int) or dim < 1:
      raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
    if num_rows >= 2**31:
      raise ValueError(f"num_rows: expected fewer than 2**31 rows (int32 ids), got {num_rows}")
    self.num_rows, self.dim, self.dtype = num_rows, dim, jnp.dtype(dtype)
    self.out_of_range = check_out_of_range(out_of_range)
    self._stats = Stats()

  def _ids(self, ids) -> np.ndarray | jax.Array:
    """`prepare_ids` with this table's R and `out_of_range`: int32 ids in [0, R)."""
    return prepare_ids(ids, self.num_rows, self.out_of_range)

  @abc.abstractmethod
  def fetch(self, ids) -> jax.Array:
    """Rows [..., Dh] (in `dtype`) of the flat row ids [...]."""

  @abc.abstractmethod
  def apply_gradients(self, ids, grads, lr, optim_cfg: OptimConfig) -> None:
    """Lazy Adam on the rows read: ids [...] with their gradients [..., Dh] (repeats summed)."""

  @abc.abstractmethod
  def _arrays(self) -> dict:
    """{"table": [R or Rp, Dh] (decoded to `dtype`), and "mu", "nu", "count" if trainable}."""

  def rows(self) -> np.ndarray:
    """The whole table [R, Dh] in `dtype` as a NumPy array (for tests and conversions)."""
    return np.asarray(self._arrays()["table"])[: self.num_rows]

  def stats(self) -> dict:
    """The counters of `Stats` as a dict, with `hit_rate`."""
    return self._stats.as_dict()

  def reset_stats(self) -> None:
    self._stats = Stats()

  def _count_fetch(self, n: int, to_device: int = 0) -> None:
    self._stats.fetches += 1
    self._stats.rows_fetched += n
    self._stats.bytes_fetched += n * self.dim * self.dtype.itemsize
    self._stats.bytes_to_device += to_device

  def _count_update(self, n: int) -> None:
    self._stats.updates += 1
    self._stats.rows_updated += n
