# One command per task; CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-core test test-fast check bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned to the CPU build that pip finds on our machines (a bare `torch` would pull CUDA, GBs).
# llama.cpp is built portable (AVX2, no -march=native): a native build enables AMX kernels that crash in VMs
# whose CPU advertises AMX without granting it, and a wheel cached by pip must run on any x86-64-v3 host.
TORCH_SPEC ?= torch==2.13.0
install: $(BIN)/python
	$(BIN)/pip install --quiet '$(TORCH_SPEC)'
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(BIN)/pip install --quiet -e '.[dev,local]'

install-core: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q tests/unit

check: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy src

demo: install
	$(BIN)/python examples/demo.py

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) backfill-data .pytest_cache .mypy_cache .ruff_cache
