# The two commands of the README: `make demo` and `make test`. CI calls `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m app.cli.demo $(if $(KEEP),--keep)

test: install
	$(BIN)/pytest

bench: install
	@for b in bulk_launch throughput operations cancel latency; do \
		$(BIN)/python -m bench.$$b || exit 1; \
	done

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy app scheduler tasks adapters
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .gpuq
