"""Every engine against the serial reference, step by step and end to end, on every
neuroscience dataset chosen (default: the tiny phantom and dipy's real small_64D)."""
import nibabel as nib
import pytest

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro
from pipelines.steps import RunContext
from tests.neuro_checks import assert_outputs_match

pytestmark = pytest.mark.correctness


def context(workdir, partitioning=neuro.NeuroPartitioning()):
    return RunContext(workdir, neuro.NeuroParams(), partitioning)


@pytest.mark.parametrize("step", [s.name for s in neuro.STEPS])
def test_step_matches_reference(step, engine, dataset, reference, tmp_path):
    """Each step fed the reference's outputs of the steps before it."""
    for run in reference:
        result = engine.run_step(neuro.STEP_BY_NAME[step], run.state_before(step),
                                 context(tmp_path))
        assert set(result.outputs) == set(neuro.STEP_BY_NAME[step].outputs)
        assert result.partitions >= 1
        assert_outputs_match(result.outputs, run.state)


def test_pipeline_matches_reference(engine, dataset, reference, tmp_path):
    for i, run in enumerate(reference):
        state = neuro.load_subject(*run.subject.files())
        final = neuro.run_pipeline(engine, state, context(tmp_path / f"subject{i}"))
        assert_outputs_match(final, run.state,
                             keys=["mean_b0", "mask", "sigma", "denoised", "fa", "md"])


def test_gzipped_input_matches_reference(engine, tmp_path):
    """HCP ships .nii.gz: workers then read single volumes through indexed_gzip."""
    subject = load_dataset("phantom-tiny").subjects[0]
    gz = tmp_path / "dwi.nii.gz"
    nib.save(nib.load(subject.dwi), gz)
    state = neuro.load_subject(gz, subject.bvals, subject.bvecs)
    final = neuro.run_pipeline(engine, state, context(tmp_path / "run"))
    assert_outputs_match(final, reference_run(subject).state,
                         keys=["mean_b0", "mask", "sigma", "denoised", "fa", "md"])
