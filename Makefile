# Two commands for a newcomer:  `make run`  and  `make test`.
# Both create .venv themselves; `make test` also installs the system packages the tests drive.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup system-deps lint format bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "sis-ingest needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[postgres,test]'
	@touch $(STAMP)

setup: $(STAMP)

## Set up and run the product on the embedded default (SQLite, folders in this checkout).
run: setup
	$(BIN)/ingestctl init
	$(BIN)/ingestctl serve

system-deps:
	./deploy/install-system-deps.sh

## Set up and run the whole test suite (lint included).
test: setup system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n 2 --dist loadfile

lint:
	$(BIN)/ruff check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup system-deps
	$(BIN)/python bench/server_bench.py
	$(BIN)/python bench/loader_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
