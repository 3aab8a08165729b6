"""Tests of the row storage types (engram_jax/memory/storage.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.memory import storage


def _rows(seed=0, shape=(64, 64)):
  rng = np.random.default_rng(seed)
  rows = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 30.0, (shape[0], 1))
  rows[3] = 0.0  # an all-zero row
  rows[5, :] = 1e-30  # a tiny one
  return rows.astype(np.float32)


@pytest.mark.parametrize("kind", storage.STORAGE_TYPES)
def test_round_trip_is_within_the_bound(kind):
  rows = _rows()
  back = storage.round_trip(rows, kind)
  assert back.dtype == np.float32 and back.shape == rows.shape
  err = np.abs(back - rows)
  assert np.all(err <= storage.error_bound(rows, kind))
  np.testing.assert_array_equal(back[3], 0.0)
  if kind == "float32":
    np.testing.assert_array_equal(back, rows)
  else:  # the bound is reached within a factor 2 somewhere: it is not loose
    assert np.max(err / np.maximum(storage.error_bound(rows, kind), 1e-38)) > 0.5


@pytest.mark.parametrize("kind", storage.STORAGE_TYPES)
def test_the_bound_holds_on_many_rows(kind):  # float32 rounding of scales and quotients too
  rows = _rows(2, shape=(100_000, 64))
  err = np.abs(storage.round_trip(rows, kind) - rows)
  assert np.all(err <= storage.error_bound(rows, kind))


def test_int8_layout_and_bytes():
  rows = _rows(1)
  parts = storage.encode(rows, "int8")
  assert parts["values"].dtype == np.int8 and parts["scale"].shape == (rows.shape[0],)
  assert np.abs(parts["values"]).max() == 127  # each row uses the full range
  assert storage.row_bytes("int8", 24) == 28 and storage.row_bytes("bfloat16", 24) == 48
  assert parts["scale"].dtype == np.float32
  # Round-tripping twice changes nothing more: quantised rows are fixed points.
  once = storage.round_trip(rows, "int8")
  np.testing.assert_allclose(storage.round_trip(once, "int8"), once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", storage.STORAGE_TYPES)
def test_numpy_and_jax_encode_alike(kind):
  rows = _rows(2)
  host = storage.decode(storage.encode(rows, kind), kind)
  dev = storage.decode(storage.encode(jnp.asarray(rows), kind), kind)
  assert isinstance(host, np.ndarray) and not isinstance(dev, np.ndarray)
  np.testing.assert_allclose(np.asarray(dev), host, rtol=1e-6, atol=0)
  np.testing.assert_allclose(
    np.asarray(storage.round_trip(jnp.asarray(rows), kind)), host, rtol=1e-6, atol=0
  )
  assert storage.round_trip(rows, kind, dtype=jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", storage.STORAGE_TYPES)
def test_memmap_round_trip(tmp_path, kind):
  rows = _rows(3, (50, 32))
  storage.save_memmap(tmp_path / kind, rows, kind, chunk_rows=16)
  parts, got_kind = storage.open_memmap(tmp_path / kind)
  assert got_kind == kind and isinstance(parts["values"], np.memmap)
  assert parts["values"].dtype == storage.value_dtype(kind)
  assert not parts["values"].flags.writeable  # the disk tier is read-only
  np.testing.assert_array_equal(
    storage.decode_table(parts, kind, chunk_rows=7), storage.round_trip(rows, kind)
  )


def _e4m3_by_formula(code: int) -> float:
  """The value of an e4m3fn byte from its fields (sign, 4 exponent bits of bias 7, 3 mantissa
  bits; exponent 15 with mantissa 7 is NaN)."""
  code = int(code)
  sign, exp, man = code >> 7, (code >> 3) & 15, code & 7
  if exp == 15 and man == 7:
    return float("nan")
  mag = man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
  return -mag if sign else mag


def test_mxfp8_layout_and_the_spec_formula():
  rows = _rows(4, (16, 256))
  parts = storage.encode(rows, "mxfp8")
  assert parts["values"].dtype == storage.value_dtype("mxfp8") and parts["values"].itemsize == 1
  assert parts["scale"].dtype == np.uint8 and parts["scale"].shape == (16, 8)
  assert storage.row_bytes("mxfp8", 256) == 264  # V4.1: 256 codes + 8 exponent bytes
  # Every nonzero 32-column block uses e4m3's range: its largest code is at least 448 / 2.
  blocks = np.abs(parts["values"].astype(np.float32)).reshape(16, 8, 32).max(-1)
  assert np.all((blocks >= 224) | (blocks == 0))
  # Every code and the edge exponents (0 -> 2**-127, 1, 127, 254, 255 -> NaN) decode as the
  # V4.1 formula e4m3(code) * 2**(e - 127) says.
  codes = np.arange(256, dtype=np.uint8)
  for e in (0, 1, 127, 200, 254, 255):
    got = storage.decode(
      {
        "values": np.tile(codes, 1).view(storage.value_dtype("mxfp8")).reshape(8, 32),
        "scale": np.full((8, 1), e, np.uint8),
      },
      "mxfp8",
    ).reshape(-1)
    want = np.array([_e4m3_by_formula(c) for c in codes]) * (
      np.nan if e == 255 else 2.0 ** (e - 127)
    )
    with np.errstate(over="ignore"):
      np.testing.assert_array_equal(got, want.astype(np.float32))


def test_mxfp8_needs_whole_blocks():
  with pytest.raises(ValueError, match="divisible by 32"):
    storage.encode(_rows(shape=(8, 24)), "mxfp8")


def test_unknown_storage_is_rejected():
  with pytest.raises(ValueError, match="storage"):
    storage.encode(_rows(), "int4")
