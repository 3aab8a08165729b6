"""Test setup: 8 simulated CPU devices (set before jax is imported), strict ranks, and the
official demo's vectors as fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def demo_tokenizer_path():
  return DATA / "demo_vectors_tokenizer.json"


@pytest.fixture(scope="session")
def demo_vectors():
  """(config, state dict, arrays) of the official demo's vectors."""
  from engram_jax.interop import load_demo_vectors

  return load_demo_vectors(DATA / "engram_demo_vectors.npz")
