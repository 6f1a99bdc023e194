# hf_ext — the two commands of the README: `make demo` and `make test`.
# Each creates .venv when missing and installs the project with the extras it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q -e ".[dev,all]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hf-ext demo

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_ext kernels tests benchmarks examples
	$(VENV)/bin/ruff format --check hf_ext kernels tests benchmarks examples

test: lint
	$(PY) -m pytest -n 2 --timeout=900 tests

# GPU benchmarks: run on a machine with a CUDA GPU (see README, "Benchmarks on a GPU").
bench: $(STAMP)
	$(VENV)/bin/hf-ext bench all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
