"""How an engine's astronomy outputs are compared with the reference's: one place, used by
the correctness tests and by every perf test before its time is trusted. The bounds are
the engine's own (`Engine.tolerance`, per step and quantity, each with its reason;
`engines.tolerances.SAME_KERNELS` for engines that run the suite's kernels):
- image planes (calibrated image and variance, warps, coadds) within the plane's bound;
  where the reference has no data (NaN) the engine must have none either, and vice versa;
- masks, exposure counts, the list of skipped CCDs and which (visit, patch) got a warp:
  decisions, so identical;
- the catalog: which sources were found is a decision, so the same rows (patch, id,
  footprint area) in the same order; centroids (and the same angle on the sky) and fluxes
  within their bounds.
"""
from __future__ import annotations

import numpy as np
from astropy.io import fits

from engines.tolerances import SAME_KERNELS, Tolerance


def _assert_plane_close(name, got, want, tol: Tolerance):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    n = int((nan_got != nan_want).sum())
    assert n == 0, f"{name}: {n} pixels have data in one and not in the other"
    got, want = got[~nan_want], want[~nan_want]
    if want.size == 0:
        return
    diff = np.abs(got - want)
    bad = int((diff > tol.bound(np.abs(want), float(np.abs(want).max()))).sum())
    assert bad == 0, (f"{name}: {bad} of {want.size} pixels differ from the reference beyond "
                      f"tolerance (max diff {diff.max():.3g}; bound: {tol.why})")


def assert_fits_match(name, got_path, want_path, tol: Tolerance = SAME_KERNELS["coadds"],
                      exact=("MASK", "EXPCOUNT")):
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
                _assert_plane_close(f"{name} {plane}", g, w, tol)


def _assert_files_match(name, got: dict, want: dict, tol: Tolerance):
    assert set(got) == set(want), (f"{name}: made for {sorted(set(got) ^ set(want))[:5]} "
                                   f"differently from the reference")
    for key in sorted(want):
        assert_fits_match(f"{name} {key}", got[key], want[key], tol)


def assert_catalog_match(got, want, pixel_scale_arcsec: float,
                         tolerance=SAME_KERNELS.__getitem__):
    assert len(got) == len(want), f"catalog: {len(got)} sources, reference {len(want)}"
    for column in ("patch_x", "patch_y", "id", "area", "flags"):
        n = int((got[column] != want[column]).sum())
        assert n == 0, f"catalog: {column} differs in {n} rows"
    centroid, flux = tolerance("catalog.centroid"), tolerance("catalog.flux")
    for column in ("x", "y"):
        diff = np.abs(got[column] - want[column])
        assert (diff <= centroid.bound(np.abs(want[column]), 0.0)).all(), \
            f"catalog {column}: max diff {diff.max():.3g} ({centroid.why})"
    # The centroid bound as an angle on the sky map (1% slack for the projection's scale).
    cos_dec = np.cos(np.radians(want["dec"]))
    sep = np.hypot((got["ra"] - want["ra"]) * cos_dec, got["dec"] - want["dec"]) * 3600
    limit = centroid.atol * pixel_scale_arcsec * 1.01
    assert (sep <= limit).all(), f"catalog: sky position off by {sep.max():.3g} arcsec"
    for column in ("flux", "flux_err"):
        # NaN: a saturated star's row where nothing of it was measured; in the same rows
        unknown = np.isnan(want[column])
        n = int((np.isnan(got[column]) != unknown).sum())
        assert n == 0, f"catalog {column}: NaN in {n} rows where the reference's is not"
        g, w = got[column][~unknown], want[column][~unknown]
        diff = np.abs(g - w)
        assert (diff <= flux.bound(np.abs(w), 0.0)).all(), \
            f"catalog {column}: max relative diff {(diff / np.abs(w)).max():.3g}"


def assert_outputs_match(outputs: dict, reference_state: dict, keys=None,
                         tolerance=SAME_KERNELS.__getitem__) -> None:
    """`tolerance(quantity)` gives the bound of each output (default: same kernels)."""
    for name in keys or outputs:
        got, want = outputs[name], reference_state[name]
        if name in ("calexps", "warps", "coadds"):
            _assert_files_match(name, got, want, tolerance(name))
        elif name == "catalog":
            assert_catalog_match(got, want, reference_state["skymap"].pixel_scale_arcsec,
                                 tolerance)
        elif name == "saturated":  # the same function of the same SAT planes and WCS
            assert got.dtype == want.dtype and np.array_equal(got, want), \
                f"saturated stars: {len(got)} rows differ from the reference's {len(want)}"
        elif name == "skipped":
            assert list(got) == list(want), f"skipped: {got} != reference {want}"
        elif name == "calibration":
            assert set(got) == set(want), "calibration: different CCDs"
            median = tolerance("calibration.background_median")
            for key in want:
                assert got[key]["cosmic_ray_pixels"] == want[key]["cosmic_ray_pixels"], key
                g, w = got[key]["background_median"], want[key]["background_median"]
                assert abs(g - w) <= median.bound(abs(w), 0.0), (key, median.why)
        else:
            raise KeyError(f"no comparison defined for output {name!r}")


ALL_OUTPUTS = ["calexps", "calibration", "skipped", "saturated", "warps", "coadds",
               "catalog"]
