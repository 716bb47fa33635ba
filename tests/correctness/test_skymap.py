"""The sky map's geometry: which patches a CCD overlaps decides which warps exist, so a
patch missed here is data silently left out of a coadd."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.skymap import SkyMap

pytestmark = pytest.mark.correctness

SKYMAP = SkyMap(154.1066, -4.9325, 0.333, patch_inner=100, patch_border=10,
                patches_x=6, patches_y=5)


def footprint(cx, cy, width, height, angle):
    """Corners (RA, Dec) of a rotated rectangle centred on tract pixel (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    dx = np.array([-1, 1, 1, -1]) * width / 2
    dy = np.array([-1, -1, 1, 1]) * height / 2
    x, y = cx + c * dx - s * dy, cy + s * dx + c * dy
    return np.column_stack(SKYMAP.tract_wcs().pixel_to_world_values(x, y)), (x, y)


def patches_holding_points(x, y):
    """Brute force: the patches (border included) holding any of many points inside."""
    found = set()
    for px, py in zip(x, y):
        for i in range(SKYMAP.patches_x):
            for j in range(SKYMAP.patches_y):
                x0, y0 = SKYMAP.patch_origin((i, j))
                side = SKYMAP.patch_shape[0]
                if x0 - 0.5 <= px <= x0 + side - 0.5 and y0 - 0.5 <= py <= y0 + side - 0.5:
                    found.add((i, j))
    return found


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.floats(-50, 650), st.floats(-50, 550), st.floats(5, 300), st.floats(5, 150),
       st.floats(0, math.pi))
def test_a_ccd_maps_to_exactly_the_patches_it_overlaps(cx, cy, width, height, angle):
    corners, _ = footprint(cx, cy, width, height, angle)
    got = set(SKYMAP.patches_overlapping(corners))
    # Points filling the rectangle (a 41 x 41 grid): every patch one of them lands in must
    # be found, and nothing else may be (up to the grid's spacing, checked on the corners
    # of a slightly larger rectangle).
    u, v = np.meshgrid(np.linspace(-0.5, 0.5, 41), np.linspace(-0.5, 0.5, 41))
    c, s = math.cos(angle), math.sin(angle)
    px = cx + c * u.ravel() * width - s * v.ravel() * height
    py = cy + s * u.ravel() * width + c * v.ravel() * height
    assert patches_holding_points(px, py) <= got
    grown = footprint(cx, cy, width + 2 * width / 40 + 1, height + 2 * height / 40 + 1,
                      angle)[1]
    inside = patches_holding_points(*_filled(grown))
    assert got <= inside


def _filled(corners_xy, n=61):
    """Points filling the quadrilateral with these corners (bilinear)."""
    x, y = corners_xy
    u, v = (a.ravel() for a in np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n)))
    fx = (1 - u) * (1 - v) * x[0] + u * (1 - v) * x[1] + u * v * x[2] + (1 - u) * v * x[3]
    fy = (1 - u) * (1 - v) * y[0] + u * (1 - v) * y[1] + u * v * y[2] + (1 - u) * v * y[3]
    return fx, fy


def test_a_ccd_far_away_overlaps_nothing():
    corners, _ = footprint(5000, 5000, 100, 100, 0.3)
    assert SKYMAP.patches_overlapping(corners) == ()


def test_patch_grids_tile_the_tract():
    """Inner regions tile the tract without gaps or overlaps; the patch WCS is the tract
    WCS shifted to the patch's origin."""
    tract = SKYMAP.tract_wcs()
    for i, j in [(0, 0), (3, 2), (5, 4)]:
        x0, y0 = SKYMAP.patch_origin((i, j))
        assert (x0 + SKYMAP.patch_border, y0 + SKYMAP.patch_border) == \
            (i * SKYMAP.patch_inner, j * SKYMAP.patch_inner)
        ra, dec = SKYMAP.patch_wcs((i, j)).pixel_to_world_values(17.0, 42.0)
        assert np.allclose(tract.world_to_pixel_values(ra, dec), (x0 + 17.0, y0 + 42.0),
                           atol=1e-6)
    inner = SKYMAP.in_inner(np.array([9.4, 9.5, 109.4, 109.5]), np.full(4, 50.0))
    assert inner.tolist() == [False, True, True, False]
