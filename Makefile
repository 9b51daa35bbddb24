# Set-up and everyday commands. `make serve` and `make test` install what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps serve test test-fast train bench openapi lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,train,dev]'
	touch $(STAMP)

# Debian packages that the deploy tests drive as real programs. Installed with apt-get when one is missing.
# dockerd, not docker: a docker client alone does not make an engine.
SYSTEM_TOOLS := prometheus promtool nginx docker-compose dockerd debootstrap
SYSTEM_PACKAGES := prometheus nginx docker-compose docker.io debootstrap
export PATH := $(PATH):/usr/sbin:/sbin

system-deps:  ## prometheus (promtool), nginx, docker-compose v1, docker.io, debootstrap: apt-get (root or sudo)
	@missing=; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

serve: install  ## serve models_store/ on 127.0.0.1:8000 (GENSERVE_* variables override settings)
	$(PY) -m service

test: install system-deps  ## every tier: unit, integration (tiny training + export), API (in-process and a real server)
	$(PY) -m pytest

test-fast: install system-deps
	$(PY) -m pytest -m "not slow"

train: install  ## retrain, evaluate and re-export every shipped model into models_store/<name>/1
	$(PY) -m training all

bench: install  ## benchmark the running service against in-process ONNX Runtime and a LitServe peer (see docs/benchmarks.md)
	$(PY) -m bench

openapi: install  ## regenerate docs/openapi.json from the app (a test fails when it is stale)
	$(PY) -m service.openapi --write

lint: install
	$(VENV)/bin/ruff check service training tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
