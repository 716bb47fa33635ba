"""The sky map the astronomy pipeline warps onto: one tract cut into overlapping square
patches, as the study's LSST stack defines it. Pure geometry (astropy WCS and NumPy): no
file is read or written here."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

Patch = tuple[int, int]


@dataclass(frozen=True)
class SkyMap:
    """One tract, as in the study: a projection centred on the field, cut into square
    patches of `patch_inner` pixels, each with a `patch_border` overlapping its neighbours.
    A source belongs to the patch whose inner region holds it."""

    center_ra: float
    center_dec: float
    pixel_scale_arcsec: float
    patch_inner: int
    patch_border: int
    patches_x: int
    patches_y: int
    projection: str = "STG"

    def __post_init__(self):
        if self.patch_inner < 1 or self.patch_border < 0 or self.pixel_scale_arcsec <= 0 \
                or self.patches_x < 1 or self.patches_y < 1:
            raise InputError(f"invalid sky map: {self}")

    def tract_wcs(self):
        from astropy.wcs import WCS

        wcs = WCS(naxis=2)
        wcs.wcs.ctype = [f"RA---{self.projection}", f"DEC--{self.projection}"]
        wcs.wcs.crval = [self.center_ra, self.center_dec]
        scale = self.pixel_scale_arcsec / 3600.0
        wcs.wcs.cdelt = [-scale, scale]  # east to the left, as on the sky
        wcs.wcs.crpix = [self.patches_x * self.patch_inner / 2 + 0.5,
                         self.patches_y * self.patch_inner / 2 + 0.5]
        wcs.wcs.radesys = "ICRS"
        return wcs

    @property
    def patch_shape(self) -> tuple[int, int]:
        side = self.patch_inner + 2 * self.patch_border
        return side, side

    def patch_origin(self, patch: Patch) -> tuple[int, int]:
        """Tract pixel (x, y) of the patch grid's first pixel, border included."""
        return (patch[0] * self.patch_inner - self.patch_border,
                patch[1] * self.patch_inner - self.patch_border)

    def patch_wcs(self, patch: Patch):
        wcs = self.tract_wcs()
        x0, y0 = self.patch_origin(patch)
        wcs.wcs.crpix = [wcs.wcs.crpix[0] - x0, wcs.wcs.crpix[1] - y0]
        return wcs

    def in_inner(self, x, y) -> np.ndarray:
        """Whether patch pixel coordinates lie in the patch's inner region."""
        lo, hi = self.patch_border - 0.5, self.patch_border + self.patch_inner - 0.5
        x, y = np.asarray(x), np.asarray(y)
        return (x >= lo) & (x < hi) & (y >= lo) & (y < hi)

    def patches_overlapping(self, corners_radec: np.ndarray) -> tuple[Patch, ...]:
        """Patches (border included) that a CCD's footprint, given by its four corners on
        the sky, overlaps. A CCD is small enough to be a convex quadrilateral here."""
        xy = np.column_stack(self.tract_wcs().world_to_pixel_values(
            corners_radec[:, 0], corners_radec[:, 1]))
        if not np.isfinite(xy).all():
            return ()
        b, n = self.patch_border, self.patch_inner
        first = [max(0, math.floor((xy[:, k].min() - b) / n) - 1) for k in (0, 1)]
        last = [min(count - 1, math.floor((xy[:, k].max() + b) / n) + 1)
                for k, count in ((0, self.patches_x), (1, self.patches_y))]
        found = []
        for i in range(first[0], last[0] + 1):
            for j in range(first[1], last[1] + 1):
                x0, y0 = self.patch_origin((i, j))
                box = (x0 - 0.5, x0 + n + 2 * b - 0.5, y0 - 0.5, y0 + n + 2 * b - 0.5)
                if _convex_overlaps_box(xy, box):
                    found.append((i, j))
        return tuple(found)

    @classmethod
    def covering(cls, corners: list[np.ndarray], pixel_scale_arcsec: float,
                 patch_inner: int, patch_border: int, center=None) -> "SkyMap":
        """The smallest tract centred on `center` (default: the centre of the CCDs'
        footprints) that holds every CCD: for a user's own files."""
        points = np.concatenate(corners)
        if center is None:
            ra, dec = np.radians(points[:, 0]), np.radians(points[:, 1])
            v = np.array([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra),
                          np.sin(dec)]).mean(axis=1)
            center = (float(np.degrees(np.arctan2(v[1], v[0])) % 360.0),
                      float(np.degrees(np.arcsin(v[2] / np.linalg.norm(v)))))
        probe = cls(center[0], center[1], pixel_scale_arcsec, patch_inner, patch_border, 1, 1)
        x, y = probe.tract_wcs().world_to_pixel_values(points[:, 0], points[:, 1])
        cx = cy = patch_inner / 2 - 0.5
        half_x = float(np.abs(x - cx).max()) + 1
        half_y = float(np.abs(y - cy).max()) + 1
        return cls(center[0], center[1], pixel_scale_arcsec, patch_inner, patch_border,
                   max(1, math.ceil(2 * half_x / patch_inner)),
                   max(1, math.ceil(2 * half_y / patch_inner)))


def _convex_overlaps_box(poly: np.ndarray, box) -> bool:
    """Separating-axis test of a convex polygon against an axis-aligned box."""
    xmin, xmax, ymin, ymax = box
    if poly[:, 0].max() < xmin or poly[:, 0].min() > xmax or \
            poly[:, 1].max() < ymin or poly[:, 1].min() > ymax:
        return False
    corners = np.array([[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax]])
    for k in range(len(poly)):
        edge = poly[(k + 1) % len(poly)] - poly[k]
        normal = np.array([-edge[1], edge[0]])
        p, q = poly @ normal, corners @ normal
        if p.max() < q.min() or q.max() < p.min():
            return False
    return True
