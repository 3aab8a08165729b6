"""The `device` backend: the whole table is one array in accelerator memory.

`fetch(layout, table, ids)` is a pure function of (table, per-head hash ids), so it runs inside
`jit` and `jax.grad` flows back to the table (or, for the sparse optimizer, to the fetched rows).

The pure-functional core for a jitted train step, on flat row ids (`layout.row_ids`):

    state = device.init(rows)                            # TableState, once, outside jit
    rows = device.lookup(state, ids)                     # in the step: [...] -> [..., Dh]
    ... loss, grads w.r.t. rows ...
    state = device.update(state, ids, row_grads, lr, optim_cfg)   # lazy Adam, in the step

Jit the whole step with the state donated: `update` then rewrites only the touched rows in
place. `DeviceTable` (`memory.create('device', ...)`) wraps the same functions behind the
object interface of `engram_jax.memory.base`; on a CPU client its `fetch` reads the table
through a zero-copy NumPy view with a threaded `np.take` (several times faster than XLA's CPU
gather; `engine='jit'` forces the jitted lookup).

Shapes: R table rows, Dh row width, H heads, N ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import OptimConfig
from engram_jax.memory import base, dispatch
from engram_jax.memory.optimizer import sparse_adam_update
from engram_jax.memory.table import TableLayout

ENGINES = ("auto", "jit", "numpy")


def fetch(
  layout: TableLayout, table: jax.Array, ids: jax.Array, implementation: str = "auto"
) -> jax.Array:
  """Reads every head's row.

  Args:
    layout: the table's head sizes and offsets.
    table: [R, Dh] the layer's flat table.
    ids: [..., H] per-head hash ids (each below its head's size).
    implementation: 'pallas', 'xla' or 'auto' (see `engram_jax.memory.dispatch`).

  Returns:
    [..., H, Dh] rows.
  """
  layout.check_ids(ids)
  if table.shape != (layout.num_rows, layout.dim):
    raise ValueError(
      f"table: expected shape ({layout.num_rows}, {layout.dim}) for this layout, "
      f"got {tuple(table.shape)}"
    )
  return dispatch.lookup(table, ids, layout.offsets, implementation=implementation)


def init(rows, device: jax.Device | None = None, trainable: bool = True) -> base.TableState:
  """A state on one device: the rows [R, Dh] and zero moments (None if not trainable)."""
  table = jax.device_put(rows, device or jax.devices()[0])
  if not trainable:
    return base.TableState(table, None)
  return jax.jit(base.init_state)(table)


def lookup(state: base.TableState, ids: jax.Array, implementation: str = "auto"):
  """Rows of flat row ids (pure; jit it). ids [...] -> rows [..., Dh], clamped to [0, R)."""
  table = state.table
  flat = base.clip_ids(ids, 0, table.shape[0] - 1).reshape(-1, 1)  # [...] -> [N, 1] int32
  rows = dispatch.lookup(
    table, flat, jnp.zeros((1,), jnp.int32), implementation=implementation
  )  # [N, 1, Dh]
  return rows.reshape(*jnp.shape(ids), table.shape[1])  # [N, 1, Dh] -> [..., Dh]


def update(
  state: base.TableState, ids: jax.Array, grads: jax.Array, lr, cfg: OptimConfig
) -> base.TableState:
  """Lazy Adam on the rows `ids` read (pure; jit it with the state donated).

  Args:
    state: the table and its moments.
    ids: [...] flat row ids that were fetched (clamped to [0, R) like the lookup).
    grads: [..., Dh] gradient of the loss w.r.t. each fetched row.
    lr: scalar learning rate.
    cfg: Adam's b1, b2, eps.

  Returns:
    The new state.
  """
  r, dh = state.table.shape
  flat = base.clip_ids(ids, 0, r - 1).reshape(-1)  # [...] -> [N] int32
  table, opt = sparse_adam_update(
    state.table,
    state.opt,
    flat,
    grads.reshape(-1, dh),
    lr,
    cfg,  # [..., Dh] -> [N, Dh]
  )
  return base.TableState(table, opt)


_jit_lookup = jax.jit(lookup, static_argnames="implementation")
_jit_update = jax.jit(update, static_argnames="cfg", donate_argnums=0)


class DeviceTable(base.MemoryTable):
  """The whole table in one device's memory (`memory.create('device', ...)`).

  Options:
    device: the jax device (default: the first).
    engine: 'jit' (the jitted `lookup`: Pallas on a GPU, XLA elsewhere), 'numpy' (a threaded
      NumPy gather through a zero-copy view: CPU clients only) or 'auto' (numpy where a
      zero-copy view exists, else jit).
    implementation: the lookup implementation of the jit engine (see `dispatch`).
    threads: threads of the NumPy gather (default: the CPU count).
    trainable: False keeps no moments (inference).
    out_of_range: 'clamp' (default) or 'raise' for ids outside [0, R) (`base.prepare_ids`).
  """

  kind = "device"

  def __init__(
    self,
    num_rows: int,
    dim: int,
    dtype=jnp.float32,
    seed: int = 0,
    rows=None,
    *,
    init_std: float = 1.0,
    device: jax.Device | None = None,
    engine: str = "auto",
    implementation: str = "auto",
    threads: int | None = None,
    trainable: bool = True,
    out_of_range: str = "clamp",
  ):
    super().__init__(num_rows, dim, dtype, out_of_range)
    if engine not in ENGINES:
      raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if rows is None:
      rows = base.init_rows(num_rows, dim, seed, init_std=init_std, dtype=self.dtype)
    if tuple(rows.shape) != (num_rows, dim):
      raise ValueError(f"rows: expected shape {(num_rows, dim)}, got {tuple(rows.shape)}")
    self.device = device or jax.devices()[0]
    xp = np if isinstance(rows, np.ndarray) else jnp
    self.state = init(xp.asarray(rows, self.dtype), self.device, trainable)
    self._implementation = implementation
    self._threads = threads
    self._buffers = base.OutputBuffers()
    self.engine = engine
    if engine == "numpy" and base.numpy_view(self.state.table) is None:
      raise ValueError("engine='numpy': this device's memory has no zero-copy NumPy view")
    if engine == "auto":
      self.engine = "numpy" if base.numpy_view(self.state.table) is not None else "jit"

  def fetch(self, ids) -> jax.Array:
    ids = self._ids(ids)  # [...] int32 in [0, R)
    if self.engine == "numpy":
      view = base.numpy_view(jax.block_until_ready(self.state.table))
      rows = base.host_fetch(view, ids, self._buffers, self.device, self._threads)
    else:
      rows = _jit_lookup(self.state, jnp.asarray(ids), implementation=self._implementation)
    self._count_fetch(int(np.prod(np.shape(ids))))
    return rows

  def apply_gradients(self, ids, grads, lr, optim_cfg: OptimConfig) -> None:
    ids = self._ids(ids)  # [...] int32 in [0, R)
    base.check_grads(ids, grads, self.dim)
    if self.state.opt is None:
      raise ValueError("apply_gradients: this table was created with trainable=False")
    self.state = _jit_update(
      self.state, jnp.asarray(ids), jnp.asarray(grads), jnp.float32(lr), optim_cfg
    )
    self._count_update(int(np.prod(np.shape(ids))))

  def _arrays(self) -> dict:
    return base.state_items(self.state)
