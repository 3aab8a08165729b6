"""Tests of the fused multi-head gather kernel (Pallas interpret mode on CPU, GPU lowering)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.gather import gather, gather_reference

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
