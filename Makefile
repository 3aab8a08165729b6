# One-command entry points. Each target creates the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test train demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 --durations=15 tests

train: $(STAMP)
	$(PY) -m experiments.train --preset=cpu_small --workdir=runs/cpu_small --compare_baseline --resume --keep_freed_memory

demo: $(STAMP)
	$(PY) -m experiments.quickstart

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m bench.hashing

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
