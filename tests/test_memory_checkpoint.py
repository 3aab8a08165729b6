"""Checkpoints of every backend restore into every other (engram_jax/memory/checkpoint.py)."""

import jax
import numpy as np
import pytest

from engram_jax import memory
from engram_jax.config import OptimConfig
from engram_jax.memory import checkpoint, storage

R, DH = 1001, 8
CFG = OptimConfig()
KINDS = ("device", "sharded", "host", "tiered")
OPTIONS = {"tiered": {"cache_rows": 64, "policy": "lfu", "refresh_every": 1}, "sharded": {}}


def _make(kind, seed):
  return memory.create(kind, num_rows=R, dim=DH, seed=seed, **OPTIONS.get(kind, {}))


def _batch(rng):
  ids = (rng.zipf(1.3, (8, 6)) * 31 % R).astype(np.int32)
  return ids, rng.standard_normal((8, 6, DH)).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{kind: (directory, rows after training, the next batch)} for two steps of each backend."""
  out = {}
  for kind in KINDS:
    table, rng = _make(kind, seed=7), np.random.default_rng(0)
    for _ in range(2):
      ids, grads = _batch(rng)
      table.fetch(ids)
      table.apply_gradients(ids, grads, 0.05, CFG)
    directory = tmp_path_factory.mktemp(kind)
    table.save(directory)
    nxt = _batch(rng)
    out[kind] = (directory, table.rows(), nxt)
  return out


@pytest.mark.parametrize("source", KINDS)
def test_every_backend_restores_every_checkpoint(saved, source):
  directory, rows, (ids, grads) = saved[source]
  assert checkpoint.read_meta(directory)["kind"] == source
  after = {}
  for target in KINDS:
    table = _make(target, seed=99)
    table.restore(directory)
    np.testing.assert_array_equal(table.rows(), rows, err_msg=f"{source} -> {target}")
    np.testing.assert_array_equal(table.fetch(ids), rows[ids])
    # The moments and the step count came along: the next step agrees across backends.
    table.apply_gradients(ids, grads, 0.05, CFG)
    after[target] = table.rows()
  for target in KINDS:
    np.testing.assert_allclose(after[target], after["device"], rtol=1e-6, atol=1e-7)


def test_sharded_checkpoint_is_written_and_read_per_shard(saved, tmp_path):
  table = _make("sharded", seed=1)
  item = table._checkpoint_items()["table"]
  shards = item.addressable_shards
  assert len(shards) == 8 and not item.is_fully_replicated
  assert {s.data.shape for s in shards} == {(table.spec.rows_per_shard, DH)}
  table.restore(saved["device"][0])
  assert table.state.table.sharding == table.spec.table_sharding()
  assert table.state.opt.count.sharding.is_fully_replicated


def test_host_checkpoint_restores_into_pinned_host_memory(saved):
  table = _make("host", seed=2)
  table.restore(saved["sharded"][0])
  for x in (table.state.table, table.state.opt.mu, table.state.opt.nu):
    assert x.sharding.memory_kind == "pinned_host"
  assert int(table.state.opt.count) == 2


def test_read_only_tables_round_trip(saved, tmp_path):
  directory, rows, _ = saved["device"]
  quantised = memory.create("host", num_rows=R, dim=DH, storage="int8")
  quantised.restore(directory)
  np.testing.assert_allclose(quantised.rows(), storage.round_trip(rows, "int8"), rtol=1e-6)
  quantised.save(tmp_path / "int8")
  assert not checkpoint.read_meta(tmp_path / "int8")["has_opt"]
  for kind in KINDS:
    fresh = _make(kind, seed=3)
    fresh.restore(tmp_path / "int8")  # no moments saved: they start at zero
    np.testing.assert_array_equal(fresh.rows(), quantised.rows())
    state = fresh.lower.state if kind == "tiered" else fresh.state
    assert int(state.opt.count) == 0 and not np.any(np.asarray(state.opt.mu))
    assert state.opt.nu.sharding.memory_kind == state.table.sharding.memory_kind


def test_mismatched_tables_are_rejected(saved, tmp_path):
  other = memory.create("device", num_rows=R + 1, dim=DH)
  with pytest.raises(ValueError, match=r"\[1001, 8\] table"):
    other.restore(saved["device"][0])
  with pytest.raises(ValueError, match="not a table checkpoint"):
    other.restore(tmp_path)
  assert jax.device_count() == 8
