"""Property: however the work is cut, every engine returns the reference's result."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro
from pipelines.steps import RunContext
from tests.neuro_checks import assert_outputs_match

pytestmark = pytest.mark.correctness

def examples(n):
    # derandomize: CI sees the same examples every run; no database of failures kept
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny():
    return reference_run(load_dataset("phantom-tiny").inputs[0])


def partitionings(shape, n_volumes, n_b0):
    return st.builds(
        neuro.NeuroPartitioning,
        volumes_per_task=st.integers(1, n_volumes),
        b0_per_task=st.integers(1, n_b0),
        # any block shape, down to single voxels, as long as the task count stays sane
        block=st.tuples(*(st.integers(1, n) for n in shape)).filter(
            lambda b: np.prod([-(-n // e) for n, e in zip(shape, b)]) <= 300))


@pytest.mark.parametrize("step", ["mean_b0", "noise_sigma", "fit_tensor"])
def test_any_partitioning_matches_reference(step, engine, tiny, tmp_path):
    state = tiny.state_before(step)

    @examples(12)
    @given(partitionings(state["shape"], state["n_volumes"], len(state["b0_index"])))
    def check(partitioning):
        ctx = RunContext(tmp_path, neuro.NeuroParams(), partitioning)
        result = engine.run_step(neuro.STEP_BY_NAME[step], state, ctx)
        assert_outputs_match(result.outputs, tiny.state)

    check()


@pytest.mark.slow
def test_any_volume_grouping_denoises_like_reference(engine, tiny, tmp_path):
    state = tiny.state_before("denoise")

    @examples(3)
    @given(st.integers(1, state["n_volumes"]))
    def check(per_task):
        ctx = RunContext(tmp_path, neuro.NeuroParams(),
                         neuro.NeuroPartitioning(volumes_per_task=per_task))
        result = engine.run_step(neuro.DENOISE, state, ctx)
        assert_outputs_match(result.outputs, tiny.state)

    check()
