"""Test setup: 8 simulated CPU devices (set before jax is imported), strict ranks, and the
official demo's vectors as fixtures."""

import os

# 8 simulated devices; and XLA:CPU's LLVM back end at its lowest optimisation level: the tests'
# programs are tiny, so compiling dominates their time and this compiles them about a third faster
# (the numerics of the tests' own comparisons are unaffected: both sides compile alike).
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
  "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

# One persistent compilation cache for the session's workers and the scripts they start: the
# tiny model's jitted steps, compiled by many tests alike, compile once (keyed by the program).
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).parents[1] / ".pytest_cache" / "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
  """The first 120,000 characters of the embedded corpus, as a text file."""
  from engram_jax.data import read_text
  from engram_jax.data.corpus import default_corpus_path

  path = tmp_path_factory.mktemp("corpus") / "small.txt"
  path.write_text(read_text(default_corpus_path())[:120_000])
  return str(path)


@pytest.fixture(scope="session")
def tiny_run(small_corpus, tmp_path_factory):
  """One `tiny` training run on the small corpus, shared read-only by the tests that need a
  trained checkpoint: (workdir, corpus_files, results)."""
  from engram_jax import presets
  from engram_jax.train import loop

  workdir = tmp_path_factory.mktemp("tiny_run")
  results = loop.train(presets.tiny(), workdir, corpus_files=(small_corpus,), progress=False)
  return workdir, (small_corpus,), results


@pytest.fixture
def finished_run(tiny_run, tmp_path):
  """A copy of the shared finished `tiny` run that a test may change: (workdir, corpus file,
  results)."""
  import shutil

  workdir, (corpus,), results = tiny_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return copy, corpus, results


def tree_snapshot(path):
  """(relative path, size, mtime) of everything under `path`: equal snapshots mean that
  nothing was changed."""
  return sorted(
    (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
  )
