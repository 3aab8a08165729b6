"""Tests of the fused multi-head gather kernel (Pallas interpret mode on CPU, GPU lowering)."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.memory import storage as storage_lib
from pallas_kernels import common
from pallas_kernels.gather import (
  STORAGES,
  decode,
  gather,
  gather_decode,
  gather_decode_reference,
  gather_reference,
)

# Three heads of 11, 7 and 13 rows: R = 31.
SIZES = (11, 7, 13)
OFFSETS = np.array([0, 11, 18], np.int32)
NUM_ROWS = sum(SIZES)


def _ids(n: int, seed: int) -> np.ndarray:
  """[N, H] random ids with duplicates, plus the first row of the table and the last one."""
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.integers(0, s, size=n) for s in SIZES], axis=1).astype(np.int32)
  ids[0, 0] = 0  # row 0
  ids[-1, -1] = SIZES[-1] - 1  # row R - 1
  return ids


def _table(dtype, width: int) -> jax.Array:
  """[R, Dh] with every element distinct, so a wrong row cannot match by accident."""
  return (
    (jnp.arange(NUM_ROWS * width, dtype=jnp.float32) / 7).reshape(NUM_ROWS, width).astype(dtype)
  )


@pytest.mark.parametrize(
  ("n", "width", "block_rows", "dtype"),
  [
    (13, 24, 16, jnp.float32),  # N*H = 39: two full blocks and a masked tail; Dh = 16 + 8
    (13, 24, 16, jnp.bfloat16),
    (40, 32, 32, jnp.bfloat16),  # N*H = 120, Dh a power of two
    (5, 80, None, jnp.float32),  # default block larger than N*H; Dh = 64 + 16
  ],
)
def test_gather_equals_reference(n, width, block_rows, dtype):
  table = _table(dtype, width)
  ids = jnp.asarray(_ids(n, seed=n))
  rows = jax.jit(functools.partial(gather, block_rows=block_rows))(table, ids, OFFSETS)
  chex.assert_shape(rows, (n, 3, width))
  assert rows.dtype == dtype
  chex.assert_trees_all_equal(rows, gather_reference(table, ids, OFFSETS))
  np.testing.assert_array_equal(rows[0, 0], table[0])
  np.testing.assert_array_equal(rows[-1, -1], table[NUM_ROWS - 1])
  expected = np.asarray(table)[np.asarray(ids) + OFFSETS[None, :]]
  np.testing.assert_array_equal(np.asarray(rows), expected)


class GatherVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_duplicates_and_clamping(self):
    table = _table(jnp.float32, 8)
    ids = jnp.array([[3, 3, 3], [3, 3, 3], [0, 99, -5]], jnp.int32)  # repeats; out of range
    rows = self.variant(functools.partial(gather, interpret=True))(table, ids, OFFSETS)
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[2, 1], table[NUM_ROWS - 1])  # 99 + 11 clamps to R - 1
    np.testing.assert_array_equal(rows[2, 2], table[13])  # -5 + 18
    chex.assert_trees_all_equal(rows, gather_reference(table, ids, OFFSETS))


def test_column_chunks_cover_the_row():
  assert common.column_chunks(80) == ((0, 64), (64, 16))
  assert common.column_chunks(64) == ((0, 64),)
  assert common.column_chunks(7) == ((0, 4), (4, 2), (6, 1))


# e4m3 values: +-1, a fraction, the smallest subnormal and the largest code, and zero.
_E8M0_X = np.array([1.0, -1.0, 0.75, -3.5, 2.0**-9, 448.0, -448.0, 0.0], np.float32)


@pytest.mark.parametrize("exponent_dtype", [np.uint8, np.int32])
@pytest.mark.parametrize("mode", ["numpy", "jax", "jax-jit"])
def test_times_e8m0_equals_a_float64_power_of_two(mode, exponent_dtype):
  e = np.arange(256)  # every E8M0 byte
  # [8, 1] * [1, 256] -> [8, 256], exact in float64, then rounded once to float32.
  with np.errstate(over="ignore"):
    want = (_E8M0_X[:, None].astype(np.float64) * 2.0 ** (e[None, :] - 127.0)).astype(np.float32)
  want[:, 255] = np.nan  # byte 255 is NaN, whatever x
  x, exponent = _E8M0_X[:, None], e[None, :].astype(exponent_dtype)
  if mode == "numpy":
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # overflows to inf (and byte 255 to NaN) without a warning
      got = common.times_e8m0(x, exponent, np)
  else:
    fn = jax.jit(common.times_e8m0) if mode == "jax-jit" else common.times_e8m0
    got = fn(jnp.asarray(x), jnp.asarray(exponent))
  got = np.asarray(got)
  assert got.dtype == np.float32 and got.shape == (8, 256)
  if mode != "numpy":  # XLA:CPU flushes products below float32's normal range to (signed) zero
    flushed = (np.abs(want) < np.finfo(np.float32).tiny) & (got == 0)
    want = np.where(flushed, np.copysign(np.float32(0), want), want)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit
  # x = 1 at bytes 0, 1, 127, 254, 255: 2**-127 (flushed by XLA:CPU), 2**-126, 1, 2**127, NaN.
  np.testing.assert_array_equal(got[0, [1, 127, 254, 255]], [2.0**-126, 1.0, 2.0**127, np.nan])
  assert got[0, 0] in (np.float32(2.0**-127), 0.0)
  if mode == "numpy":
    assert got[0, 0] == np.float32(2.0**-127)  # NumPy keeps the subnormal


def test_rejects_bad_arguments():
  table = _table(jnp.float32, 8)
  ids = jnp.zeros((4, 3), jnp.int32)
  with pytest.raises(ValueError, match="power of two"):
    gather(table, ids, OFFSETS, block_rows=24)
  with pytest.raises(ValueError, match="integer"):
    gather(table, ids.astype(jnp.float32), OFFSETS)
  with pytest.raises(ValueError, match="number of offsets"):
    gather(table, ids[:, :2], OFFSETS)
  with pytest.raises(ValueError, match="rank 2"):
    gather(table[0], ids, OFFSETS)


@pytest.mark.parametrize(
  ("num_rows", "width", "dtype"),
  [
    (1000, 24, jnp.float32),
    (1000, 80, jnp.bfloat16),
    (1 << 26, 64, jnp.bfloat16),  # an 8 GiB table: 64-bit offsets (traced, never allocated)
  ],
)
def test_gather_lowers_for_gpu(num_rows, width, dtype):
  n, h = 13, 3
  specs = (
    jax.ShapeDtypeStruct((num_rows, width), dtype),
    jax.ShapeDtypeStruct((n, h), jnp.int32),
    jax.ShapeDtypeStruct((h,), jnp.int32),
  )
  fn = functools.partial(gather, block_rows=16, interpret=False)
  text = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert "grid_x = 3 : i32" in text  # ceil(39 / 16) program instances
  # Interpret mode lowers to plain HLO instead of a kernel: the switch is real.
  interpreted = functools.partial(gather, block_rows=16, interpret=True)
  text = jax.jit(interpreted).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" not in text


def _stored(storage: str, width: int, seed: int = 0) -> tuple[jax.Array, jax.Array | None]:
  """A table of NUM_ROWS rows in a storage type, with its edge cases: for 'int8' an all-zero row
  (scale 0); for 'mxfp8' E8M0 exponents 0, 1, 127, 254 and 255 (NaN) in column block 0 of rows
  2, 1, 0, 3, 4, and every e4m3 code in the first 8 rows."""
  rng = np.random.default_rng(seed)
  rows = rng.standard_normal((NUM_ROWS, width)).astype(np.float32) * 5
  rows[7] = 0.0
  parts = storage_lib.encode(rows, storage)
  values, scale = parts["values"], parts.get("scale")
  if storage == "mxfp8":
    values = values.copy()
    codes = np.arange(256, dtype=np.uint8).view(values.dtype)
    values.reshape(-1)[: codes.size] = codes  # the first rows hold all 256 codes
    scale = scale.copy()
    # rows 0-3 hold codes 0-31, 32-63, 64-95, 96-127: row 2's values (2 to 15) times 2**-127
    # stay in float32's normal range; row 3 holds 448 and NaN.
    scale[[2, 1, 0, 3, 4], 0] = [0, 1, 127, 254, 255]
  return jnp.asarray(values), None if scale is None else jnp.asarray(scale)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gather_decode_equals_the_references(storage, dtype):
  width = 64
  values, scale = _stored(storage, width)
  ids = jnp.asarray(_ids(13, seed=3))  # N*H = 39: not a multiple of the block; rows 0, R - 1
  ids = ids.at[2].set(ids[1])  # duplicates
  fn = jax.jit(functools.partial(gather_decode, storage=storage, dtype=dtype, block_rows=16))
  with np.errstate(over="ignore"):  # 448 * 2**127 is inf in float32, in both
    rows = fn(values, ids, OFFSETS, scale=scale)
    chex.assert_shape(rows, (13, 3, width))
    assert rows.dtype == dtype
    ref = gather_decode_reference(values, ids, OFFSETS, storage=storage, scale=scale, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(rows, np.float32), np.asarray(ref, np.float32))
    # The library's decoding (memory.storage) of the same stored rows agrees.
    flat = np.asarray(ids) + OFFSETS[None, :]  # [N, H]
    parts = {"values": np.asarray(values)[flat]}
    if scale is not None:
      parts["scale"] = np.asarray(scale)[flat]
    want = _flush(storage_lib.decode(parts, storage, np.float32)).astype(dtype)
  np.testing.assert_array_equal(np.asarray(rows, np.float32), np.asarray(want, np.float32))
  if storage == "int8":
    np.testing.assert_array_equal(decode(values, storage=storage, scale=scale)[7], 0.0)


def _flush(x: np.ndarray) -> np.ndarray:
  """NumPy's float32 results with XLA:CPU's rule for values below the normal range (2**-126):
  XLA flushes them to zero (the kernel in interpret mode and the jnp reference alike)."""
  return np.where(np.abs(x) < np.float32(2.0**-126), np.float32(0), x)


def test_mxfp8_edge_exponents_decode_by_the_formula():
  values, scale = _stored("mxfp8", 32)
  with np.errstate(over="ignore"):
    rows = np.asarray(decode(values, storage="mxfp8", scale=scale))  # [R, 32] float32
    codes = np.asarray(values).astype(np.float32)  # e4m3 -> float32 (ml_dtypes)
    for r, e in zip([2, 1, 0, 3], [0, 1, 127, 254], strict=True):
      want = _flush(codes[r] * np.float32(2.0 ** (e - 127)))
      np.testing.assert_array_equal(rows[r], want)
  assert rows[2, 0] == np.float32(2.0**-126)  # code 64 (2.0) at 2**-127
  assert np.isinf(rows[3]).any() and np.isnan(rows[3, -1])  # 448 * 2**127; code 127 is NaN
  assert np.isnan(rows[4]).all()  # exponent byte 255 is NaN
  np.testing.assert_array_equal(rows[0, :8], np.arange(8) * np.float32(2.0**-9))  # subnormal e4m3


def test_gather_decode_rejects_bad_storage():
  values, scale = _stored("int8", 32)
  ids = jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="storage: expected one of"):
    gather_decode(values, ids, OFFSETS, storage="int4")
  with pytest.raises(ValueError, match=r"scale: storage 'int8' expects shape \(31,\)"):
    gather_decode(values, ids, OFFSETS, storage="int8")
  with pytest.raises(ValueError, match="expects float8_e4m3fn"):
    gather_decode(values, ids, OFFSETS, storage="mxfp8", scale=scale)
  with pytest.raises(ValueError, match="has no scale"):
    gather_decode(values.astype(jnp.float32), ids, OFFSETS, storage="float32", scale=scale)
  with pytest.raises(ValueError, match="float dtype"):
    gather(values, ids, OFFSETS)


def _specs(storage: str, num_rows: int, width: int, n: int = 13, h: int = 3):
  values = jax.ShapeDtypeStruct((num_rows, width), storage_lib.value_dtype(storage))
  scale = {
    "int8": jax.ShapeDtypeStruct((num_rows,), jnp.float32),
    "mxfp8": jax.ShapeDtypeStruct((num_rows, width // 32), jnp.float8_e8m0fnu),
  }.get(storage)
  ids = jax.ShapeDtypeStruct((n, h), jnp.int32)
  return values, ids, jax.ShapeDtypeStruct((h,), jnp.int32), scale


@pytest.mark.parametrize("storage", STORAGES)
def test_every_storage_lowers_for_gpu(storage):
  values, ids, offsets, scale = _specs(storage, 1 << 20, 256)

  def fn(values, ids, offsets, scale):
    return gather_decode(
      values, ids, offsets, storage=storage, scale=scale, dtype=jnp.bfloat16, interpret=False
    )

  lowered = jax.jit(fn).trace(values, ids, offsets, scale).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


def test_the_sharded_backend_lowers_for_gpu_on_8_devices(monkeypatch):
  """The sharded table's lookup and update, inside shard_map, lowered for CUDA as a GPU host
  would: the kernels compiled, not interpreted."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from engram_jax.config import OptimConfig
  from engram_jax.memory import base, sharded
  from engram_jax.memory.optimizer import TableOptState

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # 'auto' picks the kernels
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = sharded.ShardSpec(mesh, "data", 8 * 4096, slack=2.0, implementation="auto")
  split = NamedSharding(mesh, P("data", None))
  table = jax.ShapeDtypeStruct((8 * 4096, 64), jnp.float32, sharding=split)
  count = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  state = base.TableState(table, TableOptState(table, table, count))
  ids = jax.ShapeDtypeStruct((8 * 64,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
  grads = jax.ShapeDtypeStruct((8 * 64, 64), jnp.float32, sharding=split)

  def step(state, ids, grads):
    rows = sharded.lookup(state, ids, spec)
    return rows, sharded.update(state, ids, grads, 0.1, OptimConfig(), spec)

  text = jax.jit(step).trace(state, ids, grads).lower(lowering_platforms=("cuda",)).as_text()
  # The owner's gather on both routes (2), the sender's gradient sums (1) and the owner's on
  # both routes of the update (2).
  assert text.count("__gpu$xla.gpu.triton") == 5
