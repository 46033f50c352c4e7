# Two commands: `make run` (the whole pipeline on the default data) and `make test`.
# Both create or reuse .venv and install the exact versions in requirements.lock.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_WEIGHTS := ../shared/weights/mobilenet_2_5_224_tf_no_top.h5
export KERAS_HOME := $(CURDIR)/.cache/keras
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.cache/prefect
export TF_CPP_MIN_LOG_LEVEL := 2
# dvc.yaml's `python -m stages.X` must find the project's virtualenv first
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install data run test test-fast clean-venv

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	# the project itself, editable, on top of the lock: the `imgpipe` command, and importable anywhere
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Offline ImageNet weights: Keras looks for this exact file name in $KERAS_HOME/models/.
# Without it Keras downloads the weights on first use (needs internet).
weights:
	@mkdir -p $(KERAS_HOME)/models
	@if [ -f $(SHARED_WEIGHTS) ] && [ ! -f $(KERAS_HOME)/models/$(notdir $(SHARED_WEIGHTS)) ]; then \
	  cp $(SHARED_WEIGHTS) $(KERAS_HOME)/models/; fi

# The default raw data: Fashion-MNIST, verified by sha256, then versioned by DVC.
data: install
	$(BIN)/imgpipe fetch fashion-mnist data/raw/fashion-mnist
	$(BIN)/dvc add --quiet data/raw/fashion-mnist

run: install weights data
	$(BIN)/dvc repro
	@echo "metrics: reports/metrics.json (dvc metrics show); report: reports/evaluation/index.html; data quality: reports/data_quality/summary.md"

test: install weights
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"
