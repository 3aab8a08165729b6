"""Deterministic backward of the lookup: row cotangents [N, H, Dh] -> table gradient [R, Dh].

A scatter-add with atomics sums repeated rows in whatever order the threads arrive, so float
gradients change from run to run (and Pallas interpret mode gets repeated-id atomics wrong, jax
issue 24117). Instead:

1. XLA sorts the flat row ids `ids + offsets` (a stable sort, so equal rows keep token order) and
   finds the run of each distinct row: `row_runs`.
2. A Pallas kernel gives each distinct row one lane. The lane walks its run in order, sums the
   cotangent rows in float32 and writes the sum once: into the zero-initialised table gradient
   (`scatter_add`, for `jax.grad`), or into a compact [N*H, Dh] array (`sparse_row_grads`, the
   unique ids + summed gradients + valid mask that the sparse table optimizer consumes).

No row is written twice and every sum has a fixed order, so the result is bitwise reproducible.
A program instance loops as long as the longest run in its block, so a very hot row (Zipf ids)
costs one long serial loop for its block only.

Like the gather, the kernel targets Pallas's Triton backend (see `pallas_kernels.gather` for
why, and for the GPU-lowering finding); the cotangent and the output are untiled
(`memory_space=pl.ANY`) and addressed with indices loaded in the kernel.

Shapes: N tokens, H heads, R table rows, Dh row width; N*H is also the number of distinct-row
slots (the most a lookup can touch); in the kernel, `block` slots per program instance and `w`
the width of one column chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common


class RowRuns(NamedTuple):
  """The distinct rows of a lookup and where their cotangents sit.

  Attributes:
    order: [N*H] int32 flat (token, head) positions sorted by row, ties in position order.
    starts: [N*H] int32 first index into `order` of each distinct row; N*H past `count`.
    lengths: [N*H] int32 how many pairs read each distinct row; 0 past `count`.
    rows: [N*H] int32 distinct rows in ascending order; R past `count`.
    count: [] int32 number of distinct rows.
  """

  order: jax.Array
  starts: jax.Array
  lengths: jax.Array
  rows: jax.Array
  count: jax.Array


class SparseRowGrads(NamedTuple):
  """Gradient of the table restricted to the rows a lookup touched.

  Attributes:
    rows: [N*H] int32 distinct rows, ascending; R (one past the table) in unused slots.
    grads: [N*H, Dh] summed cotangent of each row; zeros in unused slots.
    valid: [N*H] bool, True for the first `count` slots.
    count: [] int32 number of distinct rows.
  """

  rows: jax.Array
  grads: jax.Array
  valid: jax.Array
  count: jax.Array


def _flat_rows(ids: jax.Array, offsets: jax.Array, num_rows: int) -> jax.Array:
  """[N, H] ids + [H] offsets -> [N*H] rows clamped to [0, R) like the forward gather."""
  rows = ids.astype(jnp.int32) + offsets.astype(jnp.int32)[None, :]  # [N, H] + [1, H] -> [N, H]
  return jnp.clip(rows, 0, num_rows - 1).reshape(-1)  # [N, H] -> [N*H]


def row_runs(ids: jax.Array, offsets: jax.Array, num_rows: int) -> RowRuns:
  """Sorts the flat rows of a lookup and finds the run of each distinct row.

  Args:
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.
    num_rows: R, rows in the table.

  Returns:
    The runs, with N*H slots.
  """
  rows = _flat_rows(ids, offsets, num_rows)
  m = rows.shape[0]
  positions = jnp.arange(m, dtype=jnp.int32)
  sorted_rows, order = jax.lax.sort((rows, positions), num_keys=1, is_stable=True)
  is_start = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])
  count = jnp.sum(is_start, dtype=jnp.int32)
  (starts,) = jnp.nonzero(is_start, size=m, fill_value=m)
  starts = starts.astype(jnp.int32)
  lengths = jnp.concatenate([starts[1:], jnp.full((1,), m, jnp.int32)]) - starts
  valid = positions < count
  distinct = jnp.where(valid, sorted_rows[jnp.minimum(starts, m - 1)], num_rows)
  return RowRuns(order, starts, lengths, distinct.astype(jnp.int32), count)


def _reduce_kernel(
  starts_ref, lengths_ref, dest_ref, order_ref, cot_ref, init_ref, out_ref, *, num_slots, chunks
):
  """Sums the cotangent rows of one block of distinct rows and writes each sum once.

  Args:
    starts_ref: [block] block of run starts.
    lengths_ref: [block] block of run lengths.
    dest_ref: [block] block of output rows to write.
    order_ref: [N*H] sorted flat positions (whole array).
    cot_ref: [N*H, Dh] flat cotangent (whole array).
    init_ref: [R or N*H, Dh] zeros, aliased with `out_ref`.
    out_ref: [R or N*H, Dh] output (whole array): R rows for the dense gradient, N*H compact.
    num_slots: N*H, the distinct-row slots.
    chunks: (start, size) column chunks of a row.
  """
  del init_ref  # The same buffer as out_ref: rows nobody writes stay zero.
  block = starts_ref.shape[0]
  slot = pl.program_id(0) * block + jax.lax.iota(jnp.int32, block)  # [block]
  in_range = slot < num_slots
  starts = pltriton.load(starts_ref, mask=in_range, other=0)
  lengths = pltriton.load(lengths_ref, mask=in_range, other=0)
  write = lengths > 0
  # Lanes that write nothing aim one past the output, so no two lanes ever share a row.
  dest = jnp.where(write, pltriton.load(dest_ref, mask=in_range, other=0), out_ref.shape[0])
  cols = [start + jax.lax.iota(jnp.int32, size) for start, size in chunks]

  def add_one(j, sums):
    take = j < lengths  # [block]
    src = pltriton.load(order_ref.at[starts + j], mask=take, other=0)  # [block]
    new_sums = []
    for total, c in zip(sums, cols, strict=True):
      # [block, 1] x [1, w] -> [block, w]
      row = pltriton.load(cot_ref.at[src[:, None], c[None, :]], mask=take[:, None], other=0)
      new_sums.append(total + row.astype(jnp.float32))
    return tuple(new_sums)

  zeros = tuple(jnp.zeros((block, size), jnp.float32) for _, size in chunks)
  sums = jax.lax.fori_loop(0, jnp.max(lengths), add_one, zeros)
  for total, c in zip(sums, cols, strict=True):
    pltriton.store(
      out_ref.at[dest[:, None], c[None, :]], total.astype(out_ref.dtype), mask=write[:, None]
    )


def _reduce_rows(
  cotangent: jax.Array,
  runs: RowRuns,
  dest: jax.Array,
  num_out: int,
  dtype: jnp.dtype,
  block_rows: int | None,
  interpret: bool | None,
) -> jax.Array:
  """[N*H, Dh] cotangent -> [R or N*H, Dh], row dest[u] = the sum of run u (zeros elsewhere)."""
  _, dh = cotangent.shape
  if block_rows is None:
    block_rows = common.block_rows_for(dh, 4, common.REDUCE_TILE_BYTES)
  block_rows = common.check_block_rows(block_rows)
  num_slots = runs.starts.shape[0]
  slot_spec = pl.BlockSpec((block_rows,), lambda i: (i,))
  whole = pl.BlockSpec(memory_space=pl.ANY)
  kernel = functools.partial(_reduce_kernel, num_slots=num_slots, chunks=common.column_chunks(dh))
  return pl.pallas_call(
    kernel,
    grid=(pl.cdiv(num_slots, block_rows),),
    in_specs=[slot_spec, slot_spec, slot_spec, whole, whole, whole],
    out_specs=whole,
    out_shape=jax.ShapeDtypeStruct((num_out, dh), dtype),
    input_output_aliases={5: 0},
    compiler_params=pltriton.CompilerParams(num_stages=1),
    interpret=common.resolve_interpret(interpret),
    name="engram_row_sum",
  )(runs.starts, runs.lengths, dest, runs.order, cotangent, jnp.zeros((num_out, dh), dtype))


def _check_cotangent(cotangent: jax.Array, ids: jax.Array, offsets: jax.Array) -> None:
  common.check_ids(ids, offsets)
  if cotangent.ndim != 3 or cotangent.shape[:2] != ids.shape:
    raise ValueError(
      f"cotangent: expected shape [N, H, Dh] with [N, H] = {tuple(ids.shape)}, "
      f"got {tuple(cotangent.shape)}"
    )


def scatter_add(
  cotangent: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  num_rows: int,
  *,
  block_rows: int | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """Dense table gradient of a lookup, summed deterministically.

  Shapes: N tokens, H heads, R table rows, Dh row width.

  Args:
    cotangent: [N, H, Dh] cotangent of the gathered rows.
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.
    num_rows: R, rows in the table.
    block_rows: distinct rows per program instance, a power of two; None picks a tile of about
      8 KiB of float32 sums.
    interpret: run in Pallas interpret mode; None interprets unless the backend is a GPU.

  Returns:
    [R, Dh] gradient in the cotangent's dtype (sums accumulate in float32).
  """
  _check_cotangent(cotangent, ids, offsets)
  n, h, dh = cotangent.shape
  if n * h == 0:
    return jnp.zeros((num_rows, dh), cotangent.dtype)
  runs = row_runs(ids, offsets, num_rows)
  flat = cotangent.reshape(n * h, dh)  # [N, H, Dh] -> [N*H, Dh]
  return _reduce_rows(flat, runs, runs.rows, num_rows, cotangent.dtype, block_rows, interpret)


def sparse_row_grads(
  cotangent: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  num_rows: int,
  *,
  dtype: jnp.dtype | None = None,
  block_rows: int | None = None,
  interpret: bool | None = None,
) -> SparseRowGrads:
  """Table gradient restricted to the touched rows: distinct rows and their summed cotangents.

  Shapes: N tokens, H heads, Dh row width; N*H distinct-row slots.

  Args:
    cotangent: [N, H, Dh] cotangent of the gathered rows.
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.
    num_rows: R, rows in the table (the fill value of unused slots).
    dtype: dtype of the sums; None keeps the cotangent's dtype (sums accumulate in float32).
    block_rows: distinct rows per program instance, a power of two (None: automatic).
    interpret: run in Pallas interpret mode; None interprets unless the backend is a GPU.

  Returns:
    rows [N*H], grads [N*H, Dh], valid [N*H] and count [] (see `SparseRowGrads`).
  """
  _check_cotangent(cotangent, ids, offsets)
  n, h, dh = cotangent.shape
  dtype = jnp.dtype(cotangent.dtype if dtype is None else dtype)
  runs = row_runs(ids, offsets, num_rows)
  slots = jnp.arange(n * h, dtype=jnp.int32)
  if n * h == 0:
    grads = jnp.zeros((0, dh), dtype)
  else:
    flat = cotangent.reshape(n * h, dh)  # [N, H, Dh] -> [N*H, Dh]
    grads = _reduce_rows(flat, runs, slots, n * h, dtype, block_rows, interpret)
  return SparseRowGrads(runs.rows, grads, slots < runs.count, runs.count)


def scatter_add_reference(
  cotangent: jax.Array, ids: jax.Array, offsets: jax.Array, num_rows: int
) -> jax.Array:
  """Plain-jnp dense table gradient (float32 scatter-add, then the cotangent's dtype).

  Args:
    cotangent: [N, H, Dh] cotangent of the gathered rows.
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.
    num_rows: R, rows in the table.

  Returns:
    [R, Dh] gradient.
  """
  _check_cotangent(cotangent, ids, offsets)
  n, h, dh = cotangent.shape
  rows = _flat_rows(ids, offsets, num_rows)
  flat = cotangent.reshape(n * h, dh).astype(jnp.float32)  # [N, H, Dh] -> [N*H, Dh]
  grad = jnp.zeros((num_rows, dh), jnp.float32).at[rows].add(flat)
  return grad.astype(cotangent.dtype)


def sparse_row_grads_reference(
  cotangent: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  num_rows: int,
  dtype: jnp.dtype | None = None,
) -> SparseRowGrads:
  """Plain-jnp sparse gradient: `jnp.unique(size=N*H)` + `jax.ops.segment_sum`.

  Args:
    cotangent: [N, H, Dh] cotangent of the gathered rows.
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.
    num_rows: R, rows in the table (the fill value of unused slots).
    dtype: dtype of the sums; None keeps the cotangent's dtype.

  Returns:
    The same fields as `sparse_row_grads`.
  """
  _check_cotangent(cotangent, ids, offsets)
  n, h, dh = cotangent.shape
  m = n * h
  rows = _flat_rows(ids, offsets, num_rows)
  distinct, inverse = jnp.unique(rows, size=m, fill_value=num_rows, return_inverse=True)
  flat = cotangent.reshape(m, dh).astype(jnp.float32)  # [N, H, Dh] -> [N*H, Dh]
  # [N*H, Dh] -> [N*H, Dh]: one sum per distinct-row slot.
  sums = jax.ops.segment_sum(flat, inverse.reshape(m), num_segments=m)
  valid = distinct < num_rows
  dtype = cotangent.dtype if dtype is None else dtype
  return SparseRowGrads(
    distinct.astype(jnp.int32), sums.astype(dtype), valid, jnp.sum(valid, dtype=jnp.int32)
  )
