# Two entry points: `make demo` and `make test`. Both set up .venv first.
# On a machine without an NVIDIA GPU, torch is pinned to 2.13.0, which pip takes as the CPU build where its
# indexes offer one; PyPI's Linux x86-64 torch is the CUDA build (several GB), so on such a machine run
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`. With a GPU, pip installs the CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
TORCH_INDEX ?=
DEMO ?= demo

.PHONY: setup demo test test-unit lint

$(BIN)/qpissa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/qpissa

demo: setup
	$(BIN)/python tools/demo.py --workdir $(DEMO)

# The whole suite: unit tests and the integration tests on the real demo model (what CI runs).
test: setup
	sh tools/install_chromium.sh
	$(BIN)/python -m pytest -q --integration

# Unit tests only (tiny random models; a few minutes).
test-unit: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check qpissa tools tests
	$(BIN)/ruff format --check qpissa tools tests
