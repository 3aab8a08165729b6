"""The package's layering: layers < memory < train, serving (infer) and run loading apart from
training, no library module importing benchmarks or scripts, no memory-kind branch in train/."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "engram_jax"


def _imports(path: pathlib.Path) -> set[str]:
  """The modules a file imports (absolute names)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}
  return names


def _files(sub: str) -> list[pathlib.Path]:
  return sorted((PACKAGE / sub).rglob("*.py"))


@pytest.mark.parametrize(
  ("sub", "forbidden"),
  [
    (
      "memory",
      (
        "engram_jax.train",
        "engram_jax.infer",
        "engram_jax.data",
        "engram_jax.model",
        "engram_jax.run",
      ),
    ),
    ("layers", ("engram_jax.memory", "engram_jax.train", "engram_jax.infer", "engram_jax.run")),
    ("hashing", ("engram_jax.train", "engram_jax.infer", "engram_jax.run")),
    ("run", ("engram_jax.train", "engram_jax.infer")),
    ("infer", ("engram_jax.train",)),
    ("", ("bench", "experiments")),
  ],
)
def test_imports_run_one_way(sub, forbidden):
  files = _files(sub) if sub else sorted(PACKAGE.rglob("*.py"))
  assert files
  for path in files:
    bad = sorted(
      n for n in _imports(path) if n.split(".")[0] in forbidden or n.startswith(forbidden)
    )
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_train_has_no_memory_kind_branch():
  for path in _files("train"):
    text = path.read_text()
    for kind in ("'tiered'", '"tiered"', '"host"', '"sharded"', "placement.kind"):
      assert kind not in text, f"{path.relative_to(ROOT)} names {kind}"
