"""`make versions` (fixtures/versions.py) on saved runs: the environments' requirements pin
the package in place of the suite's bound, the report judges each benchmark between the
versions by the noise rule, names every other package that differs, and says why a version
could not be measured instead of failing."""
from fixtures import versions
from fixtures.history import History, Result, Run


def test_the_package_is_pinned_in_place_of_the_suites_bound():
    reqs = versions.requirements("dask", "2024.12.1", "dask")
    assert "dask==2024.12.1" in reqs and "distributed==2024.12.1" in reqs  # released together
    assert not any(r.startswith(("dask>", "distributed>")) for r in reqs)
    assert "numpy>=1.26" in reqs and "dipy>=1.12" in reqs
    reference = versions.requirements("dipy", "1.11.0", "reference")
    assert "dipy==1.11.0" in reference and "dipy>=1.12" not in reference
    assert not any(r.startswith("dask") for r in reference)  # no engine extra


def pair_store(path):
    def run(version, seconds, matched=True, numpy="2.4.6"):
        return Run(results=[
            Result("neuro", "phantom-small", "denoise", "dask", [seconds], True, workers=2,
                   versions={"dask": version, "numpy": numpy}),
            Result("neuro", "phantom-small", "fit_tensor", "dask", [0.4], matched, workers=2,
                   versions={"dask": version, "numpy": numpy})])
    with History(path) as h:
        for i, (old, new) in enumerate([(22.0, 30.0), (22.4, 30.5), (21.8, 29.6)]):
            h.add(Run(**{**run("2024.12.1", old, numpy="2.2.6").__dict__,
                         "started": f"2026-01-01T00:0{2 * i}:00+00:00"}))
            h.add(Run(**{**run("2026.8.0", new, matched=i != 1).__dict__,
                         "started": f"2026-01-01T00:0{2 * i + 1}:00+00:00"}))
    return path


def test_the_report_judges_each_benchmark_and_names_what_else_differs(tmp_path):
    store = pair_store(tmp_path / "dask.sqlite")
    text = versions.report("dask", ["2024.12.1", "2026.8.0", "2027.1.0"], store,
                           {"2027.1.0": "cannot be installed with the suite's requirements: "
                                        "No solution found"})
    lines = text.splitlines()
    assert lines[0] == ("dask 2027.1.0: not measured: cannot be installed with the suite's "
                        "requirements: No solution found")
    assert "also different between the two environments: numpy 2.2.6 -> 2.4.6" in text
    (denoise,) = [ln for ln in lines if "denoise" in ln]
    assert "22 s" in denoise and "30 s" in denoise and "+36.4%" in denoise \
        and denoise.rstrip().endswith("regression")
    (fit,) = [ln for ln in lines if "fit_tensor" in ln]
    assert fit.rstrip().endswith("wrong answer under 2026.8.0")
