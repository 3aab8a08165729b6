"""Pallas kernels for the Engram lookup: fused multi-head gather and deterministic scatter-add.

Each kernel module holds the kernel, a wrapper over `pl.pallas_call(..., interpret=...)` and a
plain-jnp reference; `lookup` wires the two with `jax.custom_vjp`.
"""

from pallas_kernels.gather import gather, gather_reference
from pallas_kernels.lookup import lookup
from pallas_kernels.scatter_add import (
  RowRuns,
  SparseRowGrads,
  row_runs,
  scatter_add,
  scatter_add_reference,
  sparse_row_grads,
  sparse_row_grads_reference,
)

__all__ = [
  "RowRuns",
  "SparseRowGrads",
  "gather",
  "gather_reference",
  "lookup",
  "row_runs",
  "scatter_add",
  "scatter_add_reference",
  "sparse_row_grads",
  "sparse_row_grads_reference",
]
