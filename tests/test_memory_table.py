"""Tests for engram_jax/memory/table.py and the device backend's fetch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.memory import device
from engram_jax.memory.table import TableLayout


@pytest.fixture
def layout():
  return TableLayout.from_sizes([5, 7, 11], dim=4)


def test_offsets_and_rows(layout):
  np.testing.assert_array_equal(layout.offsets, [0, 5, 12])
  assert layout.num_rows == 23 and layout.num_params == 92
  ids = jnp.array([[0, 6, 10], [4, 0, 0]])
  np.testing.assert_array_equal(layout.row_ids(ids), [[0, 11, 22], [4, 5, 12]])


def test_fetch_reads_each_heads_row(layout):
  table = layout.init(jax.random.key(0))
  ids = jnp.array([[[0, 6, 10], [4, 0, 0]]])  # [1, 2, 3]
  rows = device.fetch(layout, table, ids)
  assert rows.shape == (1, 2, 3, 4)
  np.testing.assert_array_equal(rows[0, 0, 1], table[5 + 6])
  np.testing.assert_array_equal(rows[0, 0, 2], table[22])  # the last row
  np.testing.assert_array_equal(rows[0, 1, 0], table[4])


def test_init_is_seeded(layout):
  a, b = layout.init(jax.random.key(3)), layout.init(jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, layout.init(jax.random.key(4)))
  assert layout.init(jax.random.key(0), jnp.bfloat16).dtype == jnp.bfloat16


def test_bad_ids_and_tables(layout):
  table = layout.init(jax.random.key(0))
  with pytest.raises(ValueError, match="H = 3 heads"):
    device.fetch(layout, table, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    device.fetch(layout, table, jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"table: expected shape \(23, 4\)"):
    device.fetch(layout, table[:-1], jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="sizes"):
    TableLayout.from_sizes([], dim=4)
  with pytest.raises(ValueError, match="2\\*\\*31"):
    TableLayout.from_sizes([2**30, 2**30], dim=4)
