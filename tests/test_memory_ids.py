"""Tests of the out-of-range id rule (engram_jax/memory/validation.py `prepare_ids`, `clip_ids`):
every backend clamps int32 and int64 ids alike (range-checked before any int32 cast, so no id
wraps), or raises with out_of_range='raise'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from engram_jax import memory
from engram_jax.config import OptimConfig
from engram_jax.memory import base, device, dispatch, host, sharded, storage, tiered, validation
from engram_jax.memory.table import TableLayout

R, DH = 1000, 8
CFG = OptimConfig()
# -1, 0, R - 1 and R fit int32; the rest only int64 (2**32 + 5 wraps to row 5 in int32).
IDS = np.array([-1, 0, R - 1, R, 2**31, 2**32 + 5, -(2**40)], np.int64)  # [N]
CLAMPED = np.clip(IDS, 0, R - 1)  # [N]: 0, 0, R-1, R-1, R-1, R-1, 0
IN_INT32 = 4  # IDS[:4] are representable in int32
BAD = [-1, R, 2**31, 2**32 + 5, -(2**40)]


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


# (kind, options) of every backend and engine; 'mesh' marks the sharded backend's mesh.
BACKENDS = {
  "device-jit": ("device", {"engine": "jit"}),
  "device-numpy": ("device", {"engine": "numpy"}),
  "host-numpy": ("host", {"engine": "numpy"}),
  "host-jit": ("host", {"engine": "jit"}),
  "sharded": ("sharded", {"mesh": None}),
  "tiered-lfu": ("tiered", {"cache_rows": 4, "policy": "lfu", "refresh_every": 1}),
  "tiered-lru-jit": (
    "tiered",
    {"cache_rows": 4, "policy": "lru", "refresh_every": 1, "engine": "jit"},
  ),
  "tiered-static": ("tiered", {"cache_rows": 4, "policy": "static"}),
}


def _create(name, mesh, rows=None, **extra):
  kind, opts = BACKENDS[name]
  opts = dict(opts, **extra)
  if "mesh" in opts:
    opts["mesh"] = mesh
  rows = base.init_rows(R, DH, 0) if rows is None else rows
  table = memory.create(kind, num_rows=R, dim=DH, rows=rows, **opts)
  if name == "tiered-static":
    # Out-of-range ids count as their clamped rows (a 'raise' table would reject them).
    table.calibrate([IDS if table.out_of_range == "clamp" else CLAMPED, np.array([3, 5, 7])])
  return table


def test_kinds_are_all_covered():
  assert {kind for kind, _ in BACKENDS.values()} == set(memory.KINDS)
  for kind in memory.KINDS:
    assert "out_of_range" in memory.options(kind)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_fetch_clamps_int32_and_int64_alike(name, mesh):
  table = _create(name, mesh)
  full = table.rows()
  for _ in range(2):  # tiered: the second fetch reads the cache filled by the first
    got64 = np.asarray(table.fetch(IDS))  # [N] -> [N, Dh]
    np.testing.assert_array_equal(got64, full[CLAMPED])
    got32 = np.asarray(table.fetch(IDS[:IN_INT32].astype(np.int32)))
    np.testing.assert_array_equal(got32, got64[:IN_INT32])
    # jax ids (int32 with x64 off) and a 2-D shape
    ids2d = jnp.asarray(IDS[:IN_INT32].reshape(2, 2), jnp.int32)
    np.testing.assert_array_equal(
      np.asarray(table.fetch(ids2d)), full[CLAMPED[:IN_INT32]].reshape(2, 2, DH)
    )
  if name == "tiered-static":
    # calibrate counted IDS as rows 0 and R - 1 (never as the wrapped row 5).
    assert {0, R - 1} <= set(np.asarray(table.state.cached_ids).tolist())


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_apply_gradients_updates_the_clamped_row(name, mesh):
  wide = np.array([2**32 + 5, -(2**40), 3, R], np.int64)  # [N]
  clamped = np.array([R - 1, 0, 3, R - 1], np.int32)
  grads = np.random.default_rng(0).standard_normal((4, DH)).astype(np.float32)
  a, b = _create(name, mesh), _create(name, mesh)
  for table, ids in ((a, wide), (b, clamped)):
    table.fetch(ids)  # same cache history on both (tiered)
    table.apply_gradients(ids, grads, 0.01, CFG)
  np.testing.assert_array_equal(a.rows(), b.rows())
  np.testing.assert_array_equal(a.rows()[5], base.init_rows(R, DH, 0)[5])  # not wrapped to 5
  np.testing.assert_array_equal(np.asarray(a.fetch(wide)), np.asarray(b.fetch(clamped)))


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_out_of_range_raise(name, mesh):
  table = _create(name, mesh, out_of_range="raise")
  assert table.out_of_range == "raise"
  good = np.array([0, 7, R - 1], np.int64)
  np.testing.assert_array_equal(np.asarray(table.fetch(good)), table.rows()[good])
  grads = np.zeros((2, DH), np.float32)
  for bad in BAD:
    ids = np.array([0, bad], np.int64)
    with pytest.raises(ValueError, match=rf"id {bad} at index \(1,\).*\[0, {R}\)"):
      table.fetch(ids)
    with pytest.raises(ValueError, match=rf"id {bad} at index"):
      table.apply_gradients(ids, grads, 0.01, CFG)
  with pytest.raises(ValueError, match=rf"id {R} at index \(1, 0\)"):
    table.fetch(jnp.asarray([[0], [R]], jnp.int32))  # a jax array, 2-D
  with pytest.raises(ValueError, match=r"id -1 at index \(0,\)"):
    table.fetch(np.array([-1], np.int32))
  if name == "tiered-static":
    with pytest.raises(ValueError, match=rf"id {2**31} at index"):
      table.calibrate([np.array([2**31])])


def test_disk_tier_clamps_and_raises(tmp_path):
  rows = base.init_rows(R, DH, 0)
  storage.save_memmap(tmp_path / "table", rows, "float32")
  disk = dict(num_rows=R, dim=DH, disk=tmp_path / "table", cache_rows=3)
  for policy in ("lfu", "lru", "static"):
    table = memory.create("tiered", policy=policy, refresh_every=1, **disk)
    table.calibrate([IDS])
    for _ in range(2):
      np.testing.assert_array_equal(np.asarray(table.fetch(IDS)), rows[CLAMPED])
    strict = memory.create("tiered", policy=policy, out_of_range="raise", **disk)
    with pytest.raises(ValueError, match=rf"id {2**32 + 5} at index \(5,\)"):
      strict.fetch(IDS[[1, 1, 1, 1, 1, 5]])


def test_bad_out_of_range_option():
  with pytest.raises(ValueError, match=r"out_of_range: expected one of \('clamp', 'raise'\)"):
    memory.create("device", num_rows=R, dim=DH, out_of_range="wrap")
  with pytest.raises(ValueError, match="out_of_range: expected one of"):
    validation.prepare_ids(np.array([0]), R, "wrap")


def test_prepare_ids_dtypes():
  np.testing.assert_array_equal(validation.prepare_ids(IDS, R), CLAMPED)
  assert validation.prepare_ids(IDS, R).dtype == np.int32
  assert validation.prepare_ids([3, -5, 2**40], R).tolist() == [3, 0, R - 1]  # Python ints
  big = np.array([2**64 - 1, 2**63, 2**32 + 5, 4], np.uint64)
  assert validation.prepare_ids(big, R).tolist() == [R - 1, R - 1, R - 1, 4]
  assert validation.prepare_ids(np.array([-3, 100], np.int8), 50).tolist() == [0, 49]
  assert validation.prepare_ids(np.array([2**32 - 1, 7], np.uint32), R).tolist() == [R - 1, 7]
  got = validation.prepare_ids(jnp.asarray(np.array([2**32 - 1, 7], np.uint32)), R)
  assert isinstance(got, jax.Array) and got.dtype == jnp.int32
  assert got.tolist() == [R - 1, 7]
  ids = np.array([5, R], np.int32)
  validation.prepare_ids(ids, R)
  assert ids.tolist() == [5, R]  # the caller's array is not clamped in place
  with pytest.raises(ValueError, match="ids: expected an integer array"):
    validation.prepare_ids(np.array([1.0]), R)


def test_pure_cores_clamp_numpy_int64(mesh):
  # NumPy int64 ids straight into the pure cores (not through jit's int32 conversion).
  rows = base.init_rows(R, DH, 0)
  want = rows[CLAMPED]
  state = device.init(rows)
  np.testing.assert_array_equal(device.lookup(state, IDS), want)
  host_state = host.init(rows)
  np.testing.assert_array_equal(host.lookup(host_state, IDS), want)
  cache_ids = jnp.asarray([0, 3, R, R], jnp.int32)
  tstate = tiered.TieredState(jnp.asarray(rows[[0, 3, 0, 0]]), cache_ids, host_state)
  np.testing.assert_array_equal(tiered.lookup(tstate, IDS, 4), want)
  spec = sharded.ShardSpec(mesh, "data", R)
  sstate = sharded.init(lambda a, b: rows[a:b], spec, DH, np.float32)
  ids8 = np.append(IDS, 5)  # a multiple of the 8 shards
  np.testing.assert_array_equal(sharded.lookup(sstate, ids8, spec), rows[np.clip(ids8, 0, R - 1)])


def _x64_cases(mesh):
  rows = base.init_rows(R, DH, 0)
  want = rows[CLAMPED]
  state = device.init(rows)
  ids = jnp.asarray(IDS)
  assert ids.dtype == jnp.int64
  np.testing.assert_array_equal(jax.jit(device.lookup)(state, ids), want)
  grads = np.ones((IDS.shape[0], DH), np.float32)
  new = jax.jit(device.update, static_argnames="cfg")(state, ids, grads, 0.01, CFG)
  ref = jax.jit(device.update, static_argnames="cfg")(state, CLAMPED, grads, 0.01, CFG)
  np.testing.assert_array_equal(new.table, ref.table)
  np.testing.assert_array_equal(jax.jit(host.lookup)(host.init(rows), ids), want)
  spec = sharded.ShardSpec(mesh, "data", R)
  sstate = sharded.init(lambda a, b: rows[a:b], spec, DH, np.float32)
  ids8 = jax.device_put(jnp.asarray(np.append(IDS, 5)), spec.ids_sharding())
  got = jax.jit(sharded.lookup, static_argnames="spec")(sstate, ids8, spec)
  np.testing.assert_array_equal(got, rows[np.clip(np.append(IDS, 5), 0, R - 1)])
  # The table objects with int64 jax ids.
  for kind in ("device", "host"):
    table = memory.create(kind, num_rows=R, dim=DH, rows=rows, engine="jit")
    np.testing.assert_array_equal(table.fetch(ids), want)
    strict = memory.create(kind, num_rows=R, dim=DH, rows=rows, out_of_range="raise")
    np.testing.assert_array_equal(strict.fetch(ids[1:3]), want[1:3])
    with pytest.raises(ValueError, match=rf"id {2**31} at index \(2,\)"):
      strict.fetch(jnp.asarray([0, R - 1, 2**31, -1], jnp.int64))


def test_pure_cores_clamp_int64_jax_ids_under_x64(mesh):
  with jax.enable_x64(True):  # jax 0.10 (pinned in pyproject.toml) has the context manager
    _x64_cases(mesh)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_dispatch_and_row_ids_do_not_wrap(implementation):
  layout = TableLayout((11, 7, 13), DH)
  r = layout.num_rows
  table = jax.random.normal(jax.random.key(0), (r, DH), jnp.float32)
  hash_ids = np.array(
    [[0, 2**32 + 1, 5], [-1, 6, 2**31], [-(2**40), 0, 12], [10, 7, -(2**32) + 3]], np.int64
  )  # [N, H]
  flat = hash_ids + layout.offsets  # int64, exact
  want = np.asarray(table)[np.clip(flat, 0, r - 1)]
  got = dispatch.lookup(table, hash_ids, layout.offsets, implementation=implementation)
  np.testing.assert_array_equal(got, want)
  row_ids = np.asarray(layout.row_ids(hash_ids))
  assert row_ids.dtype == np.int32
  np.testing.assert_array_equal(np.clip(row_ids, 0, r - 1), np.clip(flat, 0, r - 1))
  in_range = (flat >= -(2**31)) & (flat < 2**31)
  np.testing.assert_array_equal(row_ids[in_range], flat[in_range])
  assert row_ids[0, 1] == 2**31 - 1 and row_ids[2, 0] == -(2**31)  # saturated, not wrapped
