# Two commands on a fresh machine: `make train` (set-up, then `python train.py $(ARGS)`) and `make test`.
#   make train ARGS="algo=dpo peft=qlora"     make test     make test-slow     make setup
# The set-up makes .venv/ and installs torch first (TORCH=...: the wheel for your machine; the default is the
# CPU build), then requirements.txt; it reruns only when requirements.txt or pyproject.toml change.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ARGS ?=
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/peftlab/torch_extensions

.PHONY: setup train test test-slow

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow
