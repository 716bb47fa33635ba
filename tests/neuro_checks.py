"""How an engine's neuroscience outputs are compared with the reference's: one place, used
by the correctness tests and by every perf test before its time is trusted. The bounds
are the engine's own (`Engine.tolerance`, per step and output, each with its reason):
`engines.tolerances.SAME_KERNELS` for engines that run the suite's kernels."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from engines.tolerances import SAME_KERNELS, Tolerance


def _assert_close(name, got, want, tol: Tolerance):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    want64 = want.astype(np.float64)
    diff = np.abs(got.astype(np.float64) - want64)
    bad = diff > tol.bound(np.abs(want64), float(np.abs(want64).max(initial=0.0)))
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.size} values differ from the "
                           f"reference beyond tolerance (max diff {diff.max():.3g}; "
                           f"bound: {tol.why})")


def _assert_identical(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    n = int((got != want).sum())
    assert n == 0, f"{name}: {n} of {want.size} voxels differ from the reference"


def assert_output_matches(name: str, got, want, tol: Tolerance) -> None:
    if name == "denoised":  # a 4D NIfTI: one volume at a time, so memory stays bounded
        g, w = nib.load(got), nib.load(want)
        assert g.shape == w.shape, f"{name}: shape {g.shape} != reference {w.shape}"
        for k in range(w.shape[3]):
            assert_output_matches(f"{name} volume {k}", np.asarray(g.dataobj[..., k]),
                                  np.asarray(w.dataobj[..., k]), tol)
    elif tol.exact:
        _assert_identical(name, got, want)
    else:
        _assert_close(name, got, want, tol)


def assert_outputs_match(outputs: dict, reference_state: dict, keys=None,
                         tolerance=SAME_KERNELS.__getitem__) -> None:
    """`tolerance(quantity)` gives the bound of each output (default: same kernels)."""
    for name in keys or outputs:
        assert_output_matches(name, outputs[name], reference_state[name], tolerance(name))


ALL_OUTPUTS = ["mean_b0", "mask", "sigma", "denoised", "fa", "md"]
