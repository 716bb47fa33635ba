"""How an engine's astronomy outputs are compared with the reference's: one place, used by
the correctness tests and by every perf test before its time is trusted.

Why these tolerances: as in the neuroscience pipeline (`tests/neuro_checks.py`, whose
float32 bound is reused), every Python engine runs the very same kernels on the same
bytes, so a difference can only come from floating-point evaluation order on another
machine (SIMD paths, a BLAS). Hence:
- float32 planes (calibrated image and variance, warps, coadds): 4 float32 ulps of the
  reference value plus a floor of 1e-6 of the plane's largest magnitude (background-
  subtracted pixels cross zero, where a relative bound means nothing). Where the
  reference has no data (NaN) the engine must have none either, and vice versa.
- masks, exposure counts, the list of skipped CCDs and which (visit, patch) got a warp:
  decisions, so identical.
- the catalog: which sources were found is a thresholding decision, so the same rows
  (patch, id, footprint area) in the same order; centroids within 1e-4 pixel and sky
  positions within the same angle (1e-4 pixel of 0.333" is 3e-5"), fluxes and their
  errors within 1e-6 relative: each is a float64 sum over a footprint of float32 pixels
  that may differ by the float32 bound above.
An engine that re-expresses a kernel natively will need its own bound, justified there.
"""
from __future__ import annotations

import numpy as np
from astropy.io import fits

from tests.neuro_checks import FLOAT32_RTOL, FLOOR

CENTROID_ATOL_PX = 1e-4
FLUX_RTOL = 1e-6


def _assert_plane_close(name, got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    n = int((nan_got != nan_want).sum())
    assert n == 0, f"{name}: {n} pixels have data in one and not in the other"
    got, want = got[~nan_want], want[~nan_want]
    if want.size == 0:
        return
    diff = np.abs(got - want)
    bound = FLOOR * float(np.abs(want).max()) + FLOAT32_RTOL * np.abs(want)
    bad = int((diff > bound).sum())
    assert bad == 0, (f"{name}: {bad} of {want.size} pixels differ from the reference beyond "
                      f"tolerance (max diff {diff.max():.3g})")


def assert_fits_match(name, got_path, want_path, exact=("MASK", "EXPCOUNT")):
    with fits.open(got_path) as got, fits.open(want_path) as want:
        got_planes = [h.name for h in got if h.data is not None]
        want_planes = [h.name for h in want if h.data is not None]
        assert got_planes == want_planes, f"{name}: planes {got_planes} != {want_planes}"
        for plane in want_planes:
            g, w = got[plane].data, want[plane].data
            if plane in exact:
                assert g.shape == w.shape, f"{name} {plane}: shape {g.shape} != {w.shape}"
                n = int((g != w).sum())
                assert n == 0, f"{name} {plane}: {n} of {w.size} pixels differ"
            else:
                _assert_plane_close(f"{name} {plane}", g, w)


def _assert_files_match(name, got: dict, want: dict):
    assert set(got) == set(want), (f"{name}: made for {sorted(set(got) ^ set(want))[:5]} "
                                   f"differently from the reference")
    for key in sorted(want):
        assert_fits_match(f"{name} {key}", got[key], want[key])


def assert_catalog_match(got, want, pixel_scale_arcsec: float):
    assert len(got) == len(want), f"catalog: {len(got)} sources, reference {len(want)}"
    for column in ("patch_x", "patch_y", "id", "area"):
        n = int((got[column] != want[column]).sum())
        assert n == 0, f"catalog: {column} differs in {n} rows"
    for column in ("x", "y"):
        diff = np.abs(got[column] - want[column])
        assert (diff <= CENTROID_ATOL_PX).all(), f"catalog {column}: max diff {diff.max():.3g}"
    # The centroid bound as an angle on the sky map (1% slack for the projection's scale).
    cos_dec = np.cos(np.radians(want["dec"]))
    sep = np.hypot((got["ra"] - want["ra"]) * cos_dec, got["dec"] - want["dec"]) * 3600
    limit = CENTROID_ATOL_PX * pixel_scale_arcsec * 1.01
    assert (sep <= limit).all(), f"catalog: sky position off by {sep.max():.3g} arcsec"
    for column in ("flux", "flux_err"):
        diff = np.abs(got[column] - want[column])
        assert (diff <= FLUX_RTOL * np.abs(want[column])).all(), \
            f"catalog {column}: max relative diff {(diff / np.abs(want[column])).max():.3g}"


def assert_outputs_match(outputs: dict, reference_state: dict, keys=None) -> None:
    for name in keys or outputs:
        got, want = outputs[name], reference_state[name]
        if name in ("calexps", "warps", "coadds"):
            _assert_files_match(name, got, want)
        elif name == "catalog":
            assert_catalog_match(got, want, reference_state["skymap"].pixel_scale_arcsec)
        elif name == "skipped":
            assert list(got) == list(want), f"skipped: {got} != reference {want}"
        elif name == "calibration":
            assert set(got) == set(want), "calibration: different CCDs"
            for key in want:
                assert got[key]["cosmic_ray_pixels"] == want[key]["cosmic_ray_pixels"], key
                assert np.isclose(got[key]["background_median"],
                                  want[key]["background_median"], rtol=FLOAT32_RTOL), key
        else:
            raise KeyError(f"no comparison defined for output {name!r}")


ALL_OUTPUTS = ["calexps", "calibration", "skipped", "warps", "coadds", "catalog"]
