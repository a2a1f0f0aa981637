# The one way to set up, run, test and measure sagakit. Every target creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[postgres,rabbitmq,nats,redis,otel,api,metrics,pydantic,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sagakit demo

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/workers.py
	$(BIN)/python benchmarks/remote.py
	$(BIN)/python benchmarks/waiting.py
	$(BIN)/python benchmarks/signals.py

clean:
	rm -rf $(VENV) sagakit.db sagakit.db-wal sagakit.db-shm .pytest_cache .mypy_cache .ruff_cache
