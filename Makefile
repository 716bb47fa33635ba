# Two commands set up a fresh machine and run the suite (Python 3.11+ and make needed):
#   make bench   the perf suite on the default datasets (phantom-small, survey-small) with every
#                local engine -> comparison tables, then the report (report/index.html, summary.md)
#   make test    the correctness suite (in parallel), its timing-sensitive tests (alone), then
#                the CI gate: the perf suite on tiny, each engine's time over the reference's
#                against tests/perf/gate_baseline.json
# and, when asked for:
#   make gate-baseline [GATE_RUNS=10]  remeasure the gate's baseline (GATE_RUNS runs of its perf run)
#   make versions PACKAGE=dask VERSIONS="2024.12.1 2026.8.0"   one package's versions, side by side
#   make sweep AXIS=subjects VALUES="1 2 4"   a scaling sweep (AXIS: subjects, visits, workers)
#   make report  the report again, from everything recorded
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ENGINES ?=                 # e.g. ENGINES="--engine dask"; default: every engine usable here
DATASETS ?= small         # a scale names both pipelines' datasets: phantom-small, survey-small
WORKERS ?= $(shell nproc)
PYTEST_ARGS ?=
# The gate's perf run: its baseline was measured with these settings (workers pinned: a
# machine with more cores has the same parallelism, so the same ratios).
GATE_RUN = -m perf --dataset tiny --rounds 5 --workers 2
GATE_RUNS ?= 10
# make versions: PACKAGE, VERSIONS (two or more, oldest first), RUNS per version, and
# optionally ENGINE (default: the one the package serves, else the reference)
RUNS ?= 3

.PHONY: bench test gate-baseline versions sweep report clean
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q ".[all]"
	@# Spark needs Java 17+: installed from Debian's packages where we may, else its tests skip.
	@java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])' || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -q >/dev/null && apt-get install -y -q openjdk-17-jre-headless >/dev/null; } || \
	  echo "note: no Java 17+ found; Spark is skipped (see README: Spark)"
	@# The report's page is opened in Debian's headless Chromium by a test (skipped without it).
	@command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
	  echo "note: no Chromium found; the test of the report's page is skipped"
	touch $@

# The report is written even when a benchmark failed (it shows which); the status is pytest's.
bench: $(BIN)/.installed
	$(BIN)/python -m pytest -m perf $(ENGINES) $(addprefix --dataset ,$(DATASETS)) --workers $(WORKERS) \
	  --benchmark-autosave --benchmark-columns=median,min,max,rounds \
	  --benchmark-sort=name $(PYTEST_ARGS); status=$$?; \
	$(BIN)/python -m fixtures.report; exit $$status

report: $(BIN)/.installed
	$(BIN)/python -m fixtures.report

# make sweep AXIS=subjects|visits|workers [VALUES="1 2 4"] [DATASETS=phantom-small] [ENGINES=...]
sweep: $(BIN)/.installed
	@test -n "$(AXIS)" || { echo 'usage: make sweep AXIS=subjects|visits|workers [VALUES="1 2 4"]'; exit 2; }
	$(BIN)/python -m fixtures.sweep $(AXIS) $(VALUES) \
	  $(if $(filter-out small,$(strip $(DATASETS))),$(addprefix --dataset ,$(DATASETS))) $(ENGINES) \
	  -- $(PYTEST_ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not perf and not serial" -n 2 $(ENGINES) $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m serial $(ENGINES) $(PYTEST_ARGS)
	$(BIN)/python -m pytest $(GATE_RUN) --gate $(if $(strip $(ENGINES)),$(ENGINES) --engine reference) $(PYTEST_ARGS)

gate-baseline: $(BIN)/.installed
	mkdir -p .benchmarks && rm -f .benchmarks/gate-runs.sqlite
	for i in $$(seq $(GATE_RUNS)); do echo "gate baseline: run $$i of $(GATE_RUNS)"; \
	  IAB_HISTORY=.benchmarks/gate-runs.sqlite $(BIN)/python -m pytest $(GATE_RUN) -q \
	    -p no:cacheprovider $(PYTEST_ARGS) > .benchmarks/gate-run.log 2>&1 || \
	    { tail -30 .benchmarks/gate-run.log; exit 1; }; done
	$(BIN)/python -m fixtures.gate update .benchmarks/gate-runs.sqlite

versions: $(BIN)/.installed
	@test -n "$(PACKAGE)" -a -n "$(VERSIONS)" || \
	  { echo 'usage: make versions PACKAGE=dask VERSIONS="2024.12.1 2026.8.0" [DATASETS=small] [RUNS=3] [ENGINE=dask]'; exit 2; }
	@# uv makes the cached environments in seconds; without it, venv and pip
	$(BIN)/python -m pip install -q uv || true
	$(BIN)/python -m fixtures.versions $(PACKAGE) $(VERSIONS) --runs $(RUNS) \
	  $(addprefix --dataset ,$(DATASETS)) $(if $(ENGINE),--engine $(ENGINE)) -- $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .benchmarks .hypothesis .pytest_cache
