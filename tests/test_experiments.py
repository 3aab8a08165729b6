"""The absl scripts: clear errors for bad flags, and the quickstart's output."""

import subprocess
import sys

import pytest

from engram_jax.data import default_tokenizer_path
from engram_jax.quickstart import EXAMPLE, explain, format_rows


def _run(*args):
  return subprocess.run(
    [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, check=False
  )


def test_train_flag_error_from_the_command_line(tmp_path):
  """A bad flag through the real command (`absl.app.run`, a process of its own); the other bad
  flags run in one process: `test_train_faults.test_train_flag_errors`."""
  r = _run("experiments.train", f"--workdir={tmp_path}", "--steps=abc")  # absl's parsing
  assert r.returncode == 2
  (line,) = r.stderr.strip().splitlines()  # the one message, not the flags' help
  assert line.startswith("train: ") and "--steps" in line and line.endswith("see --help")


def test_quickstart_rows():
  rows = explain(EXAMPLE, default_tokenizer_path())
  text = "".join(r.token for r in rows)
  assert text == EXAMPLE
  assert all(len(r.hash_ids) == 8 and len(r.gates) == 4 for r in rows)
  assert all(0 < g < 1 for r in rows for g in r.gates)
  # " the" appears twice: same compressed id, different trigram context.
  the = [r for r in rows if r.token == " the"]
  assert len(the) == 2 and the[0].compressed_id == the[1].compressed_id
  assert the[0].hash_ids[4:] != the[1].hash_ids[4:]
  assert format_rows(rows).count("\n") == len(rows)


_V41 = [
  "--config=tests/data/v41/config.json",
  "--tokenizer=tests/data/demo_vectors_tokenizer.json",
]


@pytest.fixture(scope="module")
def scripts(run_scripts, tmp_path_factory):
  """The quickstart, the v41 script, and the v41 script without its checkpoint, each as
  `python -m` runs it, all in one process (see `run_scripts`)."""
  missing = tmp_path_factory.mktemp("v41") / "none.safetensors"
  quickstart, v41, v41_missing = run_scripts([
    ("experiments.quickstart", []),
    ("experiments.v41_engram", [
      "--checkpoint=tests/data/v41/engram.safetensors", *_V41, "--prompt=In the beginning God",
    ]),
    ("experiments.v41_engram", [f"--checkpoint={missing}", *_V41]),
  ])  # fmt: skip
  return {"quickstart": quickstart, "v41": v41, "v41_missing": v41_missing}


def test_quickstart_script(scripts):
  r = scripts["quickstart"]
  assert r.returncode == 0, r.stderr
  assert "Ġ" not in r.stdout and " horse" in r.stdout


def test_v41_engram_script(scripts):
  r = scripts["v41"]
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("4 tokens; Engram layers [1, 3]; input streams: random")
  assert "'ĠGod' -> compressed" in lines[-3]
  rows = lines[-2].split("rows [")[1].split("]")[0].split(", ")
  gates = lines[-2].split("gates ")[1].split()
  assert len(rows) == 12 and len(gates) == 4 and all(0 < float(g) < 1 for g in gates)
  r = scripts["v41_missing"]
  assert r.returncode != 0
  (line,) = r.stderr.strip().splitlines()
  assert line.startswith("v41_engram: ") and "none.safetensors" in line
