"""The report, built from saved runs (tests/report_runs/: real runs of this suite, exported;
README there says how each was made): two machines, engines missing from a run, a wrong
answer, an engine the report has never heard of, a sweep and a version comparison. Then
the page, opened in Debian's headless Chromium: every chart and table drawn, no console
error, a screenshot taken."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import report
from fixtures.history import History
from tests import browser

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "tests" / "report_runs"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A history, sweeps and versions folders made of the saved runs only."""
    where = tmp_path_factory.mktemp("report")
    sweeps, versions = where / "sweeps", where / "versions"
    sweeps.mkdir()
    versions.mkdir()
    targets = {"history": where / "history.sqlite", "sweep-subjects": sweeps / "subjects.sqlite",
               "versions-dipy": versions / "dipy.sqlite"}
    for path in sorted(RUNS.glob("*.json")):
        kind = next(k for k in targets if path.name.startswith(k))
        with History(targets[kind]) as h:
            h.import_file(path)
    made = report.gather(targets["history"], sweeps, versions)
    return made, where


def machines_of(made):
    here, = [m for m, f in made.machines.items() if f["node"] == "vm"]
    other, = [m for m in made.machines if m != here]
    return here, other


def test_tables_per_machine_pipeline_and_dataset(saved):
    made, _ = saved
    a, b = machines_of(made)
    keys = {(t.machine, t.pipeline, t.dataset) for t in made.tables}
    assert keys == {(a, "neuro", "phantom-tiny"), (a, "astro", "survey-tiny"),
                    (b, "neuro", "phantom-tiny"), (b, "astro", "survey-tiny")}
    neuro_a = next(t for t in made.tables if (t.machine, t.pipeline) == (a, "neuro"))
    # the fake engine (tests/fake_engine.py) appears with no report change, after the
    # reference and the engines the suite knows
    assert neuro_a.engines == ["reference", "dask", "spark", "tensorflow", "fake"]
    wrong = neuro_a.cells[("mean_b0", "fake")]
    assert not wrong.result.matched and neuro_a.speedup("mean_b0", "fake") is None
    head, rows = report.table_rows(neuro_a)
    assert ["mean_b0", "fake (1w)"] == next(r for r in rows if r[-1] == "WRONG ANSWER")[:2]
    # a speed-up is the reference's median over the engine's, both from the latest run
    ref, dask = neuro_a.cells[("denoise", "reference")], neuro_a.cells[("denoise", "dask")]
    assert neuro_a.speedup("denoise", "dask") == pytest.approx(
        ref.result.median_s / dask.result.median_s)
    # machine b ran two engines: the others are named as missing, with the reason known
    neuro_b = next(t for t in made.tables if (t.machine, t.pipeline) == (b, "neuro"))
    assert neuro_b.engines == ["reference", "dask"]
    assert set(neuro_b.missing) == {"spark", "tensorflow", "scidb", "myria"}  # no servers
    # two runs of the same benchmarks on machine a: a trend of two points
    assert len(made.trends[neuro_a.key][("denoise", "dask")]) == 2


def test_capability_matrix_is_made_from_engines_and_outcomes(saved):
    made, _ = saved
    a, _ = machines_of(made)
    matrix = made.capabilities[a]
    assert matrix[("tensorflow", "neuro", "denoise")].how == "compiled"
    assert matrix[("spark", "astro", "warp")].how == "native"
    assert matrix[("dask", "neuro", "fit_tensor")].how == "kernels"
    assert matrix[("dask", "neuro", "fit_tensor")].verdict == "checked"
    # the fake is not an engine this checkout knows: its declaration comes from the
    # recorded outcomes, its reason with it
    declared = matrix[("fake", "neuro", "denoise")]
    assert declared.how.startswith("not implemented: a gap the fake engine declares")
    assert declared.verdict == "declared"
    assert matrix[("fake", "neuro", "mean_b0")].verdict == "failed"
    # the engines that run only on a user's server, given none: said so, not "skipped"
    for cell in (("scidb", "neuro", "denoise"), ("scidb", "astro", "coadd"),
                 ("myria", "neuro", "fit_tensor"), ("myria", "astro", "coadd")):
        assert matrix[cell].verdict == "compiled, not run here", cell
    assert matrix[("myria", "astro", "warp")].how == "native"


