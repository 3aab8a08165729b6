"""Tests for engram_jax/memory/backends.py: the backend contract, training with the tables on
each backend, and checkpoints that move between backends."""

import dataclasses
import json
import shutil
import signal

import jax
import numpy as np
import pytest

from engram_jax import presets, sharding
from engram_jax.config import MemoryConfig, MeshConfig
from engram_jax.memory import backends as backend_lib
from engram_jax.memory.backends import table_key
from engram_jax.memory.table import TableLayout
from engram_jax.run import folder
from engram_jax.train import loop
from engram_jax.train.step import Trainer

B, T = 8, 16


def _backend(kind, mesh=None, **options):
  return backend_lib.backend(MemoryConfig(kind=kind, **options), mesh)


def _trainer(backend):
  exp = presets.tiny()
  model = dataclasses.replace(exp.model, vocab_size=101)
  e = model.engram
  layouts = {
    layer: TableLayout.from_sizes([211, 223, 227, 229], e.head_dim, 0.02) for layer in e.layer_ids
  }
  return Trainer(model, exp.optim, 20, layouts, backend)


def _batches(n, heads):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tok = rng.integers(0, 101, size=(B, T + 1)).astype(np.int32)
    hash_ids = {1: rng.integers(0, 211, size=(B, T, heads)).astype(np.int32)}
    hash_ids[1][0, :3] = 5  # repeated rows within a batch
    out.append({"tokens": tok[:, :-1], "targets": tok[:, 1:], "hash_ids": hash_ids})
  return out


def _init(trainer):
  """A fresh state of `trainer`, placed."""
  init = jax.jit(lambda k: trainer.init(k, B, T))
  return trainer.place(init(jax.random.key(0)))


def _run(backend, steps=3):
  trainer = _trainer(backend)
  state = _init(trainer)
  step = jax.jit(trainer.train_step, donate_argnums=0)
  losses = []
  for batch in _batches(steps, 4):
    state, m = step(state, trainer.shard_batch(batch))
    losses.append(float(m["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def on_device():
  return _run(_backend("device"))


def test_host_tables_train_like_device_and_stay_on_host(on_device):
  state, losses = _run(_backend("host"))
  ref_state, ref_losses = on_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  table = state.tables[table_key(1)]
  for x in (table.table, table.opt.mu, table.opt.nu):
    assert x.sharding.memory_kind == "pinned_host"
  np.testing.assert_allclose(
    np.asarray(table.table), np.asarray(ref_state.tables[table_key(1)].table), atol=1e-6
  )


def test_sharded_tables_data_parallel_like_one_device(on_device):
  state, losses = _run(_backend("sharded", sharding.make_mesh(8)))
  ref_state, ref_losses = on_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  table = state.tables[table_key(1)].table
  assert len(table.sharding.device_set) == 8
  assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 8
  np.testing.assert_allclose(
    np.asarray(table), np.asarray(ref_state.tables[table_key(1)].table), atol=1e-5
  )


def test_tiered_tables_train_like_device_with_a_written_through_cache(on_device):
  trainer = _trainer(_backend("tiered", cache_fraction=0.1))
  state = _init(trainer)
  batches = _batches(3, 4)
  state = trainer.calibrate(state, batches[:1])
  cache = state.tables[table_key(1)]
  assert cache.cache.shape[0] == round(0.1 * cache.lower.table.shape[0])
  rows = (batches[0]["hash_ids"][1] + trainer.layouts[1].offsets).reshape(-1)
  hottest = np.bincount(rows).argmax()  # the row the calibration batch read most
  assert hottest in np.asarray(cache.cached_ids)
  step = jax.jit(trainer.train_step, donate_argnums=0)
  losses = []
  for batch in batches:
    state, m = step(state, trainer.shard_batch(batch))
    losses.append(float(m["loss"]))
  _, ref_losses = on_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  table = state.tables[table_key(1)]
  assert table.lower.table.sharding.memory_kind == "pinned_host"
  filled = np.asarray(table.cached_ids) < table.lower.table.shape[0]  # [L]; the rest are empty
  assert filled.sum() > 0
  np.testing.assert_array_equal(
    np.asarray(table.cache)[filled],
    np.asarray(table.lower.table)[np.asarray(table.cached_ids)[filled]],
  )
  # A checkpoint holds the table and its moments alone, the same for every backend.
  saved = trainer.checkpoint_tree(state)["tables"][table_key(1)]
  assert type(saved) is backend_lib.TableState and saved.table is table.lower.table


def test_backend_errors():
  with pytest.raises(ValueError, match="memory: expected one of"):
    MemoryConfig(kind="disk")
  with pytest.raises(ValueError, match="mesh"):
    _backend("sharded")
  with pytest.raises(ValueError, match="one device"):
    _backend("host", sharding.make_mesh(2))
  with pytest.raises(ValueError, match="cache_fraction"):
    MemoryConfig(kind="tiered", cache_fraction=0.0)
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(99)


def test_calibrate_reads_batches_only_when_it_keeps_a_cache():
  def batches():
    raise AssertionError("read by a backend without a cache")
    yield

  trainer = _trainer(_backend("device"))
  state = jax.jit(lambda k: trainer.init(k, B, T))(jax.random.key(0))
  assert trainer.calibrate(state, batches()) is not None


def test_checkpoint_moves_between_backends(finished_run, tmp_path):
  workdir, corpus, _ = finished_run  # a copy of the shared `tiny` run, on the device backend
  exp = presets.tiny()
  kw = dict(corpus_files=(corpus,), progress=False)

  def on(exp, kind, devices=1):
    return dataclasses.replace(exp, memory=MemoryConfig(kind=kind), mesh=MeshConfig(devices))

  def stop_at(n):
    def hook(step):
      if step == n:
        signal.raise_signal(signal.SIGTERM)

    return hook

  def losses(d):
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  # The run's checkpoint of step 3 on the device backend moved across three backends: host for
  # step 4, sharded over 2 devices for step 5, tiered for step 6.
  want = losses(workdir)
  shutil.move(workdir / "checkpoints" / "6", tmp_path / "moved-6")  # its newest: step 3
  with pytest.raises(loop.Interrupted):
    loop.train(on(exp, "host"), workdir, resume=True, on_step=stop_at(4), **kw)
  with pytest.raises(loop.Interrupted):
    loop.train(on(exp, "sharded", 2), workdir, resume=True, on_step=stop_at(5), **kw)
  loop.train(on(exp, "tiered"), workdir, resume=True, **kw)
  resumes = json.loads((workdir / folder.RUN_FILE).read_text())["resumes"]
  assert [(r["from_step"], r["memory"]["kind"]) for r in resumes] == [
    (3, "host"),
    (4, "sharded"),
    (5, "tiered"),
  ]

  got = losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5
  )
