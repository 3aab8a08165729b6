"""Test setup: 8 simulated CPU devices (set before jax is imported), strict ranks, and the
official demo's vectors as fixtures."""

import os

# 8 simulated devices; and XLA:CPU compiling for speed of compiling: the tests' programs are tiny,
# so compiling dominates their time. Its LLVM back end at its lowest optimisation level compiles
# them about a third faster, and its older (LLVM IR) fusion emitters faster again than its MLIR
# ones (a `tiny` training run, cold: 6.8 s against 9.4 s), to the same results within rounding.
# The tests' own comparisons are unaffected: both sides compile alike, in the test process and in
# the scripts it starts (they inherit these flags).
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
  "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false",
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


@pytest.fixture(scope="session")
def tiny_checkpoint_tree(small_corpus):
  """The checkpoint tree of a `tiny` run on the small corpus, as shapes (what a restore asks
  for)."""
  from engram_jax import presets
  from engram_jax.train import loop

  exp = presets.tiny()
  _, trainer = loop.build_trainer(exp, loop.data_config(exp, (small_corpus,)))
  return trainer.checkpoint_tree(trainer.abstract_state(exp.train.batch_size, exp.train.seq_len))


# Runs scripts as `python -m MODULE ARGV...` would, several in ONE fresh process (its imports,
# ~3 s, paid once): each through its own `if __name__ == "__main__"` block (`runpy`, so
# `absl.app.run` and the script's flag parser run as they do from the shell), with its own
# stdout, stderr (file descriptors 1 and 2: absl's logs and C++ warnings are kept) and exit
# status. Between cases the flags are unparsed and those the script itself defined are removed,
# so the next script sees only its own flags with their own defaults.
_SCRIPT_CASES = r"""
import importlib.util, json, os, runpy, sys, traceback
from absl import flags

cases_file, out_dir = sys.argv[1:]
codes = []
for i, (module, argv) in enumerate(json.loads(open(cases_file).read())):
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  outputs = [open(os.path.join(out_dir, f"{i}.{name}"), "w") for name in ("out", "err")]
  os.dup2(outputs[0].fileno(), 1)
  os.dup2(outputs[1].fileno(), 2)
  sys.argv = [module, *argv]
  try:
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    except BaseException:  # as the interpreter does: the traceback, exit status 1
      traceback.print_exc()
      code = 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved:
      os.close(fd)
    for f in outputs:
      f.close()
  open(os.path.join(out_dir, f"{i}.end"), "w").close()  # its mtime: when the case ended
  flags.FLAGS.unparse_flags()
  # absl files the flags of a script run as __main__ under its path (sys.argv[0]).
  own = flags.FLAGS.flags_by_module_dict().get(importlib.util.find_spec(module).origin, [])
  for name in {flag.name for flag in own}:
    delattr(flags.FLAGS, name)
  codes.append(code)
with open(os.path.join(out_dir, "codes.json"), "w") as f:
  json.dump(codes, f)
"""


@pytest.fixture(scope="session")
def run_scripts(tmp_path_factory):
  """`run([(module, argv), ...])`: each `python -m module *argv`, all in one process, in order:
  a list of `subprocess.CompletedProcess` (returncode, stdout, stderr), each with `ended_ns`, when
  it ended by the file system's clock (compare with files' `st_mtime_ns`)."""
  import json
  import subprocess
  import sys

  def run(cases: list[tuple[str, list[str]]]) -> list[subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("script_cases")
    cases = [(module, [str(a) for a in argv]) for module, argv in cases]
    (folder / "cases.json").write_text(json.dumps(cases))
    r = subprocess.run(
      [sys.executable, "-c", _SCRIPT_CASES, str(folder / "cases.json"), str(folder)],
      capture_output=True,
      text=True,
      timeout=900,
    )
    assert r.returncode == 0 and (folder / "codes.json").exists(), r.stderr[-3000:]
    codes = json.loads((folder / "codes.json").read_text())
    results = []
    for i, ((module, argv), code) in enumerate(zip(cases, codes, strict=True)):
      out, err = (folder / f"{i}.out").read_text(), (folder / f"{i}.err").read_text()
      results.append(subprocess.CompletedProcess([module, *argv], code, out, err))
      results[-1].ended_ns = (folder / f"{i}.end").stat().st_mtime_ns
    return results

  return run
