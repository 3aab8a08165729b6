"""Tests of the deterministic scatter-add (the lookup's backward) and the custom_vjp wiring."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.gather import gather_reference
from pallas_kernels.lookup import lookup
from pallas_kernels.scatter_add import (
  row_runs,
  scatter_add,
  scatter_add_reference,
  sparse_row_grads,
  sparse_row_grads_reference,
)

SIZES = (11, 7, 13)
OFFSETS = np.array([0, 11, 18], np.int32)
NUM_ROWS = sum(SIZES)
N = 13  # N*H = 39 pairs: not a multiple of the 16-row blocks used below
WIDTH = 24  # two column chunks: 16 + 8


def _ids(seed: int) -> np.ndarray:
  """[N, H] ids drawn from few values (many repeats), with the table's first and last rows."""
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.integers(0, min(s, 4), size=N) for s in SIZES], axis=1).astype(np.int32)
  ids[0, 0] = 0
  ids[-1, -1] = SIZES[-1] - 1
  return ids


def _cotangent(dtype, seed: int) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (N, 3, WIDTH), jnp.float32).astype(dtype)


def _sequential_sum(cotangent, ids, num_rows) -> np.ndarray:
  """NumPy oracle: float32 sums in token order, one row at a time, then the cotangent's dtype."""
  rows = (np.asarray(ids) + OFFSETS[None, :]).reshape(-1)
  flat = np.asarray(cotangent).astype(np.float32).reshape(rows.size, -1)
  total = np.zeros((num_rows, flat.shape[1]), np.float32)
  for row, value in zip(rows, flat, strict=True):
    total[row] += value
  return total.astype(np.asarray(cotangent).dtype)


def test_row_runs_of_a_small_example():
  ids = np.array([[2, 0], [1, 0], [2, 4]], np.int32)
  runs = row_runs(jnp.asarray(ids), jnp.array([0, 3], jnp.int32), num_rows=9)
  # Flat rows: [2, 3, 1, 3, 2, 7] -> sorted 1 (pos 2), 2 (pos 0, 4), 3 (pos 1, 3), 7 (pos 5).
  np.testing.assert_array_equal(runs.order, [2, 0, 4, 1, 3, 5])
  np.testing.assert_array_equal(runs.rows, [1, 2, 3, 7, 9, 9])
  np.testing.assert_array_equal(runs.starts, [0, 1, 3, 5, 6, 6])
  np.testing.assert_array_equal(runs.lengths, [1, 2, 2, 1, 0, 0])
  assert int(runs.count) == 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradient_is_the_ordered_sum(dtype):
  ids = _ids(seed=1)
  cot = _cotangent(dtype, seed=2)
  fn = jax.jit(functools.partial(scatter_add, num_rows=NUM_ROWS, block_rows=16))
  grad = fn(cot, jnp.asarray(ids), OFFSETS)
  assert grad.dtype == dtype
  chex.assert_shape(grad, (NUM_ROWS, WIDTH))
  # Bitwise: each row is summed in token order in float32, exactly like the oracle.
  np.testing.assert_array_equal(np.asarray(grad), _sequential_sum(cot, ids, NUM_ROWS))
  reference = scatter_add_reference(cot, jnp.asarray(ids), OFFSETS, NUM_ROWS)
  chex.assert_trees_all_close(grad, reference, rtol=1e-6, atol=1e-6)
  untouched = np.setdiff1d(np.arange(NUM_ROWS), (ids + OFFSETS).reshape(-1))
  assert untouched.size > 0 and not np.any(np.asarray(grad)[untouched])


