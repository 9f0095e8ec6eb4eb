# Two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-gpu gpu-check test-unit lint lock bench proto clean

# On the machine kind requirements.lock was written for (CI's), install exactly it, hashes checked; elsewhere
# from pyproject.toml's ranges.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -c 'import sys; sys.exit("splitexit needs Python >= 3.11, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if $(BIN)/python tools/lock.py matches; then \
		$(BIN)/pip install --quiet --require-hashes -r requirements.lock && $(BIN)/pip install --quiet --no-deps -e . ; \
	else \
		echo "requirements.lock is for another machine kind: installing from pyproject.toml's ranges"; \
		$(BIN)/pip install --quiet -e '.[dev]' ; \
	fi
	touch $(STAMP)

lock: $(STAMP)
	$(BIN)/python tools/lock.py write

demo: $(STAMP)
	$(BIN)/splitexit demo

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/mypy

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests

# The one prepared run for a GPU machine: the gpu tests, then the device bench (figures to devices.json).
gpu-check: test-gpu
	$(BIN)/python bench/devices.py --json devices.json

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python bench/cascade.py
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/lone_request.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/planner.py
	$(BIN)/python bench/devices.py
	$(BIN)/python bench/guarantee.py
	$(BIN)/python bench/edges.py

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --grpc_python_out=src --pyi_out=src \
		src/splitexit/wire/wire.proto

clean:
	rm -rf $(VENV) .splitexit-cache build src/*.egg-info
