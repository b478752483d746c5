# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The local MNIST copy (IDX files); without it, TFDS downloads MNIST (needs internet).
MNIST_DIR ?= $(firstword $(wildcard ../shared/data/mnist))
export FEDINF_MNIST_DIR ?= $(MNIST_DIR)
PRESET ?= demo
REGIME ?= hetero

.PHONY: install test lint demo train benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# Trains the heterogeneous regime's 10 agents on the small `demo` preset (minutes on 2 cores).
demo: install
	$(PY) train.py --config=configs/$(REGIME).py:$(PRESET) --workdir=runs/$(REGIME)_$(PRESET)

train: demo

benchmark: install
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
