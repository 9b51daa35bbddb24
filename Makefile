# Set-up and everyday commands. `make serve` and `make test` install what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast train bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,train,dev]'
	touch $(STAMP)

serve: install  ## serve models_store/ on 127.0.0.1:8000 (GENSERVE_* variables override settings)
	$(PY) -m service

test: install  ## every tier: unit, integration (tiny training + export), API (in-process and a real server)
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

train: install  ## retrain, evaluate and re-export every shipped model into models_store/<name>/1
	$(PY) -m training all

bench: install  ## benchmark the running service against in-process ONNX Runtime (see docs/benchmarks.md)
	$(PY) -m service.bench

lint: install
	$(VENV)/bin/ruff check service training tests

clean:
	rm -rf $(VENV) runs .pytest_cache
