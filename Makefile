# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check
DEMO := build/demo

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" -e ".[torch,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m converter run models/digits_cnn/recipe.toml -o $(DEMO)

test: $(STAMP)
	$(VENV)/bin/ruff check converter passes tests models
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) tests/benchmarks/run_all.py

clean:
	rm -rf build .pytest_cache
