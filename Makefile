# tokenprune developer commands. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP := $(VENV)/.tokenprune-installed
PYTEST_WORKERS ?= 2

.PHONY: help install demo test test-slow lint typecheck docs docs-serve clean results fidelity

help:
	@echo "make demo       set up .venv and run the demo on the shipped default model"
	@echo "make test       set up .venv, then lint, type-check, test (not slow) and build the docs"
	@echo "make test-slow  the slow tests only"
	@echo "make results    the full evaluation grid on the shipped model -> docs/results/shapes"
	@echo "make fidelity   the fidelity gates of the shipped model -> runs/fidelity"

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

# Every method at every budget on the full test split of the shipped toy model (long: run it in
# the background). Re-running resumes; docs/results/shapes/results.jsonl is not committed.
RESULT_PIPELINES := random_11pct.toml cls_attention_topk64.yaml desap_11pct.yaml \
	desap_dynamic_11pct.yaml visionzip_64.yaml prumerge_64.yaml prumerge_plus_64.yaml \
	divprune_64.yaml tome_64.yaml pool_64.yaml fastv_k2_50pct.yaml desap_fastv_toy.yaml

results: $(STAMP)
	$(BIN)/tokenprune eval --model default --budgets 0.333,0.222,0.111,0.056 --limit 300 \
		--batch-size 16 --out docs/results/shapes --pipeline oracle \
		$(foreach c,$(RESULT_PIPELINES),--pipeline configs/$(c))

# Is the shipped model a faithful instrument? Oracle, every method with both position policies and
# the length control, well-formed answers, a held-out seed, the gates (exit 1 if one fails).
fidelity: $(STAMP)
	$(BIN)/tokenprune toy fidelity --split test --limit 60 --out runs/fidelity \
		$(foreach c,$(RESULT_PIPELINES),--pipeline configs/$(c))

test-slow: $(STAMP)
	$(BIN)/pytest -m slow -q

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
