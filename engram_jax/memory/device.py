"""The `device` backend: the whole table is one array in accelerator memory.

`fetch(layout, table, ids)` is a pure function of (table, per-head hash ids), so it runs inside
`jit` and `jax.grad` flows back to the table (or, for the sparse optimizer, to the fetched rows).

The pure-functional core for a jitted train step, on flat row ids (`layout.row_ids`):

    state = device.init(rows)                            # TableState, once, outside jit
    rows = device.lookup(state, ids)                     # in the step: [...] -> [..., Dh]
    ... loss, grads w.r.t. rows ...
    state = device.update(state, ids, row_grads, lr, optim_cfg)   # lazy Adam, in the step

Jit the whole step with the state donated: `update` then rewrites only the touched rows in
place. The table object of `memory.create('device', ...)` runs the same functions (through
`memory.backends`); on a CPU client its `fetch` reads the table through a zero-copy NumPy view
with a threaded `np.take` (several times faster than XLA's CPU gather; `engine='jit'` forces
the jitted lookup).

Shapes: R table rows, Dh row width, H heads, N ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engram_jax.config import OptimConfig
from engram_jax.memory import base, dispatch, validation
from engram_jax.memory.optimizer import sparse_adam_update
from engram_jax.memory.table import TableLayout


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
  flat = validation.clip_ids(ids, 0, table.shape[0] - 1).reshape(-1, 1)  # [...] -> [N, 1] int32
  rows = dispatch.lookup(
    table, flat, jnp.zeros((1,), jnp.int32), implementation=implementation
  )  # [N, 1, Dh]
  return rows.reshape(*jnp.shape(ids), table.shape[1])  # [N, 1, Dh] -> [..., Dh]


def update(
  state: base.TableState,
  ids: jax.Array,
  grads: jax.Array,
  lr,
  cfg: OptimConfig,
  implementation: str = "auto",
) -> base.TableState:
  """Lazy Adam on the rows `ids` read (pure; jit it with the state donated).

  Args:
    state: the table and its moments.
    ids: [...] flat row ids that were fetched (clamped to [0, R) like the lookup).
    grads: [..., Dh] gradient of the loss w.r.t. each fetched row.
    lr: scalar learning rate.
    cfg: Adam's b1, b2, eps.
    implementation: how repeated ids' gradients are summed (`optimizer.dedup_sum`).

  Returns:
    The new state.
  """
  r, dh = state.table.shape
  flat = validation.clip_ids(ids, 0, r - 1).reshape(-1)  # [...] -> [N] int32
  table, opt = sparse_adam_update(
    state.table,
    state.opt,
    flat,
    grads.reshape(-1, dh),
    lr,
    cfg,  # [..., Dh] -> [N, Dh]
    implementation,
  )
  return base.TableState(table, opt)