def test_paper_figures_beside_ours(saved):
    made, _ = saved
    rows = {(r.measure.label, r.measure.size): r for r in made.paper_rows}
    denoise = rows[("denoising (step 2N)", "1 subject")]
    # the paper's Spark: one HCP subject (288 x 145x174x145) in 169 s on 128 vCPUs
    assert denoise.measure.seconds["spark"] == 169
    assert report.paper.per_core_second(denoise.measure.work, 169, 128) == pytest.approx(
        288 * 145 * 174 * 145 / 169 / 128)
    rate, seconds, cores, data = denoise.ours["dask"]
    assert cores == 2 and "phantom-tiny" in data and rate > 0
    head, table = report.paper_table(made)
    assert "paper myria" in head and "dask here" in head and len(table) == 6


def test_markdown_summary(saved):
    made, _ = saved
    text = report.markdown(made)
    assert text.count("| step | engine | median | spread |") == 4
    assert "### Capability matrix" in text and "WRONG ANSWER" in text
    assert "The study beside this machine" in text and "Scaling sweeps" in text
    assert "Versions of dipy" in text


def test_page_in_headless_chromium(saved):
    why = browser.missing()
    if why:
        pytest.skip(why)
    made, where = saved
    page_path, summary = report.write(made, where / "out")
    shot = where / "page.png"
    kinds = {f'table[data-table="{k}"]': n for k, n in
             (("results", 4), ("capabilities", 2), ("scaling", 1), ("versions", 1),
              ("paper", 1), ("runs", 1))}
    kinds.update({f'figure[data-chart="{k}"] svg': n for k, n in
                  (("bars", 4), ("trend", 2), ("scaling", 1), ("versions", 1),
                   ("paper", 1))})
    page = browser.open_page(page_path, list(kinds), shot)
    assert page.errors == []
    assert page.counts == kinds
    assert page.rendered == kinds  # each one drawn with a size, not only in the markup
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    # offline: nothing on the page is fetched, nothing runs
    text = page_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script" not in text and "<link" not in text and "@import" not in text


def test_report_command(saved, tmp_path):
    _, where = saved
    proc = subprocess.run([sys.executable, "-m", "fixtures.report", "--history",
                           str(where / "history.sqlite"), "--sweeps", str(where / "sweeps"),
                           "--versions", str(where / "versions"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 tables, 2 machine(s)" in proc.stdout
    assert (tmp_path / "index.html").stat().st_size > 0
    assert (tmp_path / "summary.md").read_text().startswith("# Benchmark report")


def test_report_of_an_empty_history_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fixtures.report", "--history",
                           str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "run `make bench`" in proc.stderr


def test_saved_runs_are_exports_of_this_suite():
    for path in RUNS.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["format"] == 1 and data["started"] and data["machine"]["cores"]


@pytest.mark.slow
def test_a_sweep_checks_every_point_and_feeds_the_curves(tmp_path):
    """Two points of a subjects sweep on the tiny phantom, the reference only: each point
    a perf session whose answers are checked, recorded apart from the main history."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "fixtures.sweep", "subjects", "1", "2", "--dataset",
         "phantom-tiny", "--engine", "reference", "--store", str(tmp_path), "--",
         "-k", "pipeline", "--rounds", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "point 2 of 2: --subjects 2:" in proc.stdout
    from fixtures.sweep import curves

    (points,) = [v for k, v in curves(tmp_path / "subjects.sqlite", "subjects").items()
                 if k[3:] == ("pipeline", "reference")]
    assert sorted(points) == [1, 2] and all(ok for _, ok in points.values())
    # twice the subjects, about twice the work: a curve that means something
    assert 1.3 < points[2][0] / points[1][0] < 3.0
