"""Neuroscience specifics beyond the per-step comparison of `test_steps.py`."""
import nibabel as nib
import pytest

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro
from pipelines.steps import RunContext
from tests.checks import assert_match
from tests.neuro_checks import ALL_OUTPUTS

pytestmark = pytest.mark.correctness


def test_gzipped_input_matches_reference(engine, tmp_path):
    """HCP ships .nii.gz: workers then read single volumes through indexed_gzip."""
    subject = load_dataset("phantom-tiny").inputs[0]
    gz = tmp_path / "dwi.nii.gz"
    nib.save(nib.load(subject.dwi), gz)
    state = neuro.load_subject(gz, subject.bvals, subject.bvecs)
    ctx = RunContext(tmp_path / "run", neuro.NeuroParams(), neuro.NeuroPartitioning())
    final = neuro.run_pipeline(engine, state, ctx)
    assert_match(engine, "neuro", final, reference_run(subject).state, keys=ALL_OUTPUTS)


def test_brain_mask_is_median_otsu_with_dipys_own_otsu(monkeypatch):
    """The reference's mask is dipy's median_otsu as it runs without scikit-image, whether
    scikit-image is installed or not (with it, median_otsu would take skimage's Otsu)."""
    import dipy.segment.mask
    from dipy.segment.threshold import otsu

    monkeypatch.setattr(dipy.segment.mask, "otsu", otsu)
    params = neuro.NeuroParams()
    for name in ("phantom-tiny", "dipy-small64d"):
        mean_b0 = reference_run(load_dataset(name).inputs[0]).state["mean_b0"]
        _, want = dipy.segment.mask.median_otsu(
            mean_b0, median_radius=params.median_radius, numpass=params.numpass,
            dilate=params.dilate, finalize_mask=False)
        assert (neuro.brain_mask_kernel(mean_b0, params) == want).all(), name
