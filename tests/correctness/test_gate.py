"""The CI gate (fixtures/gate.py): ratios taken in one run against a committed baseline.
On saved runs: the baseline's allowance comes from the runs' spread, a 2x slower engine
fails with one line naming it, unchanged runs pass, and a run the gate cannot judge (no
reference, other settings) says so. End to end (alone, as it times engines): five
unchanged runs pass against the committed baseline, and an engine made 2x slower by a
test-only switch (tests/slowdown.py) fails it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import gate
from fixtures.history import Result, Run

ROOT = Path(__file__).resolve().parents[2]
STEPS = {"mean_b0": 0.004, "noise_sigma": 0.011}  # the reference's seconds


def run(slower=1.0, jitter=0.0, engines=("dask",), rounds=5, workers=2, reference=True):
    results = []
    for step, seconds in STEPS.items():
        if reference:
            results.append(Result("neuro", "phantom-tiny", step, "reference",
                                  [seconds] * rounds, True, workers=1))
        for engine in engines:
            t = seconds * 2.5 * (1 + jitter) * (slower if engine == "dask" else 1)
            results.append(Result("neuro", "phantom-tiny", step, engine, [t] * rounds,
                                  True, workers=workers))
    return Run(results=results)


def baseline(jitters=(0.0, 0.02, -0.02, 0.01, -0.01, 0.03)):
    return gate.make_baseline([run(jitter=j) for j in jitters])


def test_the_baseline_takes_the_ratios_and_their_spread():
    data = baseline()
    entry = data["ratios"]["neuro/phantom-tiny/mean_b0/dask"]
    assert entry["ratio"] == pytest.approx(2.5, rel=0.01) and entry["runs"] == 6
    assert entry["allowance"] == gate.FLOOR  # 3 x 1.8% spread is under the floor
    noisy = gate.make_baseline([run(jitter=j) for j in (0, 0.4, -0.3, 0.3, -0.25)])
    entry = noisy["ratios"]["neuro/phantom-tiny/mean_b0/dask"]
    assert entry["allowance"] > gate.FLOOR
    assert entry["allowance"] == pytest.approx(3 * entry["spread"], abs=1e-3)
    assert data["settings"] == {"datasets": ["phantom-tiny"], "rounds": [5], "workers": [2]}
    # an engine seen in fewer runs than a baseline needs is not gated
    few = gate.make_baseline([run(jitter=j, engines=("dask", "spark") if j else ("dask",))
                              for j in (0, 0, 0, 0.01, 0.02)])
    assert not any("spark" in name for name in few["ratios"])


def test_unchanged_runs_pass_and_a_slower_engine_fails_in_one_line():
    data = baseline()
    for jitter in (0.0, 0.05, -0.05, 0.1, -0.1):
        assert all(f.word == "ok" for f in gate.check(run(jitter=jitter).results, data))
    found = gate.check(run(slower=2.0).results, data)
    assert [f.word for f in found] == ["fail", "fail"]
    line = found[0].line()
    assert re.fullmatch(r"gate FAILED: dask neuro/phantom-tiny/mean_b0 took 5x the "
                        r"reference's time; baseline 2.5\dx, allowed up to 4.[34]\d?x \(\+9\d%\)",
                        line), line
    assert "\n" not in gate.render(found).splitlines()[0]
    faster = gate.check(run(slower=0.5).results, data)
    assert {f.word for f in faster} == {"faster"}


def test_what_the_gate_cannot_judge_it_says():
    data = baseline()
    with pytest.raises(gate.GateError, match="needs the reference"):
        gate.check(run(reference=False).results, data)
    with pytest.raises(gate.GateError, match=r"rounds \[10\] here, \[5\] in the baseline"):
        gate.check(run(rounds=10).results, data)
    with pytest.raises(gate.GateError, match=r"workers \[4\] here"):
        gate.check(run(workers=4).results, data)
    # an engine of the baseline that did not run here (not installed) is not gated
    found = gate.check(run(engines=("spark",)).results,
                       gate.make_baseline([run(engines=("dask", "spark"))] * 5))
    assert {f.benchmark.split("/")[-1]: f.word for f in found} == {"dask": "not run",
                                                                 "spark": "ok"}


def test_the_committed_baseline_is_one_the_gate_can_use():
    data = gate.load_baseline()
    assert data["settings"]["rounds"] == [5] and data["settings"]["workers"] == [2]
    assert data["measured"]["runs"] >= gate.MIN_RUNS
    engines = {name.split("/")[-1] for name in data["ratios"]}
    assert {"dask", "spark", "tensorflow"} <= engines
    for name, e in data["ratios"].items():
        assert e["allowance"] >= gate.FLOOR and e["min"] <= e["ratio"] <= e["max"], name


def test_a_missing_or_broken_baseline_is_one_line(tmp_path):
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"ratios": {}}))
    for path in (bad, tmp_path / "none.json"):
        with pytest.raises(gate.GateError, match="not a gate baseline") as err:
            gate.load_baseline(path)
        assert "\n" not in str(err.value)


def gated_run(tmp_path, slowdown=None):
    """One gated perf run of the reference and dask on the neuro pipeline's light steps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["IAB_HISTORY"] = str(tmp_path / "h.sqlite")
    extra = []
    if slowdown:
        env["IAB_SLOWDOWN"] = slowdown
        extra = ["-p", "tests.slowdown"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *extra, "-m", "perf", "--dataset", "phantom-tiny",
         "--rounds", "5", "--workers", "2", "--engine", "reference", "--engine", "dask",
         "-k", "mean_b0 or noise_sigma or fit_tensor", "--gate", "-q", "-p", "no:cacheprovider",
         "tests/perf/test_perf.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.serial
@pytest.mark.slow
def test_five_unchanged_runs_pass_the_gate_and_a_2x_slower_engine_fails_it(tmp_path):
    for i in range(5):
        proc = gated_run(tmp_path)
        assert proc.returncode == 0 and "gate: 0 failed" in proc.stdout, \
            f"unchanged run {i + 1}: " + proc.stdout[-3000:] + proc.stderr[-2000:]
    proc = gated_run(tmp_path, slowdown="dask:2")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("gate FAILED: dask ")]
    assert len(failed) >= 2, proc.stdout[-3000:]  # the light steps, each about 2x
    assert "passed" in proc.stdout.splitlines()[-1]  # the answers were right: only slower
