"""Tests for engram_jax/run/checksums.py: sharding-independent checksums of host bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax.run import checksums


def _mesh():
  return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def _reference(x: np.ndarray) -> int:
  """The definition, elementwise in Python integers."""
  m = (1 << 64) - 1
  bits = checksums._bits(np.asarray(x)).reshape(-1)
  total = 0
  for i, w in enumerate(bits.tolist()):
    z = (w + i * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    total += z ^ (z >> 31)
  return total & m


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8, np.int32, np.bool_])
def test_matches_the_definition(dtype):
  x = (np.random.default_rng(0).standard_normal((7, 5)) * 50).astype(dtype)
  assert checksums.leaf_checksum(x) == _reference(x)
  assert checksums.leaf_checksum(np.float32(3.5)) == _reference(np.float32(3.5))


def test_independent_of_sharding_and_memory():
  x = np.random.default_rng(1).standard_normal((64, 24)).astype(np.float32)
  mesh = _mesh()
  want = checksums.leaf_checksum(x)
  for spec in (PartitionSpec("d"), PartitionSpec(None, "d"), PartitionSpec()):
    assert checksums.leaf_checksum(jax.device_put(x, NamedSharding(mesh, spec))) == want, spec
  pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  host = jax.device_put(x, pinned)
  assert checksums.leaf_checksum(host) == want


def test_any_change_is_seen():
  x = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
  want = checksums.leaf_checksum(x)
  swapped = x.copy()
  swapped[[3, 4]] = swapped[[4, 3]]
  flipped = x.copy()
  flipped.view(np.uint32)[10, 2] ^= 1  # one bit
  for changed in (swapped, flipped, x[:, ::-1], x[::-1]):
    assert checksums.leaf_checksum(changed) != want


def test_record_and_comparisons():
  tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.int32(4)}}
  rec = checksums.record(tree)
  assert set(rec) == {"['a']", "['b']['c']"}
  assert rec["['a']"]["shape"] == [2, 3] and rec["['a']"]["dtype"] == "float32"
  assert checksums.first_bad_leaf(rec, checksums.record(tree)) is None
  changed = {"a": tree["a"].at[1, 1].set(-1.0), "b": tree["b"]}
  assert checksums.first_bad_leaf(rec, checksums.record(changed)) == "['a']"
  abstract = jax.eval_shape(lambda: tree)
  assert checksums.structure_mismatch(rec, checksums.describe(abstract)) is None
  other = jax.eval_shape(lambda: {"a": jnp.zeros((3, 3)), "b": {"c": jnp.int32(0)}})
  assert "['a'] is float32[2, 3] in the checkpoint" in checksums.structure_mismatch(
    rec, checksums.describe(other)
  )
  assert "missing" in checksums.structure_mismatch(rec, checksums.describe({**tree, "d": 1.0}))
  assert checksums.json_checksum({"x": 1, "y": 2}) == checksums.json_checksum({"y": 2, "x": 1})
