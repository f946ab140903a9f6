# One command per task; CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-core test test-fast test-newest-sdk test-eval-tools check bench demo clean

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

# The wire tests again with the newest openai and anthropic SDKs (dev pins older ones): a field a new SDK starts to
# require, or a shape it parses differently, shows up here before a user's upgrade finds it.
NEWEST_VENV ?= .venv-newest
WIRE_TESTS := tests/unit/test_responses_objects.py tests/integration/test_http_surface.py \
	tests/acceptance/test_eval_tool_shapes.py tests/acceptance/test_validation.py tests/acceptance/test_idempotency.py
test-newest-sdk:
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install --quiet -e '.[dev]'
	$(NEWEST_VENV)/bin/pip install --quiet --upgrade openai anthropic
	$(NEWEST_VENV)/bin/python -c "import openai, anthropic; print('openai', openai.__version__, 'anthropic', anthropic.__version__)"
	$(NEWEST_VENV)/bin/python -m pytest -q $(WIRE_TESTS)

# inspect-ai, curator and autobatcher for real (tests/eval_tools): each in its own venv, as they pin openai/anthropic
# SDKs other than backfill's dev pins (curator is about 850 MB; autobatcher needs openai<3); backfill itself runs
# from $(VENV). About 1 min of tests.
INSPECT_VENV ?= .venv-inspect
CURATOR_VENV ?= .venv-curator
AUTOBATCHER_VENV ?= .venv-autobatcher
AUTOBATCHER_SPEC ?= autobatcher==0.12.0
INSPECT_SPEC ?= inspect-ai==0.3.285 openai==3.60.0 anthropic==2.16.0
CURATOR_SPEC ?= bespokelabs-curator==0.1.31
$(INSPECT_VENV)/bin/inspect:
	$(PYTHON) -m venv $(INSPECT_VENV)
	$(INSPECT_VENV)/bin/pip install --quiet $(INSPECT_SPEC)
$(CURATOR_VENV)/bin/curator-installed:
	$(PYTHON) -m venv $(CURATOR_VENV)
	$(CURATOR_VENV)/bin/pip install --quiet $(CURATOR_SPEC)
	touch $@
$(AUTOBATCHER_VENV)/bin/autobatcher-installed:
	$(PYTHON) -m venv $(AUTOBATCHER_VENV)
	$(AUTOBATCHER_VENV)/bin/pip install --quiet $(AUTOBATCHER_SPEC)
	touch $@
test-eval-tools: install $(INSPECT_VENV)/bin/inspect $(CURATOR_VENV)/bin/curator-installed \
		$(AUTOBATCHER_VENV)/bin/autobatcher-installed
	BACKFILL_REQUIRE_EVAL_TOOLS=1 $(BIN)/python -m pytest -q tests/eval_tools

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
	rm -rf $(VENV) $(NEWEST_VENV) $(INSPECT_VENV) $(CURATOR_VENV) backfill-data .pytest_cache .mypy_cache .ruff_cache
