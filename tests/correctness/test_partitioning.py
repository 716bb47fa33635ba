"""Property: however the work is cut, every engine returns the reference's result."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import astro, neuro
from pipelines.steps import RunContext
from tests.checks import assert_match

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
        assert_match(engine, "neuro", result.outputs, tiny.state)

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
        assert_match(engine, "neuro", result.outputs, tiny.state)

    check()


@pytest.fixture(scope="module")
def survey_tiny():
    return reference_run(load_dataset("survey-tiny").inputs[0])


def test_any_coadd_strip_height_matches_reference(engine, survey_tiny, tmp_path):
    """A coadd task holds a strip of rows of every visit at once: its memory. Any strip
    height, down to one row, gives the reference's coadds."""
    state = survey_tiny.state_before("coadd")

    @examples(6)
    @given(st.integers(1, state["skymap"].patch_shape[0] + 5))
    def check(rows):
        ctx = RunContext(tmp_path, astro.AstroParams(),
                         astro.AstroPartitioning(coadd_strip_rows=rows))
        result = engine.run_step(astro.COADD, state, ctx)
        assert_match(engine, "astro", result.outputs, survey_tiny.state)

    check()


def test_coadd_memory_is_bounded_by_its_strip(tmp_path):
    """The study's Dask ran out of memory at 24 visits. A coadd task here holds one strip
    of rows of every visit at a time: with 12 visits, its peak allocation stays a small
    fraction of the patch's whole stack of visits (what a naive coadd would hold)."""
    import tracemalloc

    from engines.reference import ReferenceEngine

    survey = load_dataset("survey-tiny", visits=12).inputs[0]
    state = survey.load_state()
    ctx = RunContext(tmp_path, astro.AstroParams(), astro.AstroPartitioning())
    engine = ReferenceEngine().start()
    for step in (astro.CALIBRATE, astro.WARP):
        state.update(engine.run_step(step, state, ctx).outputs)
    plan = astro.COADD.plan(state, ctx)
    patch, warps = plan.partitions[0]  # the patch with the most visits
    assert len(warps) == 12
    height, width = state["skymap"].patch_shape
    whole_stack = len(warps) * 2 * height * width * 8  # image and variance, float64
    tracemalloc.start()
    try:
        astro.coadd_kernel((patch, warps), **{**plan.shared, "strip_rows": 8})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < whole_stack / 3, f"peak {peak / 2**20:.1f} MiB, whole stack " \
                                   f"{whole_stack / 2**20:.1f} MiB"
