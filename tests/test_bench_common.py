"""Tests for bench/common.py: the timing helpers and the Zipf ids every benchmark shares."""

import jax.numpy as jnp
import numpy as np
import pytest

from bench import common


def test_best_times_warms_up_interleaves_and_waits():
  calls = []
  fns = {
    "a": lambda: calls.append("a") or jnp.ones(4) * 2,
    "b": lambda: calls.append("b") or "not an array",
  }
  times = common.best_times(fns, repeats=3)
  assert calls == ["a", "b"] * 4  # one warm-up each, then interleaved
  assert set(times) == {"a", "b"} and all(0 <= t < 1 for t in times.values())


def test_time_call_counts_warmup_and_timed_calls():
  calls = []
  seconds = common.time_call(
    lambda x: calls.append(x) or x + 1, jnp.zeros(3), timed_calls=4, warmup_calls=2
  )
  assert len(calls) == 6 and seconds >= 0


@pytest.mark.parametrize("a", [0.8, 1.0, 1.2])
def test_scattered_zipf_ranks_follow_the_truncated_law(a):
  rows = 1000
  ids = common.scattered_zipf(np.random.default_rng(0), (200, 50), rows, a)
  assert ids.shape == (200, 50) and ids.dtype == np.int32
  assert ids.min() >= 0 and ids.max() < rows
  # The hottest rank lands on row 0 (0 * prime); its share matches the CDF's first step.
  cdf = common.zipf_cdf(rows, a)
  assert np.mean(ids == 0) == pytest.approx(cdf[0] / cdf[-1], abs=0.01)
  # The multiplicative hash puts the second rank on row 2654435761 mod R.
  assert np.mean(ids == 2654435761 % rows) == pytest.approx((cdf[1] - cdf[0]) / cdf[-1], abs=0.01)


def test_scattered_zipf_is_reproducible():
  a = common.scattered_zipf(np.random.default_rng(3), (64,), 500, 1.1)
  b = common.scattered_zipf(np.random.default_rng(3), (64,), 500, 1.1)
  np.testing.assert_array_equal(a, b)
