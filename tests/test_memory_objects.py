"""Tests of engram_jax/memory/objects.py: the table objects of `memory.create` are one wrapper
over the backend contract, so an object and a jitted training step share one implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import memory, sharding
from engram_jax.config import MemoryConfig, MeshConfig, OptimConfig
from engram_jax.memory import backends, base

R, DH = 300, 8
CFG = OptimConfig()
_OPTIONS = {"device": {}, "host": {}, "tiered": {"cache_rows": 16, "policy": "static"}}


def _step(backend):
  """A jitted train step over one table, written against the contract alone."""
  w = jnp.linspace(-1.0, 1.0, DH)

  def step(state, ids):
    loss_fn = lambda rows: jnp.mean((rows @ w) ** 2)  # [..., Dh] @ [Dh] -> [...]
    grads = jax.grad(loss_fn)(backend.lookup(state, ids))
    return backend.update(state, ids, grads, 0.01, CFG), grads

  return jax.jit(step, donate_argnums=0)


@pytest.mark.parametrize("kind", sorted(_OPTIONS))
def test_an_object_runs_its_backend_and_takes_back_a_trained_state(kind):
  rows = base.init_rows(R, DH, 0)
  table = memory.create(kind, num_rows=R, dim=DH, rows=rows, **_OPTIONS[kind])
  twin = memory.create(kind, num_rows=R, dim=DH, rows=rows, **_OPTIONS[kind])
  assert type(table.backend) is backends.backend_class(kind)
  # The object's state is the backend's, as `init` builds it for a training step.
  fresh = jax.eval_shape(table.backend.init, jax.ShapeDtypeStruct((R, DH), jnp.float32))
  assert jax.tree.structure(table.state) == jax.tree.structure(fresh)
  ids = np.random.default_rng(1).integers(0, R, (4, 5, 3)).astype(np.int32)
  table.calibrate([ids])
  twin.calibrate([ids])
  state, grads = _step(table.backend)(table.state, jnp.asarray(ids))
  table.set_state(state)
  twin.apply_gradients(ids, np.asarray(grads), 0.01, CFG)  # the object's own route
  np.testing.assert_array_equal(table.rows(), twin.rows())
  np.testing.assert_array_equal(table.fetch(ids), twin.fetch(ids))
  with pytest.raises(ValueError, match="state"):
    table.set_state({"table": state})


def test_sharded_object_is_the_training_backend_on_its_mesh():
  mesh = sharding.make_mesh(8)
  rows = base.init_rows(R, DH, 2)
  table = memory.create("sharded", num_rows=R, dim=DH, rows=rows, mesh=mesh)
  training = backends.backend(
    MemoryConfig(kind="sharded"), mesh, table_axes=MeshConfig().table_axes
  )
  assert table.backend.axis == training.axis == "data"  # split the same way
  assert table.state.table.shape == (backends.padded_rows(R), DH)  # training's padding
  ids = np.random.default_rng(2).integers(0, R, (8, 3)).astype(np.int32)
  np.testing.assert_array_equal(table.fetch(ids), rows[ids])


def test_storage_types_belong_to_the_host_tiers():
  with pytest.raises(ValueError, match="storage"):
    backends.backend(MemoryConfig(kind="device", storage="bfloat16"))
  with pytest.raises(ValueError, match="read-only"):
    backends.backend(MemoryConfig(kind="host", storage="int8"))  # trainable by default
  table = memory.create("host", num_rows=R, dim=DH, storage="int8")
  assert not table.trainable and table.backend.storage == "int8"
  with pytest.raises(ValueError, match="read-only"):
    table.apply_gradients(np.zeros((2,), np.int32), np.zeros((2, DH)), 0.1, CFG)


def test_prefetch_and_calibrate_exist_for_every_kind():
  for kind in ("device", "host"):
    table = memory.create(kind, num_rows=R, dim=DH, seed=3)
    table.calibrate([np.arange(10)])  # no cache: nothing to fill
    ids = np.array([[0, 7], [R - 1, 3]])
    np.testing.assert_array_equal(table.prefetch(ids).result(), table.rows()[ids])
  assert "policy" in memory.options("tiered") and "policy" not in memory.options("host")
