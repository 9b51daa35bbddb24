# Set-up and everyday commands. Each target installs what is missing first, into one of two environments:
#   .venv-serve  the `serve` extra only (FastAPI, uvicorn, ONNX Runtime): what `make serve` needs
#   .venv        every extra (serve, train, dev: torch, the test tools): tests, training, the benchmark
# A stamp per environment records the pyproject.toml it was installed from; editing that file re-installs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.installed

.PHONY: install install-serve system-deps serve test test-fast train bench openapi lint clean

install: $(STAMP)  ## .venv: every extra (serve, train, dev)

install-serve: $(SERVE_STAMP)  ## .venv-serve: the serve extra only

# Editable installs: code changes need no re-install, pyproject.toml changes do (the stamp depends on it).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,train,dev]'
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install --quiet --upgrade pip
	$(SERVE_PY) -m pip install --quiet -e '.[serve]'
	touch $(SERVE_STAMP)

# Debian packages that the tests drive as real programs. Installed with apt-get when one is missing.
# dockerd, not docker: a docker client alone does not make an engine. chromium: the playground's browser test
# (Playwright drives Debian's build; Playwright's own browser download is not used).
SYSTEM_TOOLS := prometheus promtool nginx docker-compose dockerd debootstrap chromium
SYSTEM_PACKAGES := prometheus nginx docker-compose docker.io debootstrap chromium
export PATH := $(PATH):/usr/sbin:/sbin

system-deps:  ## prometheus (promtool), nginx, docker-compose v1, docker.io, debootstrap, chromium: apt-get (root or sudo)
	@missing=; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

serve: install-serve  ## serve models_store/ on 127.0.0.1:8000 (GENSERVE_* variables override settings)
	$(SERVE_PY) -m service

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
	$(VENV)/bin/ruff check service training tests bench genserve_client

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs .pytest_cache
