# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
#
# TORCH_SPEC picks the torch build installed before everything else. The default is the
# pinned CPU wheel that installs in seconds on CPU machines; GPU users run e.g.
#   make demo TORCH_SPEC="torch"            (the default CUDA build from PyPI)
#   make demo TORCH_SPEC="torch==2.5.1"     (a specific version)
# and nothing later in the set-up replaces the torch they chose.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.denoise-gym-installed

.PHONY: setup demo test test-slow lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,rewards]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m agents.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
