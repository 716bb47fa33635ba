"""The reference itself against the phantom's ground truth: the numbers every engine is
held to must be right, not only consistent."""
import numpy as np
import pytest

from engines.reference import ReferenceEngine
from pipelines import neuro
from pipelines.steps import RunContext

pytestmark = [pytest.mark.correctness, pytest.mark.pipeline("neuro")]


def need_truth(dataset):
    if not dataset.has_truth:
        pytest.skip(f"{dataset.name} is real data without ground truth")


def test_mask_covers_brain(dataset, reference):
    need_truth(dataset)
    for run in reference:
        mask = run.state["mask"]
        brain = run.source.truth("brain").astype(bool)
        background = run.source.truth("tissue") == 0
        # median_otsu on the mean b0 keeps the whole head (scalp included), so the bound is
        # on missing brain and on included background, not on a perfect brain outline.
        assert mask[brain].mean() >= 0.97, f"mask misses {1 - mask[brain].mean():.1%} of brain"
        assert mask[background].mean() <= 0.03, \
            f"mask includes {mask[background].mean():.1%} of the background"


def test_denoising_lowers_fa_error(dataset, reference, tmp_path):
    need_truth(dataset)
    ctx = RunContext(tmp_path, neuro.NeuroParams(), neuro.NeuroPartitioning())
    for run in reference:
        # The same fit on the noisy data: point the fit step at the raw image.
        raw = ReferenceEngine().run_step(neuro.FIT_TENSOR,
                                         {**run.state, "denoised": run.state["dwi"]}, ctx)
        truth = run.source.truth("fa")
        brain = run.source.truth("brain").astype(bool) & run.state["mask"]
        err_raw = np.abs(raw.outputs["fa"] - truth)[brain].mean()
        err_denoised = np.abs(run.state["fa"] - truth)[brain].mean()
        assert err_denoised < err_raw, (f"denoising did not lower the FA error "
                                        f"({err_denoised:.4f} vs {err_raw:.4f} raw)")
