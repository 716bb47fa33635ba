"""The engine seam itself, exercised with a fake engine (tests/fake_engine.py) in a test run
of its own: a step an engine declares unimplemented is an expected failure in every test
that runs it, parametrized by step or not; an engine is held to the bounds it declares,
not looser and not the others'; and a step that does not make every output it declares
fails, in the correctness and in the perf suite."""
import subprocess
import sys
from pathlib import Path

import pytest

from engines.base import StepContractError, StepNotImplemented
from engines.reference import ReferenceEngine
from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro
from pipelines.steps import RunContext
from tests.checks import assert_match
from tests.fake_engine import MEAN_B0_ERROR, FakeEngine

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """test id -> outcome of the step, pipeline, CLI and perf tests run on the fake."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.fake_engine", "--engine", "fake",
         "--dataset", "phantom-tiny", "-p", "no:cacheprovider", "-q", "-rA", "--no-history",
         "--benchmark-disable", "-m", "not slow", "-k", "not astro",
         "tests/correctness/test_steps.py", "tests/correctness/test_cli.py",
         "tests/perf/test_perf.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    found = {}
    for line in proc.stdout.splitlines():
        for outcome in ("PASSED", "FAILED", "XFAIL", "XPASS", "SKIPPED", "ERROR"):
            if line.startswith(outcome + " "):
                test = line.split()[1].split("::")[-1]
                found[test] = outcome
    assert found, proc.stdout[-3000:] + proc.stderr[-3000:]
    return found


def test_unimplemented_step_is_a_strict_expected_failure(outcomes):
    assert outcomes["test_step_matches_reference[fake-phantom-tiny-denoise]"] == "XFAIL"
    assert outcomes["test_perf[fake-phantom-tiny-denoise]"] == "XFAIL"


def test_unimplemented_step_reaches_tests_without_a_step_parameter(outcomes):
    assert outcomes["test_pipeline_matches_reference[fake-phantom-tiny]"] == "XFAIL"
    assert outcomes["test_cli_writes_the_reference_maps[fake]"] == "XFAIL"
    assert outcomes["test_perf[fake-phantom-tiny-pipeline]"] == "XFAIL"


def test_declared_bounds_apply_and_kernel_steps_pass(outcomes):
    for step in ("mean_b0", "brain_mask", "noise_sigma"):
        assert outcomes[f"test_step_matches_reference[fake-phantom-tiny-{step}]"] == "PASSED"
        assert outcomes[f"test_perf[fake-phantom-tiny-{step}]"] == "PASSED"


def test_missing_output_fails_correctness_and_perf(outcomes):
    assert outcomes["test_step_matches_reference[fake-phantom-tiny-fit_tensor]"] == "FAILED"
    assert outcomes["test_perf[fake-phantom-tiny-fit_tensor]"] == "FAILED"


def test_engine_contract_in_process(tmp_path):
    engine = FakeEngine().start()
    run = reference_run(load_dataset("phantom-tiny").inputs[0])
    ctx = RunContext(tmp_path, neuro.NeuroParams(), neuro.NeuroPartitioning())
    with pytest.raises(StepNotImplemented, match="fake does not implement denoise: a gap"):
        engine.run_step(neuro.DENOISE, run.state_before("denoise"), ctx)
    with pytest.raises(StepContractError, match=r"made \['fa'\]; the step declares"):
        engine.run_step(neuro.FIT_TENSOR, run.state_before("fit_tensor"), ctx)
    assert engine.capability("denoise").startswith("not implemented")
    assert engine.capability("mean_b0") == "native"
    assert engine.capability("brain_mask") == "kernels"
    # Its mean b0 is off by 1e-4: within its own bound, far outside the same kernels'.
    outputs = engine.run_step(neuro.MEAN_B0, run.state_before("mean_b0"), ctx).outputs
    assert_match(engine, "neuro", outputs, run.state)
    with pytest.raises(AssertionError, match="beyond tolerance"):
        assert_match(ReferenceEngine(), "neuro", outputs, run.state)
    assert MEAN_B0_ERROR > 100 * 2.0**-21


def test_an_engine_lost_mid_run_fails_once_then_skips():
    """The fake loses its cluster in noise_sigma: that test fails with the engine's one
    line, the fake's later tests skip with it, and the reference's tests go on."""
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.fake_engine", "--engine", "fake",
         "--engine", "reference", "--dataset", "phantom-tiny", "-p", "no:cacheprovider",
         "-q", "-rA", "--no-history", "--benchmark-disable",
         "tests/correctness/test_steps.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "IAB_FAKE_LOST": "noise_sigma"})
    out = proc.stdout
    line = "lost the fake's cluster at fake://nowhere during noise_sigma"
    assert f"\nEngineLost: {line}\n" in out, out[-3000:]
    assert "FAILED tests/correctness/test_steps.py::test_step_matches_reference[fake-" \
           "phantom-tiny-noise_sigma]" in out
    skipped = [s for s in out.splitlines() if s.startswith("SKIPPED [")]
    assert skipped and all(s.endswith(f": engine fake lost earlier in this run: {line}")
                           for s in skipped), skipped  # denoise, fit_tensor, the pipeline
    assert "1 failed, 8 passed, 3 skipped" in out, out[-3000:]


def test_an_engine_gone_mid_step_is_lost_not_unavailable(tmp_path):
    """A server that answered at start and not mid-step (the SciDB and Myria clients say
    "unreachable", EngineUnavailable): the step raises EngineLost, exit status 3 and a
    lost engine under pytest, not a skip as for an engine that never started."""
    from pipelines.errors import EngineLost, EngineUnavailable

    class Gone(ReferenceEngine):
        name = "gone"

        def map(self, kernel, partitions, shared, label):
            raise EngineUnavailable("the server at x://y: unreachable (connection reset)")

    run = reference_run(load_dataset("phantom-tiny").inputs[0])
    step = neuro.STEP_BY_NAME["noise_sigma"]
    with pytest.raises(EngineLost, match=r"^the server at x://y: unreachable \(connection "
                                         r"reset\) \(during noise_sigma\)$"):
        Gone().start().run_step(step, run.state_before("noise_sigma"),
                                RunContext(tmp_path, neuro.NeuroParams(),
                                           neuro.NeuroPartitioning()))