def test_sparse_gradient_matches_unique_and_segment_sum():
  ids = jnp.asarray(_ids(seed=3))
  cot = _cotangent(jnp.bfloat16, seed=4)
  fn = functools.partial(sparse_row_grads, num_rows=NUM_ROWS, dtype=jnp.float32, block_rows=16)
  got = jax.jit(fn)(cot, ids, OFFSETS)
  want = sparse_row_grads_reference(cot, ids, OFFSETS, NUM_ROWS, dtype=jnp.float32)
  count = int(want.count)
  assert 0 < count < N * 3  # repeats exist
  assert int(got.count) == count
  chex.assert_shape(got.grads, (N * 3, WIDTH))
  assert got.grads.dtype == jnp.float32
  np.testing.assert_array_equal(got.rows, want.rows)
  np.testing.assert_array_equal(got.valid, np.arange(N * 3) < count)
  chex.assert_trees_all_close(got.grads, want.grads, rtol=1e-6, atol=1e-6)
  assert not np.any(np.asarray(got.grads)[count:])
  # Scattering the sparse form gives the dense gradient.
  dense = np.zeros((NUM_ROWS, WIDTH), np.float32)
  dense[np.asarray(got.rows)[:count]] = np.asarray(got.grads)[:count]
  expected = scatter_add_reference(cot.astype(jnp.float32), ids, OFFSETS, NUM_ROWS)
  np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-6)


def test_a_single_hot_row():
  ids = jnp.full((N, 3), 2, jnp.int32)  # every token reads row 2 of each head
  cot = _cotangent(jnp.float32, seed=5)
  grad = scatter_add(cot, ids, OFFSETS, NUM_ROWS, block_rows=16)
  np.testing.assert_array_equal(np.asarray(grad), _sequential_sum(cot, np.asarray(ids), NUM_ROWS))
  assert np.count_nonzero(np.abs(np.asarray(grad)).sum(axis=1)) == 3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grad_through_the_lookup_uses_the_kernel(dtype):
  table = jax.random.normal(jax.random.key(0), (NUM_ROWS, WIDTH), jnp.float32).astype(dtype)
  ids = jnp.asarray(_ids(seed=6))
  weights = _cotangent(dtype, seed=7)

  def loss(t, fetch):
    return jnp.sum(fetch(t, ids, OFFSETS).astype(jnp.float32) * weights.astype(jnp.float32))

  rows = jax.jit(lookup)(table, ids, OFFSETS)
  chex.assert_trees_all_equal(rows, gather_reference(table, ids, OFFSETS))
  grad = jax.jit(jax.grad(lambda t: loss(t, lookup)))(table)
  assert grad.dtype == dtype
  np.testing.assert_array_equal(np.asarray(grad), _sequential_sum(weights, ids, NUM_ROWS))
  xla_grad = jax.grad(lambda t: loss(t, gather_reference))(table)
  tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
  chex.assert_trees_all_close(grad, xla_grad, rtol=tolerance, atol=tolerance)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: loss(t, lookup)))(table))
  assert jaxpr.count("pallas_call") == 2  # the gather forward and the row-sum backward


def test_backward_lowers_for_gpu():
  ids = jnp.asarray(_ids(seed=8))
  weights = _cotangent(jnp.float32, seed=9)

  def loss(t):
    rows = lookup(t, ids, OFFSETS, interpret=False)
    return jnp.sum(rows.astype(jnp.float32) * weights)

  spec = jax.ShapeDtypeStruct((NUM_ROWS, WIDTH), jnp.bfloat16)
  text = jax.jit(jax.value_and_grad(loss)).trace(spec).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2


def test_kernel_output_dtype_is_exactly_bf16_rounding():
  # A bfloat16 table gradient is the float32 sum rounded once (not a bfloat16 running sum).
  ids = jnp.zeros((N, 3), jnp.int32)
  cot = jnp.full((N, 3, WIDTH), 1 + 2**-7, jnp.bfloat16)  # bfloat16 spacing at 1 is 2**-7
  grad = scatter_add(cot, ids, OFFSETS, NUM_ROWS, block_rows=16)
  expected = np.asarray(N * (1 + 2**-7), np.float32).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(grad)[OFFSETS], np.full((3, WIDTH), expected))
