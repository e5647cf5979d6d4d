# bnlab course: every target sets up what it needs on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch and its matching torchvision, installed before the package so that pip does
# not resolve `torch>=2.4` to the newest release. These are served from local files
# on the course machines; the build runs on CPU-only machines too. Override for
# another pair, e.g. `make setup TORCH_PKGS="torch==2.5.1 torchvision==0.20.1"`.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
NOTEBOOKS  := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PORT ?= 8888

.PHONY: setup lab test test-unit test-notebooks notebooks bench lint data clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# LAB_ARGS passes extra options, e.g. `make lab LAB_ARGS=--no-browser` on a remote machine.
# Jupyter refuses to run as root unless told to: containers often run as root.
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(ROOT_ARGS) $(LAB_ARGS)

test: test-unit test-notebooks

test-unit: setup
	$(PY) -m pytest -q tests

test-notebooks: setup
	@test -n "$(NOTEBOOKS)" || { echo "no notebooks found under notebooks/"; exit 1; }
	BNLAB_FAST=1 $(PY) -m pytest -q --nbval-lax $(NOTEBOOKS)

notebooks: setup
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; start=$$(date +%s); \
		BNLAB_FAST=0 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=1800 "$$nb" || exit 1; \
		echo "   $$(( $$(date +%s) - start )) s"; \
	done

bench: setup
	$(PY) -m bnlab.bench

lint: setup
	$(VENV)/bin/ruff check bnlab tests notebooks
	$(VENV)/bin/ruff format --check bnlab tests

data: setup
	$(PY) -m bnlab.data

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
