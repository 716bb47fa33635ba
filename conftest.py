"""Session fixtures and options of the suite.

Tests never branch on an engine's name: `engine` and `dataset` are fixtures parametrized
from `--engine` / `--dataset`, so one test body runs on every engine. An
engine that cannot run here (package missing, cluster unreachable) is skipped with the
reason; a step an engine declares in `not_implemented` is an expected failure wherever a
test runs it (strict where the test is parametrized by that step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from pathlib import Path

# One BLAS/OpenMP thread per process, set before numpy loads: the engines provide the
# parallelism (one single-threaded worker per core), and the reference is serial.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from engines import ENGINES, create_engine, engine_options  # noqa: E402
from engines.base import StepNotImplemented, print_progress  # noqa: E402
from fixtures import comparison, datasets, gate, history  # noqa: E402
from fixtures.measure import PeakMemory  # noqa: E402
from fixtures.reference import reference_run  # noqa: E402
from pipelines import PIPELINES  # noqa: E402
from pipelines.errors import (EngineLost, EngineUnavailable, InputError,  # noqa: E402
                              WorkersKeptDying)

TIMINGS = pytest.StashKey[list]()
RESULTS = pytest.StashKey[list]()  # history.Result of every timed benchmark
STARTED = pytest.StashKey[str]()
FACTS = pytest.StashKey[dict]()  # (pipeline, dataset) -> the dataset's facts
GATE = pytest.StashKey[str]()  # the gate's findings, printed last in the summary
SESSION = pytest.StashKey[str]()  # this session's id in the history (a perf run's run_id)
PARAMS = pytest.StashKey[dict]()  # pipeline -> (its Params, {name: value changed by --param})
HARNESS_BUDGET = 0.05  # of a timed step: what the suite itself may take


def pytest_addoption(parser):
    group = parser.getgroup("image-analytics-bench")
    group.addoption("--engine", action="append", choices=list(ENGINES),
                    help="engine to run (repeatable); default: every engine usable here")
    group.addoption("--dataset", action="append",
                    help=f"dataset (repeatable): {', '.join(datasets.dataset_names())}; "
                         f"default: {', '.join(datasets.DEFAULT_CORRECTNESS)} for "
                         f"correctness, {', '.join(datasets.DEFAULT_PERF)} for perf")
    group.addoption("--subjects", type=int, default=1,
                    help="subjects per phantom dataset (the study swept 1..25)")
    group.addoption("--visits", type=int, default=None,
                    help="visits of a synthetic survey (the study swept 2..24; default: "
                         "the scale's own)")
    group.addoption("--workers", type=int, default=None,
                    help="workers of a local engine cluster (default: one per core)")
    for option in engine_options():  # each engine's own, declared in engines/__init__.py
        option.add_to(group.addoption)
    group.addoption("--no-history", action="store_true",
                    help="do not add this perf run to the results history (by default every "
                         "timed run goes to .benchmarks/history.sqlite or $IAB_HISTORY; "
                         "`python -m fixtures.history list`)")
    group.addoption("--gate", nargs="?", const=str(gate.BASELINE), default=None,
                    metavar="BASELINE",
                    help="fail the run when an engine's time over the reference's exceeds its "
                         "baseline ratio by more than its allowance (default baseline: "
                         "tests/perf/gate_baseline.json; `make test` runs it on tiny)")
    group.addoption("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="change a pipeline parameter (repeatable; a field of NeuroParams or "
                         "AstroParams, for the pipeline that has it): the reference is "
                         "recomputed with it and every engine is held to that; refused with "
                         "perf tests unless --perf-params")
    group.addoption("--perf-params", action="store_true",
                    help="time perf tests with --param anyway: shown, but neither added to "
                         "the history nor gated (figures under other parameters do not "
                         "compare with the pinned ones)")
    group.addoption("--rounds", type=int,
                    help="timed rounds per benchmark (default: as many as fit ~20 s, 1..10)")


def pytest_configure(config):
    config.stash[TIMINGS] = []
    config.stash[RESULTS] = []
    config.stash[STARTED] = history.now()
    config.stash[FACTS] = {}
    config.stash[SESSION] = uuid.uuid4().hex[:12]
    config.pluginmanager.register(OutcomeRecorder(config), "iab-outcomes")
    try:
        for name in config.getoption("dataset") or []:
            datasets.expand_name(name)
        config.stash[PARAMS] = pipeline_params(config.getoption("param"))
    except InputError as exc:
        raise pytest.UsageError(str(exc)) from None
    if changed_params(config) and config.getoption("gate"):
        raise pytest.UsageError("--gate judges the pinned parameters' times; drop --param")


def pipeline_params(assignments) -> dict:
    """pipeline -> (Params, changed): each NAME=VALUE applies to the pipelines whose
    Params have that field, checked as the command line checks it."""
    from pipelines.steps import override

    fields = {name: {f.name for f in dataclasses.fields(p.Params)}
              for name, p in PIPELINES.items()}
    for text in assignments:
        name = text.partition("=")[0].strip().replace("-", "_")
        if not any(name in known for known in fields.values()):
            raise InputError(f"--param {name}: no such parameter of either pipeline")
    found = {}
    for pipeline, known in fields.items():
        mine = [t for t in assignments
                if t.partition("=")[0].strip().replace("-", "_") in known]
        found[pipeline] = override(PIPELINES[pipeline].Params(), mine, pipeline)
    return found


def changed_params(config) -> dict:
    """{pipeline: {name: value}} of what --param changed (empty: the pinned parameters)."""
    return {p: changed for p, (_, changed) in config.stash[PARAMS].items() if changed}


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "engine" in metafunc.fixturenames:
        # Function scope: `LiveEngine` keeps the engines' sessions, one at a time.
        metafunc.parametrize("engine", engine_names(config), indirect=True)
    if "dataset" in metafunc.fixturenames:
        chosen = config.getoption("dataset")
        if not chosen:
            perf = metafunc.definition.get_closest_marker("perf") is not None
            chosen = datasets.DEFAULT_PERF if perf else datasets.DEFAULT_CORRECTNESS
        names = list(dict.fromkeys(n for c in chosen for n in datasets.expand_name(c)))
        # A test marked pipeline("astro") runs on that pipeline's datasets only; when none
        # was chosen, pytest reports it skipped with an empty parameter set.
        marker = metafunc.definition.get_closest_marker("pipeline")
        if marker:
            names = [n for n in names if datasets.pipeline_of(n) == marker.args[0]]
        each_step = metafunc.definition.get_closest_marker("each_step")
        if each_step:
            # (dataset, step) pairs: each dataset with the steps of its own pipeline, and
            # with the whole pipeline as one more "step" when whole=True.
            pairs = [(n, s.name) for n in names
                     for s in PIPELINES[datasets.pipeline_of(n)].STEPS]
            if each_step.kwargs.get("whole"):
                pairs += [(n, "pipeline") for n in names]
            metafunc.parametrize(("dataset", "step"), pairs, indirect=["dataset"],
                                 scope="session", ids=[f"{n}-{s}" for n, s in pairs])
        else:
            metafunc.parametrize("dataset", names, indirect=True, scope="session")


def pytest_collection_finish(session):
    """Perf tests refuse --param (after -m and -k chose the tests: a correctness run with
    --param is what it is for)."""
    changed = changed_params(session.config)
    if changed and not session.config.getoption("perf_params") and \
            any(item.get_closest_marker("perf") for item in session.items):
        raise pytest.UsageError(
            f"--param changes {changed}: perf figures are measured with the pinned "
            f"parameters, so that they compare across runs; add --perf-params to time "
            f"these anyway (kept out of the history and the gate)")


def engine_names(config) -> list[str]:
    return list(dict.fromkeys(config.getoption("engine") or ENGINES))  # each once


def pytest_ignore_collect(collection_path, config):
    """A perf-only run (`-m perf`) does not import the correctness modules: their imports
    (TensorFlow's alone is ~450 MB) would sit in every engine's peak memory."""
    if config.getoption("markexpr") == "perf" and \
            "correctness" in collection_path.relative_to(config.rootpath).parts:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """Each engine's tests run together (in their collected order), so that each engine
    starts once. No engine module is imported here: an engine's packages load when it
    starts, so that they count in its memory figures and no other engine's."""
    rank = {name: i for i, name in enumerate(engine_names(config))}

    def engine_rank(item):
        params = getattr(item, "callspec", None) and item.callspec.params
        return rank.get(params.get("engine"), -1) if params else -1

    items.sort(key=engine_rank)  # stable: tests without an engine first, as collected
    for item in items:  # what the capability matrix needs to know of each engine test
        params = getattr(item, "callspec", None) and item.callspec.params
        if params and "engine" in params:
            item.user_properties += [
                ("iab_engine", params["engine"]), ("iab_dataset", params.get("dataset")),
                ("iab_step", params.get("step")),
                ("iab_kind", "perf" if item.get_closest_marker("perf") else "correctness")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Any test that runs a step its engine declares unimplemented (a CLI run, a bad-input
    test) is an expected failure with the engine's reason, not an error: what an engine
    cannot do is declared once, in the engine, and reaches every test."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(StepNotImplemented) \
            and not hasattr(report, "wasxfail"):
        report.outcome = "skipped"
        report.wasxfail = f"reason: {call.excinfo.value}"
    if call.excinfo is not None and call.excinfo.errisinstance(EngineLost):
        # the test fails with the engine's one line; a lost engine's other tests skip
        # (not one whose workers a task kept killing: it lives on, the next test runs)
        report.longrepr = f"{call.excinfo.typename}: {call.excinfo.value}"
        live = item.funcargs.get("live_engine")
        params = getattr(item, "callspec", None) and item.callspec.params
        if live is not None and params and "engine" in params and \
                not call.excinfo.errisinstance(WorkersKeptDying):
            live.lost(params["engine"], str(call.excinfo.value))


class LiveEngine:
    """The engines of a test session, one alive at a time: starting one closes the one
    before, so that an idle cluster's processes (their memory, their heartbeats) are
    never part of another engine's measurements. An engine that cannot start is skipped
    with its reason, tried once; one lost mid-run (`lost`) is skipped from then on."""

    def __init__(self, config):
        self.config = config
        self.current = None
        self.unavailable: dict[str, str] = {}

    def get(self, name: str):
        if self.current is not None and self.current.name == name:
            return self.current
        if name in self.unavailable:
            pytest.skip(self.unavailable[name])
        self.close()
        try:
            eng = create_engine(name, workers=self.config.getoption("workers"),
                                **{opt.dest: self.config.getoption(opt.dest)
                                   for opt in engine_options()})
            # start-up and warm-up happen here, outside every timed region
            self.current = eng.start()
        except EngineUnavailable as exc:
            self.unavailable[name] = f"engine {name} unavailable: {exc}"
            pytest.skip(self.unavailable[name])
        return self.current

    def close(self):
        if self.current is not None:
            current, self.current = self.current, None
            current.close()

    def lost(self, name: str, why: str) -> None:
        """The engine went away mid-run (its cluster, its JVM): its remaining tests skip
        with the reason; what is left of it is closed as well as it can be."""
        self.unavailable[name] = f"engine {name} lost earlier in this run: {why}"
        if self.current is not None and self.current.name == name:
            current, self.current = self.current, None
            with contextlib.suppress(Exception):
                current.close()


@pytest.fixture(scope="session")
def live_engine(request):
    live = LiveEngine(request.config)
    yield live
    live.close()


@pytest.fixture
def engine(request, live_engine):
    """The live engine; a test parametrized by a step the engine declares unimplemented
    must raise StepNotImplemented: a strict xfail (read at the test's call)."""
    eng = live_engine.get(request.param)
    params = getattr(request.node, "callspec", None) and request.node.callspec.params
    step = params.get("step") if params else None
    if step and step != "pipeline":  # the engine's own account, for the capability matrix
        request.node.user_properties.append(("iab_how", eng.capability(step)))
    reason = eng.not_implemented.get(step) if step else None
    if reason:
        request.node.add_marker(pytest.mark.xfail(raises=StepNotImplemented, strict=True,
                                                  reason=f"{eng.name}: {reason}"))
    return eng


@contextlib.contextmanager
def shown(config):
    """Let long fixture work (generating a dataset, the reference run) show its progress
    instead of sitting silent behind pytest's output capture."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        yield


@pytest.fixture(scope="session")
def dataset(request):
    with shown(request.config):
        return datasets.load_dataset(request.param,
                                     subjects=request.config.getoption("subjects"),
                                     visits=request.config.getoption("visits"))


@pytest.fixture(scope="session")
def params(request, dataset):
    """The dataset's pipeline's parameters: pinned, or as --param changed them."""
    return request.config.stash[PARAMS][dataset.pipeline][0]


@pytest.fixture(scope="session")
def reference(request, dataset, params):
    """The reference's outputs for every input (subject, survey) of the dataset, cached."""
    with shown(request.config):
        return [reference_run(source, params=params, progress=print_progress)
                for source in dataset.inputs]


class Bench:
    """Times one step of one engine with pytest-benchmark, records the facts that make
    the number comparable, checks the answer, and only then files the time for the
    comparison table: a fast wrong engine never appears in it."""

    # Rounds per benchmark: as many as the reference fits in TARGET_SECONDS, 1 to
    # MAX_ROUNDS; a short step first gets untimed rounds to reach a steady state (imports,
    # page mappings of the input in every worker, allocator pools).
    TARGET_SECONDS = 20.0
    MAX_ROUNDS = 10
    WARMUP_ROUNDS = 2

    def __init__(self, benchmark, config):
        self.benchmark = benchmark
        self.config = config

    def __call__(self, fn, *, check, pipeline, step, engine, dataset, reference_seconds,
                 work: dict):
        rounds = self.config.getoption("rounds") or max(
            1, min(self.MAX_ROUNDS, int(self.TARGET_SECONDS / max(reference_seconds, 1e-3))))
        self.benchmark.group = f"{pipeline}/{dataset.name}/{step}"
        facts = engine.describe()
        warmup = self.WARMUP_ROUNDS if reference_seconds < 2.0 else 0
        if warmup:
            # A short step's memory is sampled over its untimed warm-up rounds, so that
            # nothing runs beside its timed rounds: on steps of milliseconds the sampler's
            # wake-ups move the time (Dask's 12 ms mean_b0 ran 38% faster beside it).
            with PeakMemory() as peak:
                for _ in range(warmup):
                    fn()
            sampled, sampler_cpu, elapsed = "warm-up rounds", 0.0, 1.0
            result = self.benchmark.pedantic(fn, rounds=rounds, iterations=1)
        else:  # a long step: the sampler's share is ~1% of CPU and of time (README)
            with PeakMemory() as peak:
                started = time.perf_counter()
                result = self.benchmark.pedantic(fn, rounds=rounds, iterations=1)
                elapsed = time.perf_counter() - started
            sampled, sampler_cpu = "timed rounds", peak.cpu_seconds
        stats = self.benchmark.stats
        info = self.benchmark.extra_info
        info.update(facts)
        info.update(dataset.facts)
        self.config.stash[FACTS][(pipeline, dataset.name)] = dataset.facts
        if changed_params(self.config).get(pipeline):  # --perf-params: not the pinned ones
            info["params_changed"] = changed_params(self.config)[pipeline]
        info.update(step=step, pipeline=pipeline, peak_rss_mb=round(peak.bytes / 2**20, 1),
                    baseline_rss_mb=round(peak.baseline / 2**20, 1), **work)
        # The harness's share of the timed rounds: the memory sampler's CPU time (the only
        # harness work beside a round; the answer is checked after the rounds).
        info.update(memory_sampled=sampled, harness_cpu_s=round(sampler_cpu, 4),
                    harness_share=round(sampler_cpu / elapsed, 5))
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            for amount in ("voxels", "pixels", "bytes_in"):
                if work.get(amount):
                    info[f"{amount}_per_s"] = round(work[amount] / median)
        try:
            check(result)  # raises (the test fails) before a wrong answer's time is filed
        except Exception:
            if stats is not None:  # a wrong answer goes in the history, marked so
                self.record(engine, dataset, pipeline, step, stats.stats.data, info, False)
            raise
        if stats is not None:
            self.record(engine, dataset, pipeline, step, stats.stats.data, info, True)
            self.config.stash[TIMINGS].append(comparison.Timing(
                pipeline, dataset.name, dataset.description, step, engine.name,
                engine.workers, median, rounds, info["peak_rss_mb"]))

    def record(self, engine, dataset, pipeline, step, rounds, info, matched):
        unit = next((u for u in ("voxels", "pixels") if info.get(u)), None)
        self.config.stash[RESULTS].append(history.Result(
            pipeline=pipeline, dataset=dataset.name, step=step, engine=engine.name,
            rounds=list(rounds), matched=matched, workers=engine.workers,
            partitions=info.get("partitions"), versions=info.get("versions", {}),
            facts={k: v for k, v in info.items() if k != "versions"},
            peak_mb=info.get("peak_rss_mb"), throughput=info.get(f"{unit}_per_s"),
            throughput_unit=f"{unit}/s" if unit else None))


@pytest.fixture
def bench(benchmark, request):
    return Bench(benchmark, request.config)


class OutcomeRecorder:
    """Collects every engine test's outcome (in the controller, under xdist too) and adds
    them to the history at the end: the capability matrix of the report is made from
    them, beside what each engine declares."""

    def __init__(self, config):
        self.config = config
        self.outcomes: list[history.Outcome] = []

    def pytest_runtest_logreport(self, report):
        props = dict(report.user_properties)
        if "iab_engine" not in props or not (
                report.when == "call" or (report.when == "setup" and not report.passed)):
            return
        xfail = hasattr(report, "wasxfail")
        if report.passed:
            outcome, reason = ("xpassed" if xfail else "passed"), None
        elif report.skipped:
            outcome = "xfailed" if xfail else "skipped"
            reason = report.wasxfail.removeprefix("reason: ") if xfail else \
                (report.longrepr[2] if isinstance(report.longrepr, tuple)
                 else str(report.longrepr)).removeprefix("Skipped: ")
        else:
            crash = getattr(report.longrepr, "reprcrash", None)
            outcome, reason = "failed", crash.message if crash else str(report.longrepr)
        self.outcomes.append(history.Outcome(
            test=report.nodeid, kind=props["iab_kind"], engine=props["iab_engine"],
            outcome=outcome, dataset=props.get("iab_dataset"), step=props.get("iab_step"),
            how=props.get("iab_how"),
            reason=reason and reason.strip().splitlines()[0][:300]))

    def save(self):
        config = self.config
        if not self.outcomes or config.getoption("no_history") or changed_params(config):
            return
        commit, _ = history.suite_commit()
        try:
            with history.History() as store:
                store.add_outcomes(config.stash[SESSION], self.outcomes,
                                   config.stash[STARTED], history.machine_facts(), commit,
                                   " ".join(["pytest", *config.invocation_params.args]))
        except history.HistoryError as exc:
            print(f"history: outcomes not recorded: {exc}")


def pytest_sessionfinish(session, exitstatus):
    """Engine tests' outcomes go to the history; the gate (--gate) judges this run's
    ratios, and a failure fails the session."""
    config = session.config
    if not hasattr(config, "workerinput"):  # the xdist controller, or no xdist
        config.pluginmanager.get_plugin("iab-outcomes").save()
    path = config.getoption("gate")
    if not path or config.getoption("collectonly"):
        return
    try:
        findings = gate.check(config.stash.get(RESULTS, []), gate.load_baseline(Path(path)))
        config.stash[GATE] = gate.render(findings, Path(path))
        failed = any(f.word == "fail" for f in findings)
    except gate.GateError as exc:
        config.stash[GATE], failed = f"gate FAILED: {exc}", True
    if failed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the verdicts end the run
def pytest_terminal_summary(terminalreporter, config):
    write = terminalreporter.write_line
    results = config.stash.get(RESULTS, [])
    verdict_lines = record_and_judge(config, results) if results else []
    timings = config.stash.get(TIMINGS, [])
    if timings and history.default_path().exists():
        try:
            with history.History() as store:
                timings = history.fill_from_history(timings, config.stash[FACTS], store)
        except history.HistoryError as exc:
            write(f"history: not read: {exc}", red=True)
    if timings:
        terminalreporter.section("engine comparison")
        write(comparison.render(timings))
    if verdict_lines:  # the run ends with its verdicts, then the gate's
        terminalreporter.section("verdicts against earlier runs on this machine")
        for line, markup in verdict_lines:
            write(line, **markup)
    if GATE in config.stash:
        terminalreporter.section("CI gate: each engine's time over the reference's")
        for line in config.stash[GATE].splitlines():
            write(line, red=line.startswith("gate FAILED"))


def record_and_judge(config, results) -> list[tuple[str, dict]]:
    """Judge this run's results against this machine's earlier runs, then add the run to
    the history (unless --no-history). Returns the lines to show, with their markup."""
    changed = changed_params(config)
    if changed:  # only figures under the pinned parameters compare, and are kept
        return [(f"history: not used: parameters changed by --param {changed}",
                 {"yellow": True})]
    record = not config.getoption("no_history")
    if not record and not history.default_path().exists():
        return []
    commit, dirty = history.suite_commit()
    run = history.Run(results=results, suite_commit=commit, suite_dirty=dirty,
                      started=config.stash[STARTED], run_id=config.stash[SESSION],
                      command=" ".join(["pytest", *config.invocation_params.args]))
    try:
        with history.History() as store:
            judged = history.history_verdicts(run, store)
            if record:
                store.add(run)
    except history.HistoryError as exc:
        return [(f"history: not used: {exc}", {"red": True})]
    lines = [(line, {}) for line in history.render_verdicts(judged).splitlines()]
    if record:
        lines.append((f"history: run {run.run_id} ({len(results)} results) added to "
                      f"{store.path}", {}))
    # the suite's own cost must stay small beside what it measures
    lines += [(f"harness: {r.benchmark}: the memory sampler took {r.facts['harness_share']:.1%}"
               f" of the timed rounds' time (budget {HARNESS_BUDGET:.0%})", {"yellow": True})
              for r in results if (r.facts.get("harness_share") or 0) > HARNESS_BUDGET]
    return lines
