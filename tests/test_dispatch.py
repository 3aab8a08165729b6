"""Tests of the lookup dispatch: both implementations agree and the switch really switches."""

import functools

import chex
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.memory import base, dispatch

OFFSETS = np.array([0, 11, 18], np.int32)
NUM_ROWS = 31
WIDTH = 24


def _primitives(jaxpr) -> set[str]:
  """Names of every primitive in a jaxpr, nested jaxprs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def _used(implementation, table, ids) -> set[str]:
  fn = functools.partial(dispatch.lookup, implementation=implementation)
  return _primitives(jax.make_jaxpr(fn)(table, ids, OFFSETS).jaxpr)


def _inputs(dtype=jnp.float32):
  table = jax.random.normal(jax.random.key(0), (NUM_ROWS, WIDTH), jnp.float32).astype(dtype)
  rng = np.random.default_rng(0)
  ids = np.stack([rng.integers(0, s, size=(2, 5)) for s in (11, 7, 13)], axis=-1)  # [B, T, H]
  ids[0, 0, 0] = 0
  ids[-1, -1, -1] = 12  # the table's last row
  return table, jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_implementations_return_identical_rows(dtype):
  table, ids = _inputs(dtype)
  pallas = jax.jit(functools.partial(dispatch.lookup, implementation="pallas"))
  xla = jax.jit(functools.partial(dispatch.lookup, implementation="xla"))
  rows = pallas(table, ids, OFFSETS)
  chex.assert_shape(rows, (2, 5, 3, WIDTH))
  assert rows.dtype == dtype
  chex.assert_trees_all_equal(rows, xla(table, ids, OFFSETS))
  expected = np.asarray(table)[np.asarray(ids) + OFFSETS]
  np.testing.assert_array_equal(np.asarray(rows), expected)


def test_gradients_agree():
  table, ids = _inputs()
  weights = jax.random.normal(jax.random.key(1), (2, 5, 3, WIDTH))

  def grad(implementation):
    loss = lambda t: jnp.sum(
      dispatch.lookup(t, ids, OFFSETS, implementation=implementation) * weights
    )
    return jax.jit(jax.grad(loss))(table)

  chex.assert_trees_all_close(grad("pallas"), grad("xla"), rtol=1e-6, atol=1e-6)


def test_forcing_switches_the_implementation(monkeypatch):
  table, ids = _inputs()
  assert "pallas_call" in _used("pallas", table, ids)
  assert "pallas_call" not in _used("xla", table, ids)
  assert "gather" in _used("xla", table, ids)
  assert "pallas_call" not in _used("auto", table, ids)  # CPU: auto is XLA
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert dispatch.resolve_implementation("auto") == "pallas"
  assert "pallas_call" in _used("auto", table, ids)


def _backend_calls(kind, impl):
  """The primitives of a backend's lookup and (where it trains) update, traced under impl."""
  from engram_jax import memory, sharding
  from engram_jax.config import MemoryConfig, MeshConfig, OptimConfig

  mesh = sharding.make_mesh(MeshConfig(data=8)) if kind == "sharded" else None
  storage = "mxfp8" if kind in ("host", "tiered") else "float32"  # read-only, rows decoded
  cfg = MemoryConfig(kind=kind, lookup_impl=impl, storage=storage)
  backend = memory.backend(cfg, mesh, trainable=kind in ("device", "sharded"))
  rows = np.asarray(_inputs()[0])[:, :16]  # [R, Dh]: whole 32-column blocks need Dh = 32
  rows = np.concatenate([rows, rows], axis=1)
  state = backend.build(lambda a, b: rows[a:b], NUM_ROWS, 32)
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % NUM_ROWS  # [B, T] flat row ids
  if kind == "tiered":
    state = backend.calibrate(state, [np.asarray(ids)])
  names = _primitives(jax.make_jaxpr(backend.lookup)(state, ids).jaxpr)
  if backend.trainable:
    update = lambda st, i, g: backend.update(st, i, g, 0.1, OptimConfig())
    grads = jnp.ones((2, 8, 32), jnp.float32)
    return names, _primitives(jax.make_jaxpr(update)(state, ids, grads).jaxpr)
  return names, None


