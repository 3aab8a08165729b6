"""Tests of `memory.create` and the device backend (engram_jax/memory/device.py, base.py,
host_buffers.py)."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import memory
from engram_jax.config import OptimConfig
from engram_jax.memory import base, device, host_buffers
from engram_jax.memory.optimizer import init_table_state, sparse_adam_update
from engram_jax.memory.table import TableLayout

R, DH = 300, 8
CFG = OptimConfig()


def _ids(rng, shape=(4, 6, 3)):
  return rng.integers(0, R, shape).astype(np.int32)


def test_init_rows_are_seeded_and_chunkable():
  full = base.init_rows(R, DH, seed=3)
  assert full.shape == (R, DH) and full.dtype == np.float32
  np.testing.assert_array_equal(full[100:250], base.init_rows(R, DH, 3, start=100, stop=250))
  assert not np.array_equal(full, base.init_rows(R, DH, seed=4))
  np.testing.assert_allclose(full.std(), 1.0, atol=0.1)
  with pytest.raises(ValueError, match="range"):
    base.init_rows(R, DH, 0, start=10, stop=R + 1)


@pytest.mark.parametrize("engine", ["numpy", "jit"])
def test_fetch_reads_rows_of_any_id_shape(engine):
  rows = base.init_rows(R, DH, 0)
  table = memory.create("device", num_rows=R, dim=DH, rows=rows, engine=engine)
  assert table.engine == engine
  ids = np.array([[0, R - 1, 7], [7, 7, 299]], np.int32)
  out = table.fetch(ids)
  assert isinstance(out, jax.Array) and out.shape == (2, 3, DH)
  np.testing.assert_array_equal(out, rows[ids])
  np.testing.assert_array_equal(table.fetch(jnp.asarray(ids[0, 1])), rows[R - 1])  # scalar id
  # Out-of-range ids are clamped, like dispatch.lookup.
  np.testing.assert_array_equal(table.fetch(np.array([-5, R + 9])), rows[[0, R - 1]])
  assert table.stats()["rows_fetched"] == 6 + 1 + 2


def test_fetch_matches_the_layout_fetch():
  layout = TableLayout.from_sizes([101, 89, 110], dim=DH)
  table = layout.init(jax.random.key(0))
  obj = memory.create("device", num_rows=layout.num_rows, dim=DH, rows=table)
  hash_ids = jnp.asarray(np.random.default_rng(0).integers(0, 89, (2, 5, 3)), jnp.int32)
  np.testing.assert_array_equal(
    obj.fetch(layout.row_ids(hash_ids)), device.fetch(layout, table, hash_ids)
  )


def test_apply_gradients_is_the_sparse_adam_of_the_whole_table():
  rows = base.init_rows(R, DH, 1)
  table = memory.create("device", num_rows=R, dim=DH, rows=rows)
  ref, ref_state = jnp.asarray(rows), init_table_state(jnp.asarray(rows))
  reference = jax.jit(sparse_adam_update, static_argnames="cfg")
  rng = np.random.default_rng(1)
  for _ in range(3):
    ids, grads = _ids(rng), rng.standard_normal((4, 6, 3, DH)).astype(np.float32)
    table.apply_gradients(ids, grads, 0.01, CFG)
    flat_ids, flat_grads = ids.reshape(-1), grads.reshape(-1, DH)  # [B, T, H] -> [N]
    ref, ref_state = reference(ref, ref_state, flat_ids, flat_grads, jnp.float32(0.01), cfg=CFG)
  np.testing.assert_array_equal(table.rows(), ref)
  np.testing.assert_array_equal(np.asarray(table.state.opt.nu)[:R], ref_state.nu)
  assert int(table.state.opt.count) == 3 and table.stats()["updates"] == 3
  untouched = np.setdiff1d(np.arange(R), np.asarray(ids))
  assert untouched.size  # some rows were never read in the last step


def test_pure_core_in_one_jitted_step():
  state = device.init(base.init_rows(R, DH, 2))
  w = jnp.linspace(-1.0, 1.0, DH)

  @jax.jit
  def step(state, ids):
    loss_fn = lambda rows: jnp.mean((rows @ w - 1.0) ** 2)  # [B, T, H, Dh] @ [Dh] -> [B, T, H]
    loss, g = jax.value_and_grad(loss_fn)(device.lookup(state, ids))
    return device.update(state, ids, g, 0.05, CFG), loss

  ids = jnp.asarray(_ids(np.random.default_rng(2)))
  losses = []
  for _ in range(4):
    state, loss = step(state, ids)
    losses.append(float(loss))
  assert losses[-1] < losses[0]


def test_errors():
  table = memory.create("device", num_rows=R, dim=DH)
  with pytest.raises(ValueError, match="integer"):
    table.fetch(np.zeros((2,), np.float32))
  with pytest.raises(ValueError, match="grads"):
    table.apply_gradients(np.zeros((3,), np.int32), np.zeros((3, DH + 1)), 0.1, CFG)
  frozen = memory.create("device", num_rows=R, dim=DH, trainable=False)
  with pytest.raises(ValueError, match="trainable=False"):
    frozen.apply_gradients(np.zeros((3,), np.int32), np.zeros((3, DH)), 0.1, CFG)
  with pytest.raises(ValueError, match="kind"):
    memory.create("gpu", num_rows=R, dim=DH)
  with pytest.raises(ValueError, match="unknown options"):
    memory.create("device", num_rows=R, dim=DH, cache_fraction=0.1)
  with pytest.raises(ValueError, match="mesh"):
    memory.create("host", num_rows=R, dim=DH, mesh=object())
  with pytest.raises(ValueError, match="engine"):
    memory.create("device", num_rows=R, dim=DH, engine="cuda")
  with pytest.raises(ValueError, match="num_rows"):
    memory.create("device", num_rows=0, dim=DH)
  with pytest.raises(ValueError, match="rows: expected shape"):
    memory.create("device", num_rows=R, dim=DH, rows=np.zeros((R, DH + 1)))
  assert "cache_fraction" in memory.options("tiered") and "storage" in memory.options("tiered")


def test_output_buffers_are_reused_only_when_nothing_uses_them():
  buffers = host_buffers.OutputBuffers(per_shape=3)
  first = buffers.take((4, DH), np.float32)
  a = first.ctypes.data
  assert a % 64 == 0
  alias = host_buffers.to_device(first)  # on a CPU client jax aliases the buffer
  assert alias.unsafe_buffer_pointer() == a
  del first
  second = buffers.take((4, DH), np.float32)
  b = second.ctypes.data
  assert b != a  # `alias` still uses the first buffer
  del second
  third = buffers.take((4, DH), np.float32)
  assert third.ctypes.data == b  # free again: reused, while the first is still in use
  del third, alias
  gc.collect()  # jax lets go of the memory it aliased by the next garbage collection
  x, y = buffers.take((4, DH), np.float32), buffers.take((4, DH), np.float32)
  assert {x.ctypes.data, y.ctypes.data} == {a, b}  # both reused, nothing new allocated


def test_fetched_rows_survive_later_fetches():
  rows = base.init_rows(R, DH, 5)
  table = memory.create("device", num_rows=R, dim=DH, rows=rows, engine="numpy")
  rng = np.random.default_rng(5)
  ids = _ids(rng)
  kept = table.fetch(ids)
  for _ in range(5):  # more fetches of the same shape than the pool keeps buffers
    table.fetch(_ids(rng))
  np.testing.assert_array_equal(kept, rows[ids])
