"""The results history (fixtures/history.py): runs go in whole and come back as they were,
a machine's runs are only compared with that machine's, exports from elsewhere import,
and bad files are one line. End to end: a perf run records every timed benchmark, a wrong
answer marked as such, and ends with its verdicts against the runs before it."""
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import history
from fixtures.history import History, HistoryError, Result, Run

ROOT = Path(__file__).resolve().parents[2]
ELSEWHERE = {"cpu": "Other CPU", "cores": 64, "memory_gb": 256, "system": "Linux 6",
             "node": "big"}


def result(engine="dask", step="denoise", rounds=(2.0, 2.2, 2.1), matched=True, **kw):
    return Result(pipeline="neuro", dataset="phantom-small", step=step, engine=engine,
                  rounds=list(rounds), matched=matched, **kw)


def test_a_run_comes_back_as_it_went_in(tmp_path):
    run = Run(results=[
        result(workers=2, partitions=32, versions={"dask": "2026.8.0", "pyspark": "not installed"},
               peak_mb=750.5, throughput=1.2e6, throughput_unit="voxels/s"),
        result(engine="tensorflow", matched=False),  # a wrong answer is kept, marked
        result(engine="spark", rounds=())],  # no timed round: no median
        suite_commit="abc123", suite_dirty=True, command="pytest -m perf")
    with History(tmp_path / "h.sqlite") as h:
        h.add(run)
        back = h.run(run.run_id[:6])
        listed = h.runs()
    assert back.machine == run.machine and back.suite_dirty is True
    by_engine = {r.engine: r for r in back.results}
    assert by_engine["dask"] == run.results[0] and by_engine["dask"].median_s == 2.1
    assert by_engine["tensorflow"].matched is False
    assert by_engine["spark"].median_s is None
    assert [(r["run_id"], r["results"]) for r in listed] == [(run.run_id, 3)]


def test_previous_results_come_from_this_machine_newest_first(tmp_path):
    with History(tmp_path / "h.sqlite") as h:
        old = Run(results=[result(rounds=[3.0])], started="2026-01-01T00:00:00+00:00")
        new = Run(results=[result(rounds=[2.0])], started="2026-02-01T00:00:00+00:00")
        wrong = Run(results=[result(rounds=[0.1], matched=False)],
                    started="2026-03-01T00:00:00+00:00")
        other = Run(results=[result(rounds=[0.5])], machine=ELSEWHERE,
                    started="2026-04-01T00:00:00+00:00")
        for run in (old, new, wrong, other):
            h.add(run)
        here = old.machine_id
        found = h.previous("neuro/phantom-small/denoise/dask", here)
        assert [r.rounds for _, r in found] == [[2.0], [3.0]]  # not the wrong answer
        assert [r.rounds for _, r in h.previous(
            "neuro/phantom-small/denoise/dask", here, before=new.run_id)] == [[3.0]]
        assert [r.rounds for _, r in h.previous(
            "neuro/phantom-small/denoise/dask", here, matched_only=False)][0] == [0.1]
        assert [r.rounds for _, r in h.previous(
            "neuro/phantom-small/denoise/dask", other.machine_id)] == [[0.5]]


def test_export_and_import_keep_the_machine(tmp_path):
    run = Run(results=[result()], machine=ELSEWHERE)
    with History(tmp_path / "there.sqlite") as there:
        there.add(run)
        exported = tmp_path / "run.json"
        exported.write_text(json.dumps(there.export(run.run_id)))
    with History(tmp_path / "here.sqlite") as here:
        here.import_file(exported)
        back = here.run(run.run_id)
        assert back.machine_id == history.machine_id(ELSEWHERE) != \
            history.machine_id(history.machine_facts())
        assert here.runs()[0]["imported_from"] == str(exported)
        with pytest.raises(HistoryError, match="already in"):
            here.import_file(exported)


