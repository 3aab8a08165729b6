"""The `device` backend: the whole table is one array in accelerator memory.

`fetch` is a pure function of (table, ids), so it runs inside `jit` and `jax.grad` flows back to
the table (or, for the sparse optimizer, to the fetched rows).
"""

from __future__ import annotations

import jax

from engram_jax.memory import dispatch
from engram_jax.memory.table import TableLayout


def fetch(
    layout: TableLayout, table: jax.Array, ids: jax.Array, implementation: str | None = None
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
