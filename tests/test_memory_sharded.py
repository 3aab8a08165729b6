"""Tests of the sharded table and backend (engram_jax/memory/sharded.py, sharded_backend.py) on
8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax import memory
from engram_jax.config import OptimConfig
from engram_jax.memory import base, device, sharded

R, DH = 1001, 8  # R not a multiple of 8: the last shard is padded
CFG = OptimConfig()
W = np.linspace(-1.0, 1.0, DH, dtype=np.float32)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def _spec(mesh, **kw):
  return sharded.ShardSpec(mesh, "data", R, **kw)


def _lookup(state, ids, spec):
  return jax.jit(sharded.lookup_with_route, static_argnames="spec")(state, ids, spec)


def test_shards_hold_row_ranges(mesh):
  spec = _spec(mesh)
  rows = base.init_rows(R, DH, 0)
  state = sharded.init(lambda a, b: rows[a:b], spec, DH, np.float32)
  assert spec.rows_per_shard == 126 and state.table.shape == (1008, DH)
  shards = sorted(state.table.addressable_shards, key=lambda s: s.index[0].start)
  assert [s.data.shape for s in shards] == [(126, DH)] * 8  # no device holds more
  np.testing.assert_array_equal(shards[3].data, rows[378:504])
  np.testing.assert_array_equal(np.asarray(state.table)[R:], 0.0)


@pytest.mark.parametrize(
  ("kw", "adversarial", "overflow"),
  [
    ({"slack": 4.0}, False, False),  # all-to-all, buckets fit
    ({"slack": 4.0}, True, True),  # every id owned by shard 0: the overflow path
    ({"route": "all_gather"}, False, True),
    # The owners' gathers by the Pallas kernel (interpret mode), on both routes.
    ({"slack": 4.0, "implementation": "pallas"}, False, False),
    ({"slack": 4.0, "implementation": "pallas"}, True, True),
  ],
)
def test_rows_identical_to_device(mesh, kw, adversarial, overflow):
  spec = _spec(mesh, **kw)
  rows = base.init_rows(R, DH, 1)
  state = sharded.init(lambda a, b: rows[a:b], spec, DH, np.float32)
  rng = np.random.default_rng(1)
  if adversarial:
    ids = rng.integers(0, spec.rows_per_shard, (16, 6, 4))  # 384 ids, 48 per device, C = 24
  else:
    ids = rng.integers(0, R, (16, 6, 4))
  ids = jax.device_put(ids.astype(np.int32), NamedSharding(mesh, P("data")))
  got, took_overflow = _lookup(state, ids, spec)
  np.testing.assert_array_equal(got, rows[np.asarray(ids)])
  np.testing.assert_array_equal(took_overflow, [overflow] * 8)
  assert got.sharding.spec[0] == "data"  # rows come back split like the ids


def _toy_training(step_fn, state, batches):
  losses, overflows = [], []
  for ids, target in batches:
    state, loss, overflow = step_fn(state, ids, target)
    losses.append(float(loss))
    overflows.append(bool(np.all(overflow)))
  return state, losses, overflows


def _make_step(lookup, update):
  def step(state, ids, target):
    def loss_fn(rows):  # [B, T, H, Dh] -> [B, T]: sum over heads of rows . w
      pred = jnp.einsum("bthd,d->bt", rows, jnp.asarray(W))
      return jnp.mean((pred - target) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(lookup(state, ids))
    state, overflow = update(state, ids, g, 0.05)
    return state, loss, overflow

  return jax.jit(step, donate_argnums=0)


@pytest.mark.parametrize(
  ("kw", "modulus", "overflow"),
  [
    ({"slack": 4.0}, R, False),
    ({"slack": 4.0}, 126, True),  # every id owned by shard 0: the overflow path via cond
    ({"route": "all_gather"}, R, True),
    # Gathers and gradient sums by the Pallas kernels (interpret mode).
    ({"slack": 4.0, "implementation": "pallas"}, R, False),
  ],
)
def test_short_training_matches_the_single_device_run(mesh, kw, modulus, overflow):
  spec = _spec(mesh, **kw)
  rows = base.init_rows(R, DH, 2)
  rng = np.random.default_rng(2)
  batches = []
  for _ in range(5):
    # Zipf-like ids: hot rows repeat within and across devices.
    ids = (rng.zipf(1.3, (16, 4, 3)) * 37 % modulus).astype(np.int32)
    batches.append((ids, rng.standard_normal((16, 4)).astype(np.float32)))
  single = _make_step(
    device.lookup, lambda s, i, g, lr: (device.update(s, i, g, lr, CFG), jnp.zeros((), bool))
  )
  ref_state, ref_losses, _ = _toy_training(single, device.init(rows), batches)

  multi = _make_step(
    lambda s, i: sharded.lookup(s, i, spec),
    lambda s, i, g, lr: sharded.update_with_route(s, i, g, lr, CFG, spec),
  )
  placed = [(jax.device_put(i, spec.ids_sharding()), t) for i, t in batches]
  state = sharded.init(lambda a, b: rows[a:b], spec, DH, np.float32)
  state, losses, overflows = _toy_training(multi, state, placed)
  assert overflows == [overflow] * 5  # the update took the route the test meant
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.table)[:R], ref_state.table, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.opt.nu)[:R], ref_state.opt.nu, rtol=1e-4, atol=1e-9)
  assert int(state.opt.count) == 5


def test_table_object_on_an_explicit_mesh():
  mesh = jax.make_mesh((8,), ("x",))  # explicit axes (jax.make_mesh's default)
  rows = base.init_rows(R, DH, 3)
  table = memory.create("sharded", num_rows=R, dim=DH, rows=rows, mesh=mesh, slack=4.0)
  ref = memory.create("device", num_rows=R, dim=DH, rows=rows)
  rng = np.random.default_rng(3)
  for _ in range(2):
    ids = rng.integers(0, R, (5, 7, 3)).astype(np.int32)  # 105 ids: padded to 112
    np.testing.assert_array_equal(table.fetch(ids), ref.fetch(ids))
    grads = rng.standard_normal((5, 7, 3, DH)).astype(np.float32)
    table.apply_gradients(ids, grads, 0.01, CFG)
    ref.apply_gradients(ids, grads, 0.01, CFG)
  np.testing.assert_allclose(table.rows(), ref.rows(), rtol=1e-6, atol=1e-7)
  stats = table.stats()
  assert stats["rows_fetched"] == 210 and stats["updates"] == 2 and stats["bytes_exchanged"] > 0


def test_all_to_all_moves_fewer_bytes_than_all_gather(mesh):
  spec = _spec(mesh)
  n = 4096  # ids per device
  a2a = spec.exchange_bytes(n, 64, 2, "all_to_all")
  gather = spec.exchange_bytes(n, 64, 2, "all_gather")
  assert spec.capacity(n) == 1024 and a2a * 4 == gather
  with pytest.raises(ValueError, match="axis"):
    sharded.ShardSpec(mesh, "model", R)
  with pytest.raises(ValueError, match="route"):
    sharded.ShardSpec(mesh, "data", R, route="ring")
