"""Verdicts that respect noise (fixtures/verdicts.py), on saved runs: a change counts only
beyond both the relative threshold and the runs' own spread, a regression only when the
last three runs agree, and a run is only ever judged against runs like it (same machine,
same conditions, right answers)."""
from fixtures import verdicts
from fixtures.history import History, Result, Run, history_verdicts, render_verdicts

ELSEWHERE = {"cpu": "Other CPU", "cores": 64, "memory_gb": 256, "system": "Linux 6",
             "node": "big"}
STEADY = [10.0, 10.2, 9.9, 10.1, 10.0, 9.8]  # newest first, 1-2% apart


def test_too_few_runs_gives_no_verdict():
    v = verdicts.against_history([20.0, 10.0, 10.1])
    assert v.word.startswith("too few runs (2 before") and v.change is None


def test_unchanged_runs_are_no_change():
    assert verdicts.against_history([10.3, *STEADY]).word == "no change"
    assert verdicts.against_history([9.6, *STEADY]).word == "no change"


def test_one_slow_run_is_unconfirmed_and_three_are_a_regression():
    one = verdicts.against_history([13.0, *STEADY])
    assert one.word == "slower?" and 0.29 < one.change < 0.31 and one.bound == 0.10
    three = verdicts.against_history([13.0, 12.8, 13.1, *STEADY])
    assert three.word == "regression" and three.alarming
    faster = verdicts.against_history([7.0, 7.1, 6.9, *STEADY])
    assert faster.word == "improvement" and not faster.alarming
    # two slow runs and a normal one between: not confirmed
    assert verdicts.against_history([13.0, 10.0, 13.1, *STEADY]).word == "slower?"


def test_the_runs_own_spread_widens_the_bound():
    noisy = [10.0, 14.0, 8.0, 12.0, 9.0]  # sd/median ~ 0.24: bound ~ 48%
    v = verdicts.against_history([13.5, *noisy])
    assert v.word == "no change" and v.bound > 0.4
    assert verdicts.against_history([13.5, *STEADY]).word == "slower?"


def test_a_version_pair_is_judged_side_by_side():
    same = verdicts.compare([2.00, 2.04, 1.98], [2.02, 1.99, 2.05])
    assert same.word == "no change" and abs(same.change) < 0.02
    slower = verdicts.compare([2.00, 2.04, 1.98], [2.60, 2.55, 2.70])
    assert slower.word == "regression" and slower.change > 0.25
    assert verdicts.compare([2.0, 2.0], [1.0, 1.0, 1.0]).word.startswith("too few runs (2;")


def result(engine="dask", seconds=10.0, matched=True, versions=None, **facts):
    facts = {"dataset": "phantom-small", "workers": 2, **facts}
    return Result(pipeline="neuro", dataset="phantom-small", step="denoise", engine=engine,
                  rounds=[seconds], matched=matched, workers=facts["workers"],
                  versions=versions or {"dask": "2026.8.0"}, facts=facts)


def stored(tmp_path, runs):
    store = History(tmp_path / "h.sqlite")
    for i, run in enumerate(runs):
        run.started = f"2026-01-{i + 1:02d}T00:00:00+00:00"
        run.suite_commit = f"{i:040d}"
        store.add(run)
    return store


def test_history_verdicts_judge_only_like_runs(tmp_path):
    runs = [Run(results=[result(seconds=s)]) for s in (10.0, 10.1, 9.9, 10.0)]
    runs += [Run(results=[result(seconds=1.0, matched=False)]),      # a wrong answer
             Run(results=[result(seconds=1.0)], machine=ELSEWHERE),  # another machine
             Run(results=[result(seconds=30.0, workers=8)]),         # other conditions
             Run(results=[result(seconds=2.0, subjects=4)])]         # other data
    with stored(tmp_path, runs) as store:
        new = Run(results=[result(seconds=10.05), result(engine="spark", seconds=5.0)],
                  suite_commit="f" * 40)
        dask, spark = history_verdicts(new, store)
    assert dask.verdict.word == "no change" and dask.runs_before == 4
    assert dask.changed == f"suite {'0' * 8} -> ffffffff"
    assert spark.verdict.word.startswith("too few runs (0 before")  # never run before


def test_a_version_change_is_named_beside_its_verdict(tmp_path):
    old = {"dask": "2024.12.1", "numpy": "2.4.6"}
    runs = [Run(results=[result(seconds=s, versions=old)]) for s in (10.0, 10.1, 9.9)]
    runs += [Run(results=[result(seconds=s)]) for s in (14.0, 14.2)]
    with stored(tmp_path, runs) as store:
        new = Run(results=[result(seconds=14.1, versions={"dask": "2026.8.0",
                                                           "numpy": "2.4.6"})],
                  suite_commit=runs[-1].suite_commit)
        (judged,) = history_verdicts(new, store)
    assert judged.verdict.word == "regression"
    assert judged.changed == ""  # the last run already had dask 2026.8.0
    with stored(tmp_path / "b", runs[:3]) as store:
        (judged,) = history_verdicts(new, store)
    assert judged.verdict.word == "slower?"
    assert judged.changed.startswith("dask 2024.12.1 -> 2026.8.0, suite ")


def test_a_wrong_answer_is_its_own_verdict_and_the_table_says_the_rule(tmp_path):
    with stored(tmp_path, [Run(results=[result(seconds=s)]) for s in STEADY]) as store:
        new = Run(results=[result(seconds=10.0), result(engine="tensorflow", matched=False)])
        judged = history_verdicts(new, store)
    assert [j.verdict.word for j in judged] == ["no change", "wrong answer"]
    table = render_verdicts(judged)
    assert "neuro/phantom-small/denoise/dask" in table and "1 no change; 1 wrong answer" in table
    assert verdicts.RULE in table
