# The two commands of the quick start. Each one creates .venv if needed and
# installs the project into it (pinned by constraints.txt) before running.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
PROFILE ?= quick
OUT    ?= runs/demo
WORKERS ?= 2

.PHONY: demo test install install-test bench clean

demo: $(VENV)/.installed
	$(PY) -m l2o_dynamics reproduce --profile $(PROFILE) --out $(OUT) --workers $(WORKERS) --docs docs

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(PY) benchmarks/meta_training.py
	$(PY) benchmarks/noise.py

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "l2o-dynamics needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) -e ".[test,ray]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