@pytest.mark.parametrize("text", ["not json", '{"format": 99}', '{"format": 1}'])
def test_a_bad_export_is_one_line(tmp_path, text):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with History(tmp_path / "h.sqlite") as h, pytest.raises(HistoryError) as err:
        h.import_file(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_a_corrupt_history_file_is_one_line(tmp_path):
    path = tmp_path / "h.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    proc = subprocess.run([sys.executable, "-m", "fixtures.history", "--history", str(path),
                           "list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not a usable results history" in proc.stderr


@pytest.mark.slow
def test_a_perf_run_records_every_benchmark_and_judges_it(tmp_path):
    """The fake engine (tests/fake_engine.py) made to give a wrong mean b0: its benchmark
    fails, and the history holds it marked wrong beside the right ones."""
    path = tmp_path / "h.sqlite"
    # Not as an xdist worker: pytest-benchmark would disable timing (PYTEST_XDIST_WORKER).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(IAB_HISTORY=str(path), IAB_FAKE_WRONG="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.fake_engine", "--engine", "fake",
         "--engine", "reference", "--dataset", "phantom-tiny", "-p", "no:cacheprovider",
         "-q", "-m", "perf", "--rounds", "2", "-k", "mean_b0 or noise_sigma",
         "tests/perf/test_perf.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "1 failed, 3 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    # the first run of these benchmarks here: nothing to judge against, which it says
    assert "verdicts against earlier runs on this machine" in proc.stdout
    assert "with too few runs before them for a verdict (0 before" in proc.stdout
    assert "1 wrong answer" in proc.stdout
    with History(path) as h:
        (listed,) = h.runs()
        run = h.run(listed["run_id"])
    matched = {(r.engine, r.step): r.matched for r in run.results}
    assert matched == {("fake", "mean_b0"): False, ("fake", "noise_sigma"): True,
                       ("reference", "mean_b0"): True, ("reference", "noise_sigma"): True}
    assert all(len(r.rounds) == 2 and r.versions.get("numpy") for r in run.results)
    assert run.machine_id == history.machine_id(history.machine_facts())
    assert run.command.startswith("pytest") and "perf" in run.command
    # each engine test's outcome is recorded with the run, for the report's capability
    # matrix: how the live engine ran the step, and why a test failed
    with History(path) as h:
        outcomes = {(o.engine, o.step): o for o in h.outcomes(run.run_id)}
    assert {k: (o.outcome, o.how, o.kind) for k, o in outcomes.items()} == {
        ("fake", "mean_b0"): ("failed", "native", "perf"),
        ("fake", "noise_sigma"): ("passed", "kernels", "perf"),
        ("reference", "mean_b0"): ("passed", "kernels", "perf"),
        ("reference", "noise_sigma"): ("passed", "kernels", "perf")}
    assert "beyond tolerance" in outcomes[("fake", "mean_b0")].reason
    # the file is plain SQLite: anyone's tools can query it
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM results WHERE matched = 0").fetchone() == (1,)


def test_a_perf_run_without_the_reference_shows_its_recorded_figures(tmp_path):
    """`pytest -m perf --engine dask` still compares with the reference: this machine's
    latest matched reference run of the same data, marked as earlier; never another
    machine's, nor a run on other data under the same name (--visits)."""
    from fixtures.comparison import Timing, render

    facts = {("neuro", "phantom-small"): {"dataset": "phantom-small", "subjects": 1}}
    ref = result(engine="reference", rounds=[40.0], workers=1,
                 facts={"dataset": "phantom-small", "subjects": 1})
    with History(tmp_path / "h.sqlite") as h:
        h.add(Run(results=[result(engine="reference", rounds=[10.0], workers=1,
                                  facts={"dataset": "phantom-small", "subjects": 4})],
                  started="2026-05-01T00:00:00+00:00"))  # other data: 4 subjects
        h.add(Run(results=[result(engine="reference", rounds=[5.0], workers=1,
                                  facts=ref.facts)], machine=ELSEWHERE,
                  started="2026-06-01T00:00:00+00:00"))  # another machine
        h.add(Run(results=[ref], started="2026-04-01T00:00:00+00:00", run_id="ref0001"))
        dask = Timing("neuro", "phantom-small", "small", "denoise", "dask", 2, 20.0, 1, 700)
        filled = history.fill_from_history([dask], facts, h)
    (earlier,) = [t for t in filled if t.engine == "reference"]
    assert earlier.median_s == 40.0 and earlier.earlier.startswith("run ref0001 of 2026-04-01")
    table = render(filled)
    assert "reference (1w, earlier*)" in table and "2.00x" in table
    assert "* reference: not run this time; from the results history, run ref0001" in table
    with History(tmp_path / "empty.sqlite") as empty:
        assert history.fill_from_history([dask], facts, empty) == [dask]
