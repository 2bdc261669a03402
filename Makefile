# sensor-ingest — the two commands: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVICES := deploy/local/services.sh
CONFIG ?= deploy/sensor-ingest.example.toml

.PHONY: help setup services services-down run test test-unit bench bench-faults lint typecheck schemas clean

help:
	@echo "make run     bring up local Mosquitto + PostgreSQL/TimescaleDB, migrate, run the service"
	@echo "make test    install everything needed (apt, venv) and run the whole test suite"
	@echo "make bench   quick benchmark with the baseline ratio, then the worst-case time of one message"
	@echo "             (bench.worst) and the fleet-data costs (bench.fleet); make bench FULL=1 for the long one,"
	@echo "             make bench TARGETS=1 adds issue #17's drain targets (SenML 1 and 50, JSON 5) and their baselines"
	@echo "make bench-faults  the bench fault run (issue #5): database blackholed 60 s under a 100,000 x 1 KB backlog;"
	@echo "             peak RSS <= 300 MB, unacked <= receive_maximum, every message stored once (BENCH_ARGS=--help)"
	@echo "make lint    ruff + mypy --strict"
	@echo "make schemas regenerate schemas/json from the pydantic models"

$(BIN)/sensor-ingest: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# System packages first (they include python3-venv where it is missing), then the virtualenv.
setup:
	bash $(SERVICES) install
	$(MAKE) --no-print-directory $(BIN)/sensor-ingest

services: setup
	bash $(SERVICES) up

services-down:
	bash $(SERVICES) down

run: services
	eval "$$(bash $(SERVICES) env)" && $(BIN)/sensor-ingest migrate --config $(CONFIG) \
	  && exec $(BIN)/sensor-ingest run --config $(CONFIG)

test: setup
	TZ=Asia/Ho_Chi_Minh $(BIN)/pytest -q

test-unit: $(BIN)/sensor-ingest
	TZ=Asia/Ho_Chi_Minh $(BIN)/pytest -q tests/unit tests/decoders

# Private, durable Mosquitto and PostgreSQL+TimescaleDB on free ports; the figures go to BENCHMARKS.md.
bench: setup
	$(BIN)/python -m bench.run $(if $(FULL),--full) $(BENCH_ARGS)
	$(if $(TARGETS),$(BIN)/python -m bench.run --targets $(if $(FULL),--full))
	$(BIN)/python -m bench.worst
	$(BIN)/python -m bench.fleet

# The bench fault run: outages are long here, short in `make test` (tests/integration/test_faults.py).
bench-faults: setup
	$(BIN)/python -m bench.faults $(BENCH_ARGS)

lint: $(BIN)/sensor-ingest
	$(BIN)/ruff check ingest tests bench
	$(BIN)/mypy

schemas: $(BIN)/sensor-ingest
	$(BIN)/python -m ingest.wire

clean:
	rm -rf $(VENV) .services .pytest_cache
