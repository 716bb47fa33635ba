# Two commands set up a fresh machine and run the suite (Python 3.11+ and make needed):
#   make bench   the perf suite on the default datasets (phantom-small, survey-small) with every
#                local engine -> comparison tables
#   make test    the correctness suite (in parallel), then a one-round smoke run of the perf suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ENGINES ?=                 # e.g. ENGINES="--engine dask"; default: every engine usable here
DATASETS ?= small         # a scale names both pipelines' datasets: phantom-small, survey-small
WORKERS ?= $(shell nproc)
PYTEST_ARGS ?=

.PHONY: bench test clean
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q ".[all]"
	@# Spark needs Java 17+: installed from Debian's packages where we may, else its tests skip.
	@java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])' || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -q >/dev/null && apt-get install -y -q openjdk-17-jre-headless >/dev/null; } || \
	  echo "note: no Java 17+ found; Spark is skipped (see README: Spark)"
	touch $@

bench: $(BIN)/.installed
	$(BIN)/python -m pytest -m perf $(ENGINES) $(addprefix --dataset ,$(DATASETS)) --workers $(WORKERS) \
	  --benchmark-autosave --benchmark-columns=median,min,max,rounds \
	  --benchmark-sort=name --history $(PYTEST_ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not perf" -n 2 $(ENGINES) $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m perf --dataset tiny --benchmark-disable $(ENGINES) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .benchmarks .hypothesis .pytest_cache
