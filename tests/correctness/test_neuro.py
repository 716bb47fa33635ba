"""Neuroscience specifics beyond the per-step comparison of `test_steps.py`."""
import nibabel as nib
import pytest

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro
from pipelines.steps import RunContext
from tests.neuro_checks import ALL_OUTPUTS, assert_outputs_match

pytestmark = pytest.mark.correctness


def test_gzipped_input_matches_reference(engine, tmp_path):
    """HCP ships .nii.gz: workers then read single volumes through indexed_gzip."""
    subject = load_dataset("phantom-tiny").inputs[0]
    gz = tmp_path / "dwi.nii.gz"
    nib.save(nib.load(subject.dwi), gz)
    state = neuro.load_subject(gz, subject.bvals, subject.bvecs)
    ctx = RunContext(tmp_path / "run", neuro.NeuroParams(), neuro.NeuroPartitioning())
    final = neuro.run_pipeline(engine, state, ctx)
    assert_outputs_match(final, reference_run(subject).state, keys=ALL_OUTPUTS)
