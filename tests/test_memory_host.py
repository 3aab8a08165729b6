"""Tests of the host backend (engram_jax/memory/host.py): pinned host memory, gathers on the
host, only fetched rows crossing, the update on the host, prefetch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import memory
from engram_jax.config import OptimConfig
from engram_jax.memory import base, host, storage

R, DH = 400, 8
CFG = OptimConfig()


def _batch(rng, shape=(3, 5, 4)):
  ids = rng.integers(0, R, shape).astype(np.int32)
  return ids, rng.standard_normal((*shape, DH)).astype(np.float32)


def _memory_kinds(state: host.HostState) -> set[str]:
  return {x.sharding.memory_kind for x in (state.table, state.opt.mu, state.opt.nu)}


def _entry_layout(compiled_text: str) -> str:
  """The `entry_computation_layout={...}` of a compiled module's text (braces balanced)."""
  start = compiled_text.index("entry_computation_layout={") + len("entry_computation_layout={")
  depth = 1
  for end in range(start, len(compiled_text)):
    depth += {"{": 1, "}": -1}.get(compiled_text[end], 0)
    if depth == 0:
      return compiled_text[start:end]
  raise AssertionError("unbalanced entry_computation_layout")


@pytest.mark.parametrize("engine", ["numpy", "jit"])
def test_fetch_and_training_equal_the_device_backend(engine):
  rows = base.init_rows(R, DH, 0)
  on_host = memory.create("host", num_rows=R, dim=DH, rows=rows, engine=engine)
  on_device = memory.create("device", num_rows=R, dim=DH, rows=rows)
  assert on_host.engine == engine
  rng = np.random.default_rng(0)
  for _ in range(3):
    ids, grads = _batch(rng)
    np.testing.assert_array_equal(on_host.fetch(ids), on_device.fetch(ids))
    on_host.apply_gradients(ids, grads, 0.01, CFG)
    on_device.apply_gradients(ids, grads, 0.01, CFG)
    # The table and its moments never leave pinned host memory.
    assert _memory_kinds(on_host.state) == {host.PINNED_HOST}
  np.testing.assert_array_equal(on_host.rows(), on_device.rows())  # bitwise, same Adam
  np.testing.assert_array_equal(on_host.state.opt.mu, on_device.state.opt.mu)
  stats = on_host.stats()
  assert stats["bytes_to_device"] == 3 * ids.size * DH * 4  # only the fetched rows crossed


def test_compiled_step_keeps_the_table_in_host_memory_space():
  state = host.init(base.init_rows(R, DH, 1))
  ids, _ = _batch(np.random.default_rng(1))
  w = jnp.linspace(-1.0, 1.0, DH)

  def step(state, ids):
    loss_fn = lambda rows: jnp.mean((rows @ w) ** 2)  # [..., Dh] @ [Dh] -> [...]
    loss, g = jax.value_and_grad(loss_fn)(host.lookup(state, ids))
    return host.update(state, ids, g, 0.01, CFG), loss

  jitted = jax.jit(step, donate_argnums=0)
  compiled = jitted.lower(state, ids).compile().as_text()
  layout = _entry_layout(compiled)
  params, outputs = layout.split("->")
  # Inputs: table, mu, nu in memory space 5 (pinned host), the ids in device memory.
  assert params.count(f"f32[{R},{DH}]{{1,0:S(5)}}") == 3
  assert outputs.count(f"f32[{R},{DH}]{{1,0:S(5)}}") == 3
  assert "s32[3,5,4]{2,1,0}" in params  # the ids: default memory space
  for _ in range(2):
    state, _ = jitted(state, ids)
    assert _memory_kinds(state) == {host.PINNED_HOST}
  # The lookup alone: table on the host, rows returned in device memory.
  lookup_text = jax.jit(host.lookup).lower(state, ids).compile().as_text()
  lookup_in, lookup_out = _entry_layout(lookup_text).split("->")
  assert f"f32[{R},{DH}]{{1,0:S(5)}}" in lookup_in and "S(5)" not in lookup_out


def test_update_is_in_place_and_independent_of_untouched_rows():
  state = host.init(base.init_rows(R, DH, 2))
  before = np.asarray(state.table).copy()
  ids, grads = _batch(np.random.default_rng(2), (2, 3))
  state = jax.jit(host.update, static_argnames="cfg", donate_argnums=0)(
    state, ids, grads, 0.01, CFG
  )
  after = np.asarray(state.table)
  untouched = np.setdiff1d(np.arange(R), ids)
  np.testing.assert_array_equal(after[untouched], before[untouched])
  assert not np.array_equal(after[ids[0, 0]], before[ids[0, 0]])


def test_prefetch_returns_the_rows_and_waits_for_updates():
  table = memory.create("host", num_rows=R, dim=DH, seed=3)
  rng = np.random.default_rng(3)
  ids, grads = _batch(rng)
  pending = table.prefetch(ids)
  expected = table.rows()[ids]
  table.apply_gradients(ids, grads, 0.1, CFG)  # waits for the prefetch first
  np.testing.assert_array_equal(pending.result(), expected)
  np.testing.assert_array_equal(table.prefetch(ids).result(), table.rows()[ids])


@pytest.mark.parametrize(("kind", "dim"), [("bfloat16", DH), ("int8", DH), ("mxfp8", 64)])
def test_storage_types_serve_rows_within_their_bounds(kind, dim):
  rows = base.init_rows(R, dim, 4)
  table = memory.create("host", num_rows=R, dim=dim, rows=rows, storage=kind)
  assert table.state.table.dtype == storage.value_dtype(kind)
  ids = np.arange(R, dtype=np.int32)
  for engine in ("numpy", "jit"):
    table.engine = engine
    got = np.asarray(table.fetch(ids))
    assert got.dtype == np.float32
    assert np.all(np.abs(got - rows) <= storage.error_bound(rows, kind) + 1e-7)
  # What crossed: int8 values + a float32 scale, e4m3 values + an exponent per 32 columns.
  per_row = {"bfloat16": 2 * dim, "int8": dim + 4, "mxfp8": dim + dim // 32}[kind]
  assert table.stats()["bytes_to_device"] == 2 * R * per_row
  if kind != "bfloat16":
    with pytest.raises(ValueError, match="read-only"):
      table.apply_gradients(ids, np.zeros((R, dim), np.float32), 0.1, CFG)


def test_options_are_checked():
  with pytest.raises(ValueError, match="storage"):
    memory.create("host", num_rows=R, dim=DH, storage="fp8")
  with pytest.raises(ValueError, match="engine"):
    memory.create("host", num_rows=R, dim=DH, engine="gpu")
