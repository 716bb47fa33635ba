"""The catalog's per-source flags, each case built by hand: what a user filters on must
say what happened to each source (every engine's detect is compared with the reference's
flags in test_steps.py and test_tf_detect.py)."""
import numpy as np
import pytest

from pipelines import astro

pytestmark = pytest.mark.correctness


def test_footprint_flags():
    """Three footprints of a smooth filtered image (as a matched filter makes it): one
    beside a no-data column, one holding two stars, one alone; then the deblender's cut."""
    from scipy.ndimage import label

    y, x = np.mgrid[:16, :16]
    filtered = sum(a * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 2.0)
                   for a, cy, cx in ((5, 2, 2), (5, 9, 3), (4, 9, 7), (3, 13, 13)))
    segments, n = label(filtered > 0.5, structure=np.ones((3, 3)))
    assert n == 3
    valid = np.ones(filtered.shape, dtype=bool)
    valid[0:3, 5] = False  # the column beside footprint 1's edge
    flags = astro.footprint_flags(segments, segments, filtered, valid)
    assert list(flags) == [astro.FLAG_EDGE, astro.FLAG_BLENDED, 0]
    # the deblender cut footprint 2 in two: both halves say so, and neither is a blend now
    split = segments.copy()
    split[(segments == 2) & (x >= 5)] = 4
    flags = astro.footprint_flags(split, segments, filtered, valid)
    assert list(flags) == [astro.FLAG_EDGE, astro.FLAG_DEBLENDED, 0, astro.FLAG_DEBLENDED]


def saturated_at(skymap, patch, points, radius_arcsec=3.0):
    ra, dec = skymap.patch_wcs(patch).pixel_to_world_values(*np.array(points, float).T)
    rows = np.zeros(len(points), dtype=astro.SATURATED_DTYPE)
    rows["visit"] = np.arange(len(points))
    rows["ra"], rows["dec"], rows["pixels"] = ra, dec, 20
    rows["radius_arcsec"] = radius_arcsec
    return rows


def test_saturated_stars_are_flagged_or_kept():
    skymap = astro.SkyMap(150.0, 2.0, 1.0, 40, 5, 1, 1)  # inner region: pixels 5..44
    patch = (0, 0)
    valid = np.ones(skymap.patch_shape, dtype=bool)
    for cy, cx in ((10, 10), (30, 30), (3, 25), (25, 47)):  # holes: saturated everywhere
        valid[cy - 1:cy + 2, cx - 1:cx + 2] = False
    rows = np.zeros(3, dtype=astro.CATALOG_DTYPE)
    rows["id"], rows["flux"] = (4, 7, 9), 1.0
    rows["x"], rows["y"] = (10.5, 20.0, 44.0), (11.0, 20.0, 25.0)
    stars = saturated_at(skymap, patch, [
        (10.0, 10.0), (10.3, 10.2),  # one star in two visits; a halo row 1.1 px away
        (30.0, 30.0),  # nothing of it detected: it gets a row of its own
        (20.0, 25.0),  # measured by some visit (no hole): nothing to do
        (25.0, 3.0),  # in the border, no footprint near: the neighbour patch's to add
        (47.0, 25.0)])  # the neighbour's star, its halo (row at x=44) this patch's
    footprints = np.column_stack([rows["x"], rows["y"]])
    got = astro.with_saturated(rows, patch, skymap, stars, valid, footprints)
    assert len(got) == 4
    saturated = astro.FLAG_SATURATED
    assert list(got["flags"][:3]) == [saturated, 0, saturated]
    added = got[3]
    assert added["flags"] == saturated and added["id"] == -1
    assert (added["x"], added["y"]) == pytest.approx((30.0, 30.0)) and added["area"] == 0
    assert np.isnan(added["flux"]) and np.isnan(added["flux_err"])
    ra, dec = skymap.patch_wcs(patch).pixel_to_world_values(30.0, 30.0)
    assert added["ra"] == pytest.approx(ra) and added["dec"] == pytest.approx(dec)
    assert rows["flags"].sum() == 0  # the input rows are not changed in place
    # a footprint this patch does not own, near the star, is its detection: no NaN row
    elsewhere = np.vstack([footprints, [[30.0, 32.0]]])
    assert len(astro.with_saturated(rows, patch, skymap, stars, valid, elsewhere)) == 3
