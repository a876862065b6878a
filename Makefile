# tokenprune developer commands. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP := $(VENV)/.tokenprune-installed
PYTEST_WORKERS ?= 2

.PHONY: help install demo test test-slow lint typecheck docs docs-serve clean

help:
	@echo "make demo       set up .venv and run the demo on the shipped default model"
	@echo "make test       set up .venv, then lint, type-check, test (not slow) and build the docs"
	@echo "make test-slow  the slow tests only"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,eval,toy]" $(foreach p,$(PLUGINS),-e $(p))
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenprune demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy tokenprune

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

test: lint typecheck
	$(BIN)/pytest -m "not slow" -q -n $(PYTEST_WORKERS)
	$(BIN)/mkdocs build --strict --site-dir site

test-slow: $(STAMP)
	$(BIN)/pytest -m slow -q

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
