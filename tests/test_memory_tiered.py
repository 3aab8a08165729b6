"""Tests of the tiered backend (engram_jax/memory/tiered.py): a device cache over a host or
disk table."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import memory
from engram_jax.config import OptimConfig
from engram_jax.interop import safetensors
from engram_jax.memory import base, storage, tiered

R, DH = 2000, 8
CFG = OptimConfig()


def _zipf(rng, shape, a=1.2):
  return ((rng.zipf(a, size=shape) - 1) * 7919 % R).astype(np.int32)


@pytest.mark.parametrize("policy", ["lfu", "lru", "static"])
def test_rows_and_training_equal_the_device_backend(policy):
  rows = base.init_rows(R, DH, 0)
  ref = memory.create("device", num_rows=R, dim=DH, rows=rows)
  table = memory.create(
    "tiered", num_rows=R, dim=DH, rows=rows, cache_rows=100, policy=policy, refresh_every=2
  )
  rng = np.random.default_rng(0)
  if policy == "static":
    table.calibrate([_zipf(rng, (64, 3)) for _ in range(4)])
  for _ in range(6):
    ids = _zipf(rng, (8, 4, 3))
    np.testing.assert_array_equal(table.fetch(ids), ref.fetch(ids))
    grads = rng.standard_normal((8, 4, 3, DH)).astype(np.float32)
    table.apply_gradients(ids, grads, 0.01, CFG)
    ref.apply_gradients(ids, grads, 0.01, CFG)
    # Write-through: cached rows hold the host table's current values.
    cached = np.asarray(table.state.cached_ids)
    live = cached < R
    np.testing.assert_array_equal(np.asarray(table.state.cache)[live], ref.rows()[cached[live]])
  assert np.all(np.asarray(table.state.cached_ids) < R)  # filled (LFU: after its first refills)
  assert 0 < table.stats()["hits"] < table.stats()["rows_fetched"]
  np.testing.assert_array_equal(table.rows(), ref.rows())
  assert table.state.lower.table.sharding.memory_kind == "pinned_host"


def test_transfer_path_moves_each_missed_row_once():
  # engine='jit' runs the backend's jitted lookup (the training step's): misses are gathered on
  # the host, deduplicated, and only those cross to the device.
  rows = base.init_rows(R, DH, 0)
  ref = memory.create("device", num_rows=R, dim=DH, rows=rows)
  table = memory.create(
    "tiered", num_rows=R, dim=DH, rows=rows, cache_rows=4, policy="static", engine="jit"
  )
  table.calibrate([np.array([5, 5, 9, 9, 7, 11])])
  table.reset_stats()
  ids = np.array([[5, 300, 300, 9], [300, 40, 40, 7], [1999, 11, 40, 5]])  # misses: 300, 40, 1999
  np.testing.assert_array_equal(table.fetch(ids), ref.fetch(ids))
  stats = table.stats()
  assert (stats["hits"], stats["misses"]) == (5, 7)
  assert stats["bytes_to_device"] == 3 * DH * 4  # three distinct missed rows
  rng = np.random.default_rng(3)
  for _ in range(3):
    ids = _zipf(rng, (16, 5))
    np.testing.assert_array_equal(table.fetch(ids), ref.fetch(ids))


def test_lru_keeps_the_rows_used_last():
  table = memory.create(
    "tiered", num_rows=R, dim=DH, seed=1, cache_rows=2, policy="lru", refresh_every=1
  )
  table.fetch(np.array([5, 6, 5, 5]))  # 5 is the most frequent ...
  table.fetch(np.array([6, 7]))  # ... but 6 and 7 were used last
  np.testing.assert_array_equal(table.state.cached_ids, [6, 7])
  table.reset_stats()
  ids = np.array([7, 5, 6])
  np.testing.assert_array_equal(table.fetch(ids), table.rows()[ids])
  assert (table.stats()["hits"], table.stats()["misses"]) == (2, 1)
  table.calibrate([np.array([1, 2]), np.array([3, 1])])  # the last uses decide here too
  np.testing.assert_array_equal(table.state.cached_ids, [1, 3])


def test_pure_lookup_moves_distinct_misses():
  rows = base.init_rows(R, DH, 4)
  table = memory.create("tiered", num_rows=R, dim=DH, rows=rows, cache_rows=8, policy="static")
  table.calibrate([np.arange(8)])  # rows 0..7 cached
  state = table.state
  route = jax.jit(tiered.lookup_with_route, static_argnames=("miss_capacity", "dtype"))
  rng = np.random.default_rng(5)
  repeated = rng.choice(np.arange(100, 110), size=(40, 25))  # 1,000 misses of 10 distinct rows
  repeated[::3, ::2] = rng.integers(0, 8, size=repeated[::3, ::2].shape)  # and some hits
  got, overflow = route(state, jnp.asarray(repeated), 16)
  np.testing.assert_array_equal(got, rows[repeated])
  assert not overflow  # 10 distinct misses fit 16 slots, however often each repeats
  spread = np.arange(100, 120)  # 20 distinct misses > 16: every id from the host
  got, overflow = route(state, jnp.asarray(spread), 16)
  np.testing.assert_array_equal(got, rows[spread])
  assert overflow


def test_hit_rate_accounting():
  table = memory.create("tiered", num_rows=R, dim=DH, seed=1, cache_rows=4, policy="static")
  assert table.fetch(np.array([1, 2, 3])).shape == (3, DH)
  assert table.stats()["hit_rate"] == 0.0  # an empty cache misses everything
  table.calibrate([np.array([5, 5, 5, 9, 9, 7, 7, 11, 11, 12])])  # top 4: 5, 9, 7, 11
  np.testing.assert_array_equal(table.state.cached_ids, [5, 7, 9, 11])
  table.reset_stats()
  ids = np.array([[5, 9, 100], [7, 7, 12], [11, 5, 1999]])  # 6 hits, 3 misses
  np.testing.assert_array_equal(table.fetch(ids), table.rows()[ids])
  stats = table.stats()
  assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (6, 3, 6 / 9)
  assert stats["bytes_to_device"] == 3 * DH * 4  # only the misses crossed
  assert stats["bytes_fetched"] == 9 * DH * 4


def test_lfu_learns_the_hot_rows_online():
  table = memory.create(
    "tiered", num_rows=R, dim=DH, cache_fraction=0.05, policy="lfu", refresh_every=4
  )
  rng = np.random.default_rng(2)
  rates = []
  for _ in range(3):
    table.reset_stats()
    for _ in range(4):
      table.fetch(_zipf(rng, (64, 8)))
    rates.append(table.stats()["hit_rate"])
  assert rates[0] < 0.05 < 0.5 < rates[-1]  # empty at first; most Zipf ids hit after a refill


def test_pure_core_lookup_and_update():
  rows = base.init_rows(R, DH, 3)
  tables = [
    memory.create("tiered", num_rows=R, dim=DH, rows=rows, cache_rows=50, policy="static")
    for _ in range(2)
  ]
  rng = np.random.default_rng(3)
  calibration = _zipf(rng, (256,))
  for t in tables:
    t.calibrate([calibration])
  state, table = tables[0].state, tables[1]  # the state is donated below
  ids = jnp.asarray(_zipf(rng, (6, 5)))
  lookup = jax.jit(tiered.lookup, static_argnames=("miss_capacity", "dtype"))
  for capacity in (2, 64):  # 2: more misses than room, every id comes from the host
    np.testing.assert_array_equal(lookup(state, ids, capacity), rows[np.asarray(ids)])
  grads = jnp.asarray(rng.standard_normal((6, 5, DH)), jnp.float32)
  state = jax.jit(tiered.update, static_argnames="cfg", donate_argnums=0)(
    state, ids, grads, jnp.float32(0.01), CFG
  )
  table.apply_gradients(np.asarray(ids), np.asarray(grads), 0.01, CFG)  # the object route
  np.testing.assert_array_equal(np.asarray(state.lower.table)[:R], table.rows())
  np.testing.assert_array_equal(state.cache, table.state.cache)
  np.testing.assert_array_equal(lookup(state, ids, 64), table.rows()[np.asarray(ids)])
  tables[0].set_state(state)  # back to the object: it serves the updated rows
  np.testing.assert_array_equal(tables[0].fetch(ids), table.rows()[np.asarray(ids)])
  with pytest.raises(ValueError, match="other rows"):
    table.set_state(state._replace(cached_ids=state.cached_ids + 1))


@pytest.mark.parametrize(("kind", "dim"), [("int8", DH), ("mxfp8", 32)])
def test_disk_tier_is_read_only_and_serves_stored_rows(tmp_path, kind, dim):
  rows = base.init_rows(R, dim, 4)
  storage.save_memmap(tmp_path / "table", rows, kind)
  table = memory.create(
    "tiered", num_rows=R, dim=dim, disk=tmp_path / "table", cache_rows=30, policy="static"
  )
  ids = _zipf(np.random.default_rng(4), (40, 3))
  table.calibrate([ids])
  expected = storage.round_trip(rows, kind)[ids]
  np.testing.assert_allclose(table.fetch(ids), expected, rtol=1e-6, atol=1e-7)
  assert table.stats()["hit_rate"] > 0.5
  with pytest.raises(ValueError, match="read-only"):
    table.apply_gradients(ids, np.zeros((*ids.shape, dim), np.float32), 0.1, CFG)
  with pytest.raises(ValueError, match="disk tier"):
    memory.create(
      "tiered", num_rows=R, dim=dim, disk=tmp_path / "table", cache_rows=3, storage=kind
    )


def test_options_are_checked():
  with pytest.raises(ValueError, match="exactly one"):
    memory.create("tiered", num_rows=R, dim=DH)
  with pytest.raises(ValueError, match="cache size"):
    memory.create("tiered", num_rows=R, dim=DH, cache_rows=R + 1)
  with pytest.raises(ValueError, match="policy"):
    memory.create("tiered", num_rows=R, dim=DH, cache_rows=3, policy="fifo")


def test_disk_tier_serves_a_safetensors_checkpoints_mxfp8_table():
  ckpt = safetensors.Checkpoint.open(
    pathlib.Path(__file__).parent / "data" / "v41" / "engram.safetensors"
  )
  r, dh = 24562, 32  # V4.1 example, layer 1: F8_E4M3 values, one F8_E8M0 exponent per row
  parts = {
    "values": ckpt.require("layers.1.engram.embed.weight", "F8_E4M3", (r, dh)),
    "scale": ckpt.require("layers.1.engram.embed.scale", "F8_E8M0", (r, dh // 32)),
  }
  table = memory.create(
    "tiered", num_rows=r, dim=dh, disk=(parts, "mxfp8"), cache_rows=400, policy="static"
  )
  rng = np.random.default_rng(5)
  ids = ((rng.zipf(1.2, size=(64, 12)) - 1) * 7919 % r).astype(np.int32)
  table.calibrate([ids[:32]])
  expected = storage.decode({k: np.asarray(v)[ids] for k, v in parts.items()}, "mxfp8")
  np.testing.assert_array_equal(table.fetch(ids), expected)
  assert 0.3 < table.stats()["hit_rate"] < 1  # some rows from the cache, some from the file
  with pytest.raises(ValueError, match=r"mxfp8 values: expected float8_e4m3fn \(24562, 64\)"):
    memory.create("tiered", num_rows=r, dim=2 * dh, disk=(parts, "mxfp8"), cache_rows=4)
  with pytest.raises(ValueError, match=r"expected parts \['values'\] for 'bfloat16'"):
    memory.create("tiered", num_rows=r, dim=dh, disk=(parts, "bfloat16"), cache_rows=4)
  swapped = {"values": parts["values"], "scale": parts["scale"].view(np.int8)}
  with pytest.raises(ValueError, match="mxfp8 scale: expected uint8"):
    memory.create("tiered", num_rows=r, dim=dh, disk=(swapped, "mxfp8"), cache_rows=4)
