"""How an engine's neuroscience outputs are compared with the reference's: one place, used
by the correctness tests and by every perf test before its time is trusted.

Why these tolerances: every Python engine runs the very same kernels on the same inputs,
so any difference can only come from floating-point evaluation order (partial sums of the
mean b0 combined in another grouping; SIMD paths of another CPU on a remote cluster) and
then the cast of float64 results to the float32 outputs. That is a few float32 units in
the last place, never more:
- float32 outputs (mean b0, denoised data, FA, MD): |got - want| <= 4 ulp(float32) of
  |want| (rtol 2**-21 = 4.8e-7) plus an absolute floor of 1e-6 of the array's largest
  magnitude, for values that round to near zero (MD outside the brain, FA of isotropic
  CSF) where a relative bound means nothing.
- the noise sigma is float64 end to end: rtol 1e-12.
- the brain mask is a thresholding decision: bit-identical.
An engine that re-expresses a kernel (TensorFlow, SciDB) will need its own, wider bound,
justified beside it; it does not widen these.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np

FLOAT32_RTOL = 2.0**-21
FLOOR = 1e-6
SIGMA_RTOL = 1e-12

# output key -> how to compare it
OUTPUT_KINDS = {"mean_b0": "float32", "mask": "exact", "sigma": "float64",
                "denoised": "float32-file", "fa": "float32", "md": "float32"}


def _assert_close(name, got, want, rtol, floor):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    atol = floor * float(np.abs(want).max(initial=0.0))
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = atol + rtol * np.abs(want.astype(np.float64))
    bad = diff > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.size} values differ from the "
                           f"reference beyond tolerance (max diff {diff.max():.3g})")


def assert_output_matches(name: str, got, want) -> None:
    kind = OUTPUT_KINDS[name]
    if kind == "exact":
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        n = int((got != want).sum())
        assert n == 0, f"{name}: {n} of {want.size} voxels differ from the reference"
    elif kind == "float64":
        _assert_close(name, got, want, SIGMA_RTOL, 0.0)
    elif kind == "float32":
        _assert_close(name, got, want, FLOAT32_RTOL, FLOOR)
    else:  # a 4D NIfTI: compared one volume at a time, so memory stays bounded
        g, w = nib.load(got), nib.load(want)
        assert g.shape == w.shape, f"{name}: shape {g.shape} != reference {w.shape}"
        for k in range(w.shape[3]):
            _assert_close(f"{name} volume {k}", np.asarray(g.dataobj[..., k]),
                          np.asarray(w.dataobj[..., k]), FLOAT32_RTOL, FLOOR)


def assert_outputs_match(outputs: dict, reference_state: dict, keys=None) -> None:
    for name in keys or outputs:
        assert_output_matches(name, outputs[name], reference_state[name])


ALL_OUTPUTS = ["mean_b0", "mask", "sigma", "denoised", "fa", "md"]
