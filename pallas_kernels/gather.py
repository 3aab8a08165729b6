"""Fused multi-head row gather with decoding: ids [N, H] + offsets [H] -> rows [N, H, Dh].

Every Engram head reads its own slice of one flat table [R, Dh]; head h of token n reads row
`ids[n, h] + offsets[h]`. XLA's gather does this too, but a lookup kernel keeps all heads in one
launch, adds the offsets in registers, moves each row with wide contiguous loads and decodes the
stored row into the compute dtype before it leaves the registers, so a compact storage type is
read once and written once, never materialised in between. One kernel serves every storage
type (`STORAGES`):

- 'float32', 'bfloat16' (and any float table): the stored values, cast to the output dtype;
- 'int8': int8 values with one float32 scale per row: `values * scale[row]`;
- 'mxfp8': float8_e4m3fn values with one E8M0 exponent byte per 32 columns (the released
  DeepSeek-V4.1 tables): `e4m3(value) * 2 ** (e - 127)`, computed in float32 and then cast.
  E8M0 is an exponent alone: byte 0 is 2**-127, byte 255 is NaN. Results below float32's normal
  range (2**-126) follow the platform's rule for subnormals (XLA:CPU flushes them to zero).

`gather(table, ids, offsets)` is the plain copy (the output in the table's dtype), the lookup of
the trainable tables; `gather_decode` adds the storage type and the output dtype; `decode` is the
same kernel over packed rows that already arrived (row i of the output is stored row i).

The kernel is written for Pallas's Triton backend. Data-dependent `index_map`s (scalar
prefetch) exist only on TPU, so the table is passed untiled (`pl.BlockSpec(memory_space=
pl.ANY)`) and indexed inside the kernel with the ids it has loaded, the idiom of JAX's GPU
paged-attention op. The (token, head) pairs are flattened to N*H pairs and each program instance
copies a power-of-two block of them; the last block is masked, so N need not be a multiple of the
block. A row is copied as power-of-two column chunks (`common.column_chunks`; for 'mxfp8' the
32-column blocks of one scale each); Triton's alignment analysis sees the constant row stride and
the 32-byte alignment Pallas declares for its pointers, so every chunk whose byte size is a
multiple of 16 moves as 16-byte vector loads and stores. Row indices are clamped to [0, R), the
semantics of `jnp.take(..., mode='clip')`.

GPU lowering without a GPU (checked with `jax.jit(f).trace(*specs).lower(lowering_platforms=
('cuda',))`): with jaxlib 0.10.2 the Triton backend serialises its Triton IR into the
`__gpu$xla.gpu.triton` custom call and XLA compiles it when the GPU executable is built, so
lowering needs neither a GPU nor CUDA. (Newer jaxlib compiles with `triton.compile` during
lowering, which needs the compilation handler of the CUDA plugin.) Mosaic GPU also lowers on CPU
in 0.10.2, but it moves data as TMA/async tile copies between global and shared memory; a gather
of scattered rows there would be one small copy per row, whereas Triton's tensors of pointers
express a row gather directly. Interpret mode runs the same kernel on CPU for the tests.

Shapes: N tokens (flattened), H heads, R table rows, Dh row width, Dh/32 scale blocks of an
'mxfp8' row; in the kernel, `block` (token, head) pairs per program instance and `w` the width of
one column chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

STORAGES = ("float32", "bfloat16", "int8", "mxfp8")
MX_BLOCK = 32  # columns that share one E8M0 exponent


def _decode_chunk(values, scale, storage: str, dtype):
  """Stored values [block, w] (and their scale) -> [block, w] in `dtype`.

  `scale` is [block, 1] float32 for 'int8' (one per row), [block, 1] E8M0 bytes for 'mxfp8'
  (the chunk is one 32-column block) and None otherwise.
  """
  if storage == "int8":
    return (values.astype(jnp.float32) * scale).astype(dtype)  # [block, w] * [block, 1]
  if storage == "mxfp8":
    return common.times_e8m0(values.astype(jnp.float32), scale).astype(dtype)
  return values.astype(dtype)


def _gather_kernel(
  *refs,
  num_pairs,
  num_heads,
  num_rows,
  chunks,
  storage,
):
  """Copies and decodes the rows of one block of (token, head) pairs.

  Args:
    refs: ids_ref [block] block of flat ids; offsets_ref [H] per-head offsets; values_ref
      [R, Dh] the stored values; for 'int8' and 'mxfp8' scale_ref [R, 1] float32 or [R, Dh/32]
      E8M0 bytes; out_ref [block, Dh] block of output rows. All but the ids and the output are
      whole arrays in global memory.
    num_pairs: N*H, the number of valid (token, head) pairs.
    num_heads: H.
    num_rows: R.
    chunks: (start, size) column chunks of a row.
    storage: the storage type (static).
  """
  ids_ref, offsets_ref, values_ref, *scale_ref, out_ref = refs
  block = ids_ref.shape[0]
  pair = pl.program_id(0) * block + jax.lax.iota(jnp.int32, block)  # [block]
  valid = pair < num_pairs
  ids = pltriton.load(ids_ref, mask=valid, other=0)
  offsets = pltriton.load(offsets_ref.at[pair % num_heads])  # [H] -> [block]
  rows = jnp.clip(ids + offsets, 0, num_rows - 1)
  scale = None
  for start, size in chunks:
    cols = start + jax.lax.iota(jnp.int32, size)
    values = values_ref[rows[:, None], cols[None, :]]  # [block, 1] x [1, w] -> [block, w]
    if scale_ref and (storage == "mxfp8" or scale is None):
      # int8: column 0 once; mxfp8: this chunk's 32-column block.
      col = start // MX_BLOCK if storage == "mxfp8" else 0
      scale = scale_ref[0][rows[:, None], col + jax.lax.iota(jnp.int32, 1)[None, :]]  # [block, 1]
    decoded = _decode_chunk(values, scale, storage, out_ref.dtype)
    pltriton.store(out_ref.at[:, pl.ds(start, size)], decoded, mask=valid[:, None])


def _check_storage(values: jax.Array, scale, storage: str) -> None:
  if storage not in STORAGES:
    raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")
  r, dh = values.shape
  expected = {
    "float32": (jnp.floating, None),
    "bfloat16": (jnp.floating, None),
    "int8": (jnp.int8, (r,)),
    "mxfp8": (jnp.float8_e4m3fn, (r, dh // MX_BLOCK)),
  }[storage]
  if not jnp.issubdtype(values.dtype, expected[0]):
    raise ValueError(
      f"values: storage {storage!r} expects {expected[0].__name__}, got {values.dtype}"
    )
  if storage == "mxfp8" and dh % MX_BLOCK:
    raise ValueError(f"values: 'mxfp8' rows need a width divisible by {MX_BLOCK}, got {dh}")
  if expected[1] is None:
    if scale is not None:
      raise ValueError(f"scale: storage {storage!r} has no scale, got one")
    return
  if scale is None or tuple(scale.shape) != expected[1]:
    got = None if scale is None else tuple(scale.shape)
    raise ValueError(f"scale: storage {storage!r} expects shape {expected[1]}, got {got}")


def _scale_operand(scale, storage: str):
  """The scale as the kernel reads it: float32 per row, or E8M0 exponent bytes."""
  if storage == "int8":
    return scale.astype(jnp.float32).reshape(-1, 1)  # [R] -> [R, 1]
  if storage == "mxfp8":
    if scale.dtype == jnp.float8_e8m0fnu:
      return jax.lax.bitcast_convert_type(scale, jnp.uint8)
    if scale.dtype != jnp.uint8:
      raise ValueError(f"scale: 'mxfp8' expects float8_e8m0fnu or uint8 bytes, got {scale.dtype}")
  return scale


def gather_decode(
  values: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  *,
  storage: str,
  scale: jax.Array | None = None,
  dtype=None,
  block_rows: int | None = None,
  num_warps: int | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """Gathers every head's stored row and decodes it, in one kernel launch.

  Shapes: N tokens, H heads, R table rows, Dh row width.

  Args:
    values: [R, Dh] the stored values of the flat table of all heads (a float dtype for
      'float32' / 'bfloat16', int8 for 'int8', float8_e4m3fn for 'mxfp8').
    ids: [N, H] integer row ids, each relative to its head's offset.
    offsets: [H] integer first row of each head.
    storage: one of `STORAGES`.
    scale: 'int8': [R] float32 row scales; 'mxfp8': [R, Dh/32] E8M0 exponents
      (float8_e8m0fnu, or their uint8 bytes); None otherwise.
    dtype: the output dtype; None keeps a float table's dtype and gives float32 otherwise.
    block_rows: (token, head) pairs per program instance, a power of two; None picks about
      32 KiB of output rows per program.
    num_warps: Triton warps per program instance; None uses the backend default (4).
    interpret: run the kernel in Pallas interpret mode; None interprets unless the default
      backend is a GPU.

  Returns:
    [N, H, Dh] decoded rows `decode(values[ids[n, h] + offsets[h]])` in `dtype`.
  """
  common.check_table(values)
  common.check_ids(ids, offsets)
  _check_storage(values, scale, storage)
  if dtype is None:
    dtype = values.dtype if storage in ("float32", "bfloat16") else jnp.float32
  dtype = jnp.dtype(dtype)
  n, h = ids.shape
  num_rows, dh = values.shape
  m = n * h
  if m == 0:
    return jnp.zeros((n, h, dh), dtype)
  if block_rows is None:
    itemsize = max(values.dtype.itemsize, dtype.itemsize)
    block_rows = common.block_rows_for(dh, itemsize, common.GATHER_TILE_BYTES)
  block_rows = common.check_block_rows(block_rows)
  chunks = common.column_chunks(dh)
  if storage == "mxfp8":
    chunks = tuple((c, MX_BLOCK) for c in range(0, dh, MX_BLOCK))
  kernel = functools.partial(
    _gather_kernel,
    num_pairs=m,
    num_heads=h,
    num_rows=num_rows,
    chunks=chunks,
    storage=storage,
  )
  operands = [ids.astype(jnp.int32).reshape(m), offsets.astype(jnp.int32), values]  # [N*H]
  if scale is not None:
    operands.append(_scale_operand(scale, storage))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  rows = pl.pallas_call(
    kernel,
    grid=(pl.cdiv(m, block_rows),),
    in_specs=[pl.BlockSpec((block_rows,), lambda i: (i,))] + [any_spec] * (len(operands) - 1),
    out_specs=pl.BlockSpec((block_rows, dh), lambda i: (i, 0)),
    out_shape=jax.ShapeDtypeStruct((m, dh), dtype),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=common.resolve_interpret(interpret),
    name=f"engram_gather_{storage}",
  )(*operands)
  return rows.reshape(n, h, dh)  # [N*H, Dh] -> [N, H, Dh]


def gather(
  table: jax.Array,
  ids: jax.Array,
  offsets: jax.Array,
  *,
  block_rows: int | None = None,
  num_warps: int | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """Gathers every head's row of a float table with one kernel launch (no decoding).

  Args:
    table: [R, Dh] the flat table of all heads.
    ids: [N, H] integer row ids, each relative to its head's offset.
    offsets: [H] integer first row of each head.
    block_rows: (token, head) pairs per program instance (see `gather_decode`).
    num_warps: Triton warps per program instance.
    interpret: Pallas interpret mode; None interprets unless the default backend is a GPU.

  Returns:
    [N, H, Dh] rows `table[ids[n, h] + offsets[h]]` in the table's dtype.
  """
  common.check_table(table)
  if not jnp.issubdtype(table.dtype, jnp.floating):
    raise ValueError(f"table: expected a float dtype (use gather_decode), got {table.dtype}")
  return gather_decode(
    table,
    ids,
    offsets,
    storage="float32",
    block_rows=block_rows,
    num_warps=num_warps,
    interpret=interpret,
  )


def decode(
  values: jax.Array,
  *,
  storage: str,
  scale: jax.Array | None = None,
  dtype=None,
  interpret: bool | None = None,
) -> jax.Array:
  """Decodes packed stored rows (row i -> row i) with the gather kernel: [R, Dh] -> [R, Dh]."""
  common.check_table(values)
  ids = jnp.arange(values.shape[0], dtype=jnp.int32)[:, None]  # [R, 1]
  rows = gather_decode(
    values,
    ids,
    jnp.zeros((1,), jnp.int32),
    storage=storage,
    scale=scale,
    dtype=dtype,
    interpret=interpret,
  )
  return rows[:, 0]  # [R, 1, Dh] -> [R, Dh]


def decode_reference(values: jax.Array, storage: str, scale=None, dtype=None) -> jax.Array:
  """Plain-jnp decoding of stored rows [..., Dh] (same rules as the kernel)."""
  if storage not in STORAGES:
    raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")
  if dtype is None:
    dtype = values.dtype if storage in ("float32", "bfloat16") else jnp.float32
  if storage == "int8":
    return (values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)
  if storage == "mxfp8":
    *lead, dh = values.shape
    blocks = values.astype(jnp.float32).reshape(*lead, dh // MX_BLOCK, MX_BLOCK)
    scale = jnp.asarray(scale)
    if scale.dtype == jnp.float8_e8m0fnu:
      scale = jax.lax.bitcast_convert_type(scale, jnp.uint8)
    out = common.times_e8m0(blocks, scale[..., None])  # [..., Dh/32, 32] * [..., Dh/32, 1]
    return out.reshape(*lead, dh).astype(dtype)
  return values.astype(dtype)


def gather_decode_reference(
  values: jax.Array, ids: jax.Array, offsets: jax.Array, *, storage: str, scale=None, dtype=None
) -> jax.Array:
  """Plain-jnp `gather_decode`: XLA's gather (rows clamped to [0, R)), then the decoding."""
  common.check_table(values)
  common.check_ids(ids, offsets)
  rows = ids.astype(jnp.int32) + offsets.astype(jnp.int32)[None, :]  # [N, H] + [1, H] -> [N, H]
  got = jnp.take(values, rows, axis=0, mode="clip")  # [N, H] -> [N, H, Dh]
  got_scale = None if scale is None else jnp.take(scale, rows, axis=0, mode="clip")
  return decode_reference(got, storage, got_scale, dtype)


def gather_reference(table: jax.Array, ids: jax.Array, offsets: jax.Array) -> jax.Array:
  """Plain-jnp gather with the kernel's semantics (rows clamped to [0, R)).

  Args:
    table: [R, Dh] the flat table.
    ids: [N, H] integer row ids relative to each head's offset.
    offsets: [H] integer first row of each head.

  Returns:
    [N, H, Dh] rows.
  """
  return gather_decode_reference(table, ids, offsets, storage="float32")
