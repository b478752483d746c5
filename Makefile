# The README's commands: `make demo`, `make test`, `make reproduce [PRESET=cpu|paper]`,
# `make reproduce-shipped`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# MNIST for demo-train, reproduce and train: the IDX directory in $FEDINF_MNIST_DIR when it is
# set, else TFDS's copy (downloaded on first use). The tests and `make demo` read the digits shipped
# in data/.
PRESET ?= cpu
REGIME ?= hetero

.PHONY: install test lint demo demo-train reproduce reproduce-shipped pretrained train benchmark clean

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

# Federated inference with the shipped federations (pretrained/cpu): the three regimes under the
# paper's procedure and the corrected sampler, metrics and report in runs/demo. Minutes on 2 cores.
demo: install
	$(PY) reproduce.py --config=configs/reproduce.py:cpu,shipped --outdir=runs/demo

# The whole pipeline from scratch on the tiny `demo` preset (training included): minutes on 2
# cores, runs/reproduce_demo. It shows the pipeline, not the result: these agents are too small to
# learn the class.
demo-train: install
	$(PY) reproduce.py --config=configs/reproduce.py:demo --outdir=runs/reproduce_demo

# The paper's experiment (fedinf_jax/workflows/pipeline.py): classifier, three regimes, samples under every
# procedure, metrics, agreement tables, runs/reproduce_$(PRESET)/report.md. Hours for the `cpu`
# preset on 2 cores; rerunning resumes where it stopped.
reproduce: install
	$(PY) reproduce.py --config=configs/reproduce.py:$(PRESET) --outdir=runs/reproduce_$(PRESET)

# The same experiment on the shipped federations (pretrained/cpu) instead of training: every set
# the results pages quote (docs/reproduce_cpu), runs/reproduce_shipped. About 3 hours of
# sampling on 2 cores; rerunning resumes.
reproduce-shipped: install
	$(PY) reproduce.py --config=configs/reproduce.py:cpu --config.pretrained=pretrained/cpu \
		--outdir=runs/reproduce_shipped

# The trained runs shipped in pretrained/cpu (pretrain.py): the evaluation classifier and the cpu
# preset's three regimes, trained from scratch under runs/pretrain_cpu and written there. Hours on
# 2 cores; rerunning resumes.
pretrained: install
	$(PY) pretrain.py --preset=cpu

# One regime's agents: make train REGIME=homo PRESET=demo
train: install
	$(PY) train.py --config=configs/$(REGIME).py:$(PRESET) --workdir=runs/$(REGIME)_$(PRESET)

# The speed set (benchmarks/README.md), at the cpu preset; results in benchmarks/results/. An hour
# or more on 2 cores.
SPEED = train_throughput sample_throughput sparse_dispatch route_gather guidance_batch
benchmark: install
	for b in $(SPEED); do $(PY) -m benchmarks.speed.$$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
