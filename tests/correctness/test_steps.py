"""Every engine against the serial reference, step by step and end to end, on every
dataset chosen (default: the tiny phantom, dipy's real small_64D, the tiny survey and
astropy's real M13 image). One test body for both pipelines: `step` runs over the steps
of the dataset's own pipeline. Each engine is held to its own declared bounds
(`Engine.tolerance`)."""
import pytest

from pipelines import PIPELINES
from pipelines.steps import RunContext
from tests.checks import CHECKS, assert_match

pytestmark = pytest.mark.correctness


def context(pipeline, params, workdir):
    return RunContext(workdir, params, pipeline.Partitioning())


@pytest.mark.each_step
def test_step_matches_reference(step, engine, dataset, params, reference, tmp_path):
    """Each step fed the reference's outputs of the steps before it (the parameters:
    pinned, or as --param set them; an engine that does not follow one refuses)."""
    pipeline = PIPELINES[dataset.pipeline]
    the_step = pipeline.STEP_BY_NAME[step]
    engine.check_params([the_step], params)
    for i, run in enumerate(reference):
        result = engine.run_step(the_step, run.state_before(step),
                                 context(pipeline, params, tmp_path / f"run{i}"))
        assert set(result.outputs) == set(the_step.outputs)
        assert result.partitions >= 1
        assert_match(engine, dataset.pipeline, result.outputs, run.state)


def test_pipeline_matches_reference(engine, dataset, params, reference, tmp_path):
    pipeline = PIPELINES[dataset.pipeline]
    engine.check_params(pipeline.STEPS, params)
    for i, run in enumerate(reference):
        final = pipeline.run_pipeline(engine, run.source.load_state(),
                                      context(pipeline, params, tmp_path / f"run{i}"))
        assert_match(engine, dataset.pipeline, final, run.state,
                     keys=CHECKS[dataset.pipeline].ALL_OUTPUTS)
