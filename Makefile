# Two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit lint bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("splitexit needs Python >= 3.11, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/splitexit demo

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python bench/cascade.py
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/planner.py

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --grpc_python_out=src --pyi_out=src \
		src/splitexit/wire/wire.proto

clean:
	rm -rf $(VENV) .splitexit-cache build src/*.egg-info
