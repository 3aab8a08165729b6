"""The Pallas lookup with its gradient: the gather kernel wired to the deterministic scatter-add.

`jax.grad` through `lookup` gives the dense table gradient from `pallas_kernels.scatter_add`
(distinct rows summed in a fixed order, each row written once) instead of XLA's transpose of the
gather, a scatter-add whose float sums depend on thread timing on a GPU. Ids and offsets are
integers and get no gradient.

Shapes: N tokens, H heads, R table rows, Dh row width.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import common
from pallas_kernels.gather import gather
from pallas_kernels.scatter_add import scatter_add


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _lookup(num_rows, block_rows, num_warps, interpret, table, ids, offsets):
  del num_rows  # Only the backward needs it.
  return gather(
    table, ids, offsets, block_rows=block_rows, num_warps=num_warps, interpret=interpret
  )


def _lookup_fwd(num_rows, block_rows, num_warps, interpret, table, ids, offsets):
  rows = _lookup(num_rows, block_rows, num_warps, interpret, table, ids, offsets)
  return rows, (ids, offsets)


def _lookup_bwd(num_rows, block_rows, num_warps, interpret, residuals, cotangent):
  del block_rows, num_warps  # Gather tiling; the backward picks its own.
  ids, offsets = residuals
  grad = scatter_add(cotangent, ids, offsets, num_rows, interpret=interpret)
  return grad, None, None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def lookup(
  table: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  *,
  block_rows: int | None = None,
  num_warps: int | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """Differentiable fused gather: rows of every head, gradient via the deterministic kernel.

  Shapes: N tokens, H heads, R table rows, Dh row width.

  Args:
    table: [R, Dh] the flat table of all heads.
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.
    block_rows: pairs per program instance of the gather (see `gather`).
    num_warps: Triton warps per program instance of the gather.
    interpret: Pallas interpret mode for both kernels; None interprets unless the default
      backend is a GPU.

  Returns:
    [N, H, Dh] rows; the cotangent flows back to `table` only.
  """
  common.check_table(table)
  common.check_ids(ids, offsets)
  interpret = common.resolve_interpret(interpret)
  return _lookup(table.shape[0], block_rows, num_warps, interpret, table, ids, offsets)
