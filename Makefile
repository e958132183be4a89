# `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine's torch build; on a GPU cluster set TORCH_SPEC to the build for its CUDA.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SHARED ?= ../shared
export TORCH_HOME ?= $(CURDIR)/.realfake/torch

.PHONY: install weights demo test bench accuracy clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Offline machines: torchvision finds ImageNet weights in its cache without a network.
weights:
	@mkdir -p $(TORCH_HOME)/hub/checkpoints
	@if [ -d $(SHARED)/weights ]; then cp -n $(SHARED)/weights/*.pth $(TORCH_HOME)/hub/checkpoints/ 2>/dev/null || true; fi

demo: install weights
	$(BIN)/realfake-scheduler demo --dir .realfake/demo

test: install
	$(BIN)/pytest

bench: install weights
	$(BIN)/python bench/train_overhead.py

# Held-out accuracy of examples/seed.yaml against examples/best.yaml over 3 seeds (about 2 h on 2 CPU cores).
accuracy: install weights
	$(BIN)/python bench/accuracy.py

clean:
	rm -rf .realfake realfake-demo
