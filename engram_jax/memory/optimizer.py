"""The Engram tables' optimizer: a sparse ("lazy") Adam on the rows a step read.

optax's Adam is dense and would touch all 10^9 rows of a table every step, so the tables get
their own update: deduplicate the fetched row ids (`dedup`), sum their gradients (`dedup_sum`),
then Adam on those rows only, at the backbone's rate times `engram_lr_mult` (x5 in the paper),
no weight decay (paper Table 5). Every backend's update goes through these functions.

Shapes: R table rows of one Engram layer, Dh row width, N fetched rows (B * T * H, repeats
allowed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from engram_jax.config import OptimConfig
from engram_jax.memory.dispatch import resolve_implementation
from pallas_kernels.scatter_add import sparse_row_grads


def dedup(ids: jax.Array, fill: int) -> tuple[jax.Array, jax.Array]:
  """The distinct ids and where each id went (pure; jit it).

  Args:
    ids: [N] integer ids, repeats allowed.
    fill: the padding id (at least every real id, so the sorted order still holds).

  Returns:
    (unique [N] sorted distinct ids padded with `fill`, slot [N] the index of each id in
    `unique`).
  """
  n = ids.shape[0]
  unique, slot = jnp.unique(ids, size=n, fill_value=fill, return_inverse=True)
  return unique, slot.reshape(n)


def dedup_sum(ids: jax.Array, values: jax.Array, fill: int, implementation: str = "auto"):
  """The distinct ids and the float32 sum of the values of each.

  'xla': `dedup` plus `segment_sum`, a scatter-add (on a GPU its atomics add in whatever order
  the threads arrive, so the float sums vary from run to run). 'pallas': the sort-and-sum kernel
  `pallas_kernels.sparse_row_grads`, which sums each id's values in their order (bitwise
  reproducible). 'auto' is Pallas on a GPU (`memory.dispatch.resolve_implementation`).

  Args:
    ids: [N] integer ids in [0, fill] (`fill` marks an empty place; it is never merged with a
      real id and the update's scatters drop it).
    values: [N, Dh] one row per id (e.g. the gradients of the fetched rows).
    fill: the padding id.
    implementation: 'pallas', 'xla' or 'auto'.

  Returns:
    (unique [N] ascending distinct ids padded with `fill`, sums [N, Dh]: row i sums the values
    of the ids equal to unique[i], `fill` too (callers give those zeros); padding rows are
    zero).
  """
  n, dh = values.shape
  if resolve_implementation(implementation) == "xla":
    unique, slot = dedup(ids, fill)
    return unique, jax.ops.segment_sum(values.astype(jnp.float32), slot, num_segments=n)
  # One head at offset 0 over fill + 1 rows: `fill` is a row of its own.
  got = sparse_row_grads(
    values.reshape(n, 1, dh),  # [N, Dh] -> [N, 1, Dh]
    ids.reshape(n, 1),
    jnp.zeros((1,), jnp.int32),
    fill + 1,
    dtype=jnp.float32,
  )
  return jnp.minimum(got.rows, fill), got.grads  # unused slots (row fill + 1) -> fill


class TableOptState(NamedTuple):
  """Sparse Adam state of one Engram table.

  Attributes:
    mu: [R, Dh] float32 first moments.
    nu: [R, Dh] float32 second moments.
    count: int32 scalar, updates taken (the bias correction's step).
  """

  mu: jax.Array
  nu: jax.Array
  count: jax.Array


def init_table_state(table: jax.Array) -> TableOptState:
  """Zero moments for a table [R, Dh] (float32 whatever the table's dtype)."""
  zeros = jnp.zeros(table.shape, jnp.float32)
  return TableOptState(mu=zeros, nu=zeros, count=jnp.zeros((), jnp.int32))


def sparse_adam_update(
  table: jax.Array,
  state: TableOptState,
  row_ids: jax.Array,
  row_grads: jax.Array,
  lr,
  cfg: OptimConfig,
  implementation: str = "auto",
) -> tuple[jax.Array, TableOptState]:
  """Adam on the rows that were read; every other row and its moments stay as they are.

  This is LazyAdam: a row's moments decay only on the steps that touch it, while the bias
  correction uses the global step count. No weight decay (paper Table 5).

  Args:
    table: [R, Dh] the table (any float dtype; the update is computed in float32).
    state: its `TableOptState`.
    row_ids: [N] int32 flat row ids that were fetched, repeats allowed.
    row_grads: [N, Dh] gradient of the loss w.r.t. each fetched row.
    lr: scalar learning rate (the backbone's schedule times `cfg.engram_lr_mult`).
    cfg: supplies adam_b1, adam_b2, adam_eps.
    implementation: how the gradients of repeated ids are summed (`dedup_sum`).

  Returns:
    (the updated table [R, Dh] in its dtype, the new state).
  """
  r, dh = table.shape
  n = row_ids.shape[0]
  if row_grads.shape != (n, dh):
    raise ValueError(f"row_grads: expected shape {(n, dh)}, got {row_grads.shape}")
  # [N] -> [N] sorted unique ids padded with R (out of range, so the scatters drop them);
  # [N, Dh] -> [N, Dh]: a row read several times gets the sum of its gradients.
  unique, g = dedup_sum(row_ids, row_grads, r, implementation)

  count = state.count + 1
  b1, b2 = cfg.adam_b1, cfg.adam_b2
  # [R, Dh] -> [N, Dh]; padding slots read zeros and are dropped below.
  mu = b1 * state.mu.at[unique].get(mode="fill", fill_value=0) + (1 - b1) * g
  nu = b2 * state.nu.at[unique].get(mode="fill", fill_value=0) + (1 - b2) * g * g
  t = count.astype(jnp.float32)
  mu_hat = mu / (1 - jnp.float32(b1) ** t)
  nu_hat = nu / (1 - jnp.float32(b2) ** t)
  step = jnp.asarray(lr, jnp.float32) * mu_hat / (jnp.sqrt(nu_hat) + cfg.adam_eps)
  rows = table.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32)

  def scatter(dest, values):
    # Sorted ids; the padding ids are >= every real one, so the order still holds.
    return dest.at[unique].set(values.astype(dest.dtype), mode="drop", indices_are_sorted=True)

  new_state = TableOptState(mu=scatter(state.mu, mu), nu=scatter(state.nu, nu), count=count)
  return scatter(table, rows - step), new_state
