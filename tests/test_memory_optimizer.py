"""Tests for engram_jax/memory/optimizer.py: the tables' sparse (lazy) Adam and its dedup."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import OptimConfig
from engram_jax.memory import optimizer as opt

_R, _DH = 40, 4
_CFG = OptimConfig(adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8)


def _dense_adam(table, mu, nu, count, ids, grads, lr):
  """Adam written out in NumPy on the rows in `ids` (duplicates summed first)."""
  table, mu, nu = (np.array(x, np.float32) for x in (table, mu, nu))
  g = np.zeros_like(table)
  np.add.at(g, np.asarray(ids), np.asarray(grads, np.float32))
  touched = np.unique(np.asarray(ids))
  b1, b2 = _CFG.adam_b1, _CFG.adam_b2
  t = count + 1
  mu[touched] = b1 * mu[touched] + (1 - b1) * g[touched]
  nu[touched] = b2 * nu[touched] + (1 - b2) * g[touched] ** 2
  step = lr * (mu[touched] / (1 - b1**t)) / (np.sqrt(nu[touched] / (1 - b2**t)) + _CFG.adam_eps)
  table[touched] -= step
  return table, mu, nu, touched


class SparseAdamTest(chex.TestCase):
  def _check(self, update, dtype, atol):
    key = jax.random.key(3)
    table = jax.random.normal(key, (_R, _DH)).astype(dtype)
    state = opt.init_table_state(table)
    chex.assert_trees_all_equal_dtypes(state.mu, state.nu, jnp.zeros((), jnp.float32))
    # Two steps with different, repeated ids: the second decays only the rows it touches and
    # bias-corrects with the global count.
    steps = [
      (np.array([3, 7, 3, 39, 0, 7, 3, 12], np.int32), 0.1),
      (np.array([7, 5, 5, 20, 7, 0, 31, 31], np.int32), 0.05),
    ]
    for i, (ids, lr) in enumerate(steps):
      grads = jax.random.normal(jax.random.fold_in(key, i), (len(ids), _DH))
      want_t, want_mu, want_nu, touched = _dense_adam(table, state.mu, state.nu, i, ids, grads, lr)
      new_table, new_state = update(table, state, jnp.asarray(ids), grads, lr)
      assert new_table.dtype == dtype and new_state.count == i + 1
      chex.assert_trees_all_equal_dtypes(new_state.mu, new_state.nu, jnp.zeros((), jnp.float32))
      untouched = np.setdiff1d(np.arange(_R), touched)
      for new, old in ((new_table, table), (new_state.mu, state.mu), (new_state.nu, state.nu)):
        np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(old)[untouched])
      np.testing.assert_allclose(new_state.mu[touched], want_mu[touched], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(new_state.nu[touched], want_nu[touched], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(
        np.asarray(new_table.astype(jnp.float32))[touched], want_t[touched], atol=atol
      )
      table, state = new_table, new_state

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_dense_adam_on_touched_rows_only(self):
    update = self.variant(lambda *args: opt.sparse_adam_update(*args, _CFG))
    self._check(update, jnp.float32, atol=1e-6)

  def test_bfloat16_table(self):
    update = jax.jit(lambda *args: opt.sparse_adam_update(*args, _CFG))
    # bfloat16 keeps 8 significant bits: a row value below 4 in magnitude rounds by at most
    # 2**-7 when stored back.
    self._check(update, jnp.bfloat16, atol=2.0**-6)

  def test_repeated_ids_sum_their_gradients(self):
    table = jnp.zeros((_R, _DH))
    state = opt.init_table_state(table)
    ids = jnp.array([9, 9, 9], jnp.int32)
    grads = jnp.array([[1.0, -1.0, 0.5, 0.0]] * 3)
    _, new_state = opt.sparse_adam_update(table, state, ids, grads, 0.1, _CFG)
    np.testing.assert_allclose(new_state.mu[9], (1 - _CFG.adam_b1) * 3 * grads[0], rtol=1e-6)
    assert np.count_nonzero(np.asarray(new_state.mu)) == 3

  def test_rejects_mismatched_grads(self):
    table = jnp.zeros((_R, _DH))
    with pytest.raises(ValueError, match="row_grads"):
      opt.sparse_adam_update(
        table,
        opt.init_table_state(table),
        jnp.zeros((3,), jnp.int32),
        jnp.zeros((3, _DH + 1)),
        0.1,
        _CFG,
      )


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_dedup_sum(implementation):
  ids = jnp.array([5, 2, 5, 9, 2, 5, 10], jnp.int32)  # 10 = fill: an empty place
  values = jnp.arange(14.0).reshape(7, 2)
  unique, sums = opt.dedup_sum(ids, values, fill=10, implementation=implementation)
  np.testing.assert_array_equal(unique, [2, 5, 9, 10, 10, 10, 10])
  want = np.zeros((7, 2), np.float32)
  for i, u in enumerate([2, 5, 9, 10]):  # the fill id is summed too (callers give it zeros)
    want[i] = np.asarray(values)[np.asarray(ids) == u].sum(0)
  np.testing.assert_array_equal(sums, want)