@pytest.mark.parametrize("kind", ["device", "sharded", "host", "tiered"])
def test_every_backend_switches_to_the_kernels(kind):
  for impl, pallas in (("pallas", True), ("xla", False)):
    lookup, update = _backend_calls(kind, impl)
    assert ("pallas_call" in lookup) == pallas, (kind, impl)
    if update is not None:  # the sort-and-sum of the gradients
      assert ("pallas_call" in update) == pallas, (kind, impl)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "mxfp8"])
def test_gather_and_decode_rows_agree(storage):
  from engram_jax.memory import storage as storage_lib

  rows = np.asarray(jax.random.normal(jax.random.key(1), (NUM_ROWS, 64)), np.float32) * 9
  parts = storage_lib.encode(rows, storage)
  values, scale = jnp.asarray(parts["values"]), parts.get("scale")
  ids = jnp.asarray([[0, 30, 5], [5, 5, 17]], jnp.int32)  # first and last row, repeats
  for dtype in (jnp.float32, jnp.bfloat16):
    got = {
      impl: dispatch.gather_rows(values, ids, storage, scale, dtype, impl)
      for impl in ("pallas", "xla")
    }
    assert got["pallas"].shape == (2, 3, 64) and got["pallas"].dtype == dtype
    chex.assert_trees_all_equal(got["pallas"], got["xla"])
    want = storage_lib.decode(
      {k: v[np.asarray(ids)] for k, v in parts.items()}, storage, np.float32
    ).astype(dtype)
    np.testing.assert_array_equal(np.asarray(got["xla"], np.float32), np.asarray(want, np.float32))
    packed = dispatch.decode_rows(values, storage, scale, dtype, "pallas")
    chex.assert_trees_all_equal(packed, dispatch.decode_rows(values, storage, scale, dtype, "xla"))


def test_the_memory_config_chooses_the_implementation():
  from engram_jax import memory
  from engram_jax.config import MemoryConfig

  table, ids = _inputs()
  state = base.init_state(table)
  for impl, pallas in (("pallas", True), ("xla", False)):
    b = memory.backend(MemoryConfig(lookup_impl=impl))
    jaxpr = str(jax.make_jaxpr(b.lookup)(state, ids[..., 0]))
    assert ("pallas_call" in jaxpr) == pallas, impl
  with pytest.raises(ValueError, match="lookup_impl: expected one of"):
    MemoryConfig(lookup_impl="triton")


@pytest.mark.parametrize(
  ("table_shape", "ids", "offsets", "message"),
  [
    ((NUM_ROWS, WIDTH), np.zeros((2, 3), np.int32), OFFSETS, r"expected one of"),
    ((NUM_ROWS,), np.zeros((2, 3), np.int32), OFFSETS, r"table: expected rank 2"),
    ((NUM_ROWS, WIDTH), np.zeros((2, 3), np.float32), OFFSETS, r"ids: expected an integer"),
    ((NUM_ROWS, WIDTH), np.zeros((2, 4), np.int32), OFFSETS, r"last axis \(4\).*offsets \(3\)"),
    ((NUM_ROWS, WIDTH), np.zeros((2, 3), np.int32), OFFSETS[None], r"offsets: expected a rank-1"),
    ((NUM_ROWS, WIDTH), np.zeros((2, 3), np.int32), OFFSETS * 1.0, r"offsets: expected a rank-1"),
  ],
)
def test_rejects_bad_arguments(table_shape, ids, offsets, message):
  implementation = "gather" if message == r"expected one of" else "xla"
  with pytest.raises(ValueError, match=message):
    dispatch.lookup(jnp.zeros(table_shape), ids, offsets, implementation=implementation)
