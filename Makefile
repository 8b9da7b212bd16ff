# Echelon: `make demo` runs the multi-site demo, `make test` runs the tests.
# Both create the virtual environment and install what they need first.

PYTHON ?= python3
VENV ?= .venv
# A machine with GPUs can ask for another build, e.g. TORCH_SPEC="torch==2.13.0+cu128".
TORCH_SPEC ?= torch==2.13.0
CACHE ?= .cache
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv proto check-proto corpus demo test lint typecheck bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed, got " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

corpus: $(STAMP)
	$(BIN)/python -m echelon_tools.corpus fetch --cache $(CACHE)/corpus

demo: $(STAMP) corpus
	$(BIN)/echelon demo --cache $(CACHE)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check echelon services echelon_tools tests benchmarks tools
	$(BIN)/ruff format --check echelon services echelon_tools tests benchmarks tools

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_secagg.py
	$(BIN)/python benchmarks/bench_audit.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
