"""Executes every notebook under notebooks/ (they hold no logic of their own), at tiny size.

A notebook with size knobs keeps them in one code cell tagged "parameters", its second code
cell (the first installs the package on Colab). The test appends tiny-size assignments to that
cell, so the notebook runs in seconds, and checks that each of them overrides a knob the cell
really has. A notebook must be listed here: under `TINY` (with its overrides) or, without
knobs, under `FIXED`; a new notebook without a tagged parameters cell fails.
"""

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from engram_jax import presets

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))

# name -> (tiny-size overrides of its parameters cell, text its output must contain); WORKDIR
# is set to a fresh folder under the test's tmp_path. The training notebooks train `tiny` for its
# own steps: the learning-rate schedule (compiled into the train step) depends on the steps, so
# at the preset's steps the notebooks' kernels load the train steps that the shared `tiny_run`
# (conftest) and the other tiny runs of the suite compiled, from the persistent compilation cache.
TINY_STEPS = str(presets.tiny().train.steps)
TINY = {
  "train_and_compare.ipynb": (
    {"PRESET": '"tiny"', "STEPS": TINY_STEPS, "EVAL_EVERY": "3"},
    "validation loss",
  ),
  "analysis.ipynb": (
    {"PRESET": '"tiny"', "STEPS": TINY_STEPS, "EVAL_BATCHES": "1", "MAX_TABLE_TOKENS": "2_000"},
    "linear CKA",
  ),
  "memory_backends.ipynb": (
    # 78 batches of row ids (8 calibrate the cache), two cache sizes for the hit-rate sweep.
    {
      "PRESET": '"tiny"',
      "TOKENS": "5_000",
      "CACHE_FRACTIONS": "(0.05, 0.2)",
      "STORAGE_ROWS": "2_000",
    },
    "hit rate",
  ),
}
# Notebooks without size knobs (no parameters cell): name -> texts of which one must appear.
FIXED = {"quickstart.ipynb": ("Bucephalus", "compressed")}


def _code_cells(nb):
  return [cell for cell in nb.cells if cell.cell_type == "code"]


def _parameters_cells(nb):
  return [cell for cell in _code_cells(nb) if "parameters" in cell.metadata.get("tags", [])]


def _tiny(nb, overrides: dict, workdir: pathlib.Path) -> None:
  """Appends the tiny-size assignments to the notebook's parameters cell (in place)."""
  tagged = _parameters_cells(nb)
  assert len(tagged) == 1, f"expected one code cell tagged 'parameters', found {len(tagged)}"
  cell = tagged[0]
  assert _code_cells(nb).index(cell) == 1, "the parameters cell must be the second code cell"
  overrides = {**overrides, "WORKDIR": repr(str(workdir))}
  missing = [k for k in overrides if not re.search(rf"^{k}\s*=", cell.source, re.MULTILINE)]
  assert not missing, f"the parameters cell does not set {missing}"
  lines = "\n".join(f"{k} = {v}" for k, v in overrides.items())
  cell.source += f"\n\n# tiny size (tests/test_notebooks.py)\n{lines}\n"


def _run(nb, path: pathlib.Path) -> str:
  """Executes the notebook; returns its stream output after checking that no cell failed."""
  NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  ).execute()
  outputs = [o for cell in _code_cells(nb) for o in cell.get("outputs", [])]
  errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
  assert not errors
  return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def test_notebooks_exist():
  assert NOTEBOOKS


def test_every_notebook_is_listed():
  names = {p.name for p in NOTEBOOKS}
  assert names == set(TINY) | set(FIXED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
  """Valid nbformat 4, a python3 kernel, no outputs, and a first cell that installs the
  package where it is not importable (Colab)."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  for cell in _code_cells(nb):
    assert cell.outputs == [] and cell.execution_count is None
  first = _code_cells(nb)[0].source
  assert "import engram_jax" in first and "except ImportError" in first
  assert "pip install" in first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  if path.name in FIXED:
    assert not _parameters_cells(nb), f"{path.name} has a parameters cell: list it in TINY"
    text = _run(nb, path)
    assert any(marker in text for marker in FIXED[path.name])
    return
  assert path.name in TINY, f"{path.name}: add its tiny-size parameters to TINY"
  overrides, marker = TINY[path.name]
  _tiny(nb, overrides, tmp_path / "work")
  text = _run(nb, path)
  assert marker in text
