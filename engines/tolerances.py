"""How close an engine's outputs must come to the reference's, and why: declared per
engine, per step and output (as ibis backends declare theirs), read by the checks in
`tests/*_checks.py`.

`SAME_KERNELS` are the bounds of every engine that runs the suite's own kernels on the same
inputs (reference, Dask, Spark): any difference can then only come from floating-point
evaluation order (partial sums combined in another grouping; SIMD paths of another CPU on
a remote cluster), then the cast of float64 results to float32 outputs. That is a few
float32 units in the last place, never more. An engine that re-expresses a kernel
(TensorFlow) states its own bound beside its code, with its reason, and never widens
these.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """|got - want| <= atol + rtol * |want| + floor * max|want| for every value; all zero
    means identical (a decision: a mask, a count, which sources were found)."""

    why: str
    rtol: float = 0.0
    floor: float = 0.0  # as a fraction of the output's largest magnitude in the reference
    atol: float = 0.0  # in the quantity's own unit (pixels for centroids)

    @property
    def exact(self) -> bool:
        return self.rtol == self.floor == self.atol == 0.0

    def bound(self, want_abs, want_max: float):
        return self.atol + self.rtol * want_abs + self.floor * want_max


FLOAT32_RTOL = 2.0**-21  # 4 float32 units in the last place of the value
FLOOR = 1e-6  # of the largest magnitude: values that round to near zero

_ORDER = ("the same kernels on the same inputs: only floating-point evaluation order can "
          "differ, then the cast to float32")
FLOAT32_PLANE = Tolerance(
    f"{_ORDER}, so 4 float32 ulps of the value plus 1e-6 of the largest magnitude (for "
    f"values near zero, where a relative bound means nothing)",
    rtol=FLOAT32_RTOL, floor=FLOOR)
DECISION = Tolerance("a decision (threshold, mask, count, set of files or sources): "
                     "identical")

SAME_KERNELS: dict[str, Tolerance] = {
    # neuroscience
    "mean_b0": FLOAT32_PLANE,
    "mask": DECISION,
    "sigma": Tolerance(f"{_ORDER}; float64 end to end", rtol=1e-12),
    "denoised": FLOAT32_PLANE,
    "fa": FLOAT32_PLANE,
    "md": FLOAT32_PLANE,
    # astronomy: image planes of calexps, warps and coadds (their MASK and EXPCOUNT
    # planes, and where a plane has no data, are decisions)
    "calexps": FLOAT32_PLANE,
    "warps": FLOAT32_PLANE,
    "coadds": FLOAT32_PLANE,
    "skipped": DECISION,
    "calibration.cosmic_ray_pixels": DECISION,
    "calibration.background_median": Tolerance(f"{_ORDER}: a float32 median",
                                               rtol=FLOAT32_RTOL),
    "catalog": DECISION,  # the same rows (patch, id, footprint area) in the same order
    "catalog.centroid": Tolerance(
        "a float64 moment over a footprint of float32 pixels that may differ by the float32 "
        "bound: 1e-4 pixel (3e-5 arcsec on the sky)", atol=1e-4),
    "catalog.flux": Tolerance("a float64 sum over a footprint of float32 pixels that may "
                              "differ by the float32 bound", rtol=1e-6),
}
