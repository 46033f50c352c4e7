# Two commands: `make run` (the whole pipeline on the default data) and `make test`.
# Both create or reuse .venv and install the exact versions in requirements.lock.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The JS and CSS of the HTML pages (web/package.json, pinned by web/package-lock.json), installed
# into the virtualenv, where imgpipe/reports/offline.py finds them: nothing loads from a CDN
WEB := $(VENV)/share/imgpipe-web
WEB_STAMP := $(WEB)/.installed
# `dvc plots show`'s page template, Vega inlined; .dvc/config names it (not committed: ~800 KB)
PLOTS_TEMPLATE := .dvc/plots/offline.html
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

install: $(STAMP) $(WEB_STAMP) $(PLOTS_TEMPLATE)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	# the project itself, editable, on top of the lock: the `imgpipe` command, and importable anywhere
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json | $(STAMP)
	@command -v npm >/dev/null || { echo "make install needs npm for the HTML pages' JS and CSS (Debian: apt-get install npm)"; exit 1; }
	@mkdir -p $(WEB)
	cp web/package.json web/package-lock.json $(WEB)/
	cd $(WEB) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $(WEB_STAMP)

$(PLOTS_TEMPLATE): $(STAMP) $(WEB_STAMP) imgpipe/reports/offline.py
	$(BIN)/python -m imgpipe.reports.offline $(PLOTS_TEMPLATE)

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
	@echo "metrics: reports/metrics.json (dvc metrics show); report: reports/evaluation/index.html; data quality: reports/data_quality/index.html"

test: install weights
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"
