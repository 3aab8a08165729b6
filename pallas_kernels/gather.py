"""Fused multi-head row gather: ids [N, H] + offsets [H] -> rows [N, H, Dh] in one launch.

Every Engram head reads its own slice of one flat table [R, Dh]; head h of token n reads row
`ids[n, h] + offsets[h]`. XLA's gather does this too, but a lookup kernel can keep all heads in
one launch, add the offsets in registers and move each row with wide contiguous loads.

The kernel is written for Pallas's Triton backend. Data-dependent `index_map`s (scalar
prefetch) exist only on TPU, so the table is passed untiled (`pl.BlockSpec(memory_space=
pl.ANY)`) and indexed inside the kernel with the ids it has loaded, the idiom of JAX's GPU
paged-attention op. The (token, head) pairs are flattened to N*H pairs and each program instance
copies a power-of-two block of them; the last block is masked, so N need not be a multiple of the
block. A row is copied as power-of-two column chunks (`common.column_chunks`); Triton's alignment
analysis sees the constant row stride and the 32-byte alignment Pallas declares for its pointers,
so every chunk whose byte size is a multiple of 16 moves as 16-byte vector loads and stores.
Row indices are clamped to [0, R), the semantics of `jnp.take(..., mode='clip')`.

GPU lowering without a GPU (checked with `jax.jit(f).trace(*specs).lower(lowering_platforms=
('cuda',))`): with jaxlib 0.10.2 the Triton backend serialises its Triton IR into the
`__gpu$xla.gpu.triton` custom call and XLA compiles it when the GPU executable is built, so
lowering needs neither a GPU nor CUDA. (Newer jaxlib compiles with `triton.compile` during
lowering, which needs the compilation handler of the CUDA plugin.) Mosaic GPU also lowers on CPU
in 0.10.2, but it moves data as TMA/async tile copies between global and shared memory; a gather
of scattered rows there would be one small copy per row, whereas Triton's tensors of pointers
express a row gather directly. Interpret mode runs the same kernel on CPU for the tests.

Shapes: N tokens (flattened), H heads, R table rows, Dh row width; in the kernel, `block`
(token, head) pairs per program instance and `w` the width of one column chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common


def _gather_kernel(
  ids_ref, offsets_ref, table_ref, out_ref, *, num_pairs, num_heads, num_rows, chunks
):
  """Copies the rows of one block of (token, head) pairs.

  Args:
    ids_ref: [block] block of flat ids.
    offsets_ref: [H] per-head offsets (whole array, in global memory).
    table_ref: [R, Dh] the table (whole array, in global memory).
    out_ref: [block, Dh] block of output rows.
    num_pairs: N*H, the number of valid (token, head) pairs.
    num_heads: H.
    num_rows: R.
    chunks: (start, size) column chunks of a row.
  """
  block = ids_ref.shape[0]
  pair = pl.program_id(0) * block + jax.lax.iota(jnp.int32, block)  # [block]
  valid = pair < num_pairs
  ids = pltriton.load(ids_ref, mask=valid, other=0)
  offsets = pltriton.load(offsets_ref.at[pair % num_heads])  # [H] -> [block]
  rows = jnp.clip(ids + offsets, 0, num_rows - 1)
  for start, size in chunks:
    cols = start + jax.lax.iota(jnp.int32, size)
    values = table_ref[rows[:, None], cols[None, :]]  # [block, 1] x [1, w] -> [block, w]
    pltriton.store(out_ref.at[:, pl.ds(start, size)], values, mask=valid[:, None])


def gather(
  table: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  *,
  block_rows: int | None = None,
  num_warps: int | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """Gathers every head's row with one kernel launch.

  Shapes: N tokens, H heads, R table rows, Dh row width.

  Args:
    table: [R, Dh] the flat table of all heads.
    ids: [N, H] integer row ids, each relative to its head's offset.
    offsets: [H] integer first row of each head.
    block_rows: (token, head) pairs per program instance, a power of two; None picks about
      32 KiB of rows per program.
    num_warps: Triton warps per program instance; None uses the backend default (4).
    interpret: run the kernel in Pallas interpret mode; None interprets unless the default
      backend is a GPU.

  Returns:
    [N, H, Dh] rows `table[ids[n, h] + offsets[h]]` in the table's dtype.
  """
  common.check_table(table)
  common.check_ids(ids, offsets)
  n, h = ids.shape
  num_rows, dh = table.shape
  m = n * h
  if m == 0:
    return jnp.zeros((n, h, dh), table.dtype)
  if block_rows is None:
    block_rows = common.block_rows_for(dh, table.dtype.itemsize, common.GATHER_TILE_BYTES)
  block_rows = common.check_block_rows(block_rows)
  kernel = functools.partial(
    _gather_kernel,
    num_pairs=m,
    num_heads=h,
    num_rows=num_rows,
    chunks=common.column_chunks(dh),
  )
  flat_ids = ids.astype(jnp.int32).reshape(m)  # [N, H] -> [N*H]
  rows = pl.pallas_call(
    kernel,
    grid=(pl.cdiv(m, block_rows),),
    in_specs=[
      pl.BlockSpec((block_rows,), lambda i: (i,)),
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=pl.BlockSpec((block_rows, dh), lambda i: (i, 0)),
    out_shape=jax.ShapeDtypeStruct((m, dh), table.dtype),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=common.resolve_interpret(interpret),
    name="engram_gather",
  )(flat_ids, offsets.astype(jnp.int32), table)
  return rows.reshape(n, h, dh)  # [N*H, Dh] -> [N, H, Dh]


def gather_reference(table: jax.Array, ids: jax.Array, offsets: jax.Array) -> jax.Array:
  """Plain-jnp gather with the kernel's semantics (rows clamped to [0, R)).

  Args:
    table: [R, Dh] the flat table.
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.

  Returns:
    [N, H, Dh] rows.
  """
  common.check_table(table)
  common.check_ids(ids, offsets)
  rows = ids.astype(jnp.int32) + offsets.astype(jnp.int32)[None, :]  # [N, H] + [1, H] -> [N, H]
  return jnp.take(table, rows, axis=0, mode="clip")  # [N, H] -> [N, H, Dh]
