# Two entry points: `make demo` and `make test`. Both set up .venv first.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build (no multi-GB CUDA download);
# with a GPU, pip installs the normal CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
DEMO ?= demo

.PHONY: setup demo test test-integration lint

$(BIN)/qpissa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/qpissa

demo: setup
	$(BIN)/python tools/demo.py --workdir $(DEMO)

test: setup
	sh tools/install_chromium.sh
	$(BIN)/python -m pytest -q

test-integration: setup
	$(BIN)/python -m pytest -q --integration

lint: setup
	$(BIN)/ruff check qpissa tools tests
	$(BIN)/ruff format --check qpissa tools tests
