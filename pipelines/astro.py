"""The astronomy pipeline of the study (HiTS survey, LSST stack): calibrate each CCD ->
warp onto sky-map patches -> co-add each patch over visits -> detect sources.

The LSST stack the study used is not installable here; the same steps are built on what
astronomers use in Python: photutils (background meshes, segmentation, source catalogs),
astroscrappy (LA Cosmic), reproject (WCS resampling) and astropy (FITS, WCS, sigma
clipping). Every parameter is pinned in `AstroParams`. The partitioning is the study's:
per CCD, per (visit, patch), per patch, per coadd. Kernels read and write FITS files by
path in the run directory; only file paths, small statistics and the final catalog pass
through the client, so a task's memory is bounded by its own CCD or patch.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import fitsio
from .errors import InputError
from .skymap import Patch, SkyMap
from .steps import Plan, RunContext, Shuffle, Step, check_range, run_steps

PIPELINE = "astro"
UNIT = "pixels"  # what the work is counted in (Plan.voxels)

# Pixels a step never uses: masked by the camera, saturated, cosmic rays, no data.
UNUSABLE = ("BAD", "SAT", "CR", "EDGE", "NO_DATA")


@dataclass(frozen=True)
class AstroParams:
    """The pipeline's parameters, pinned (paper-facts.md, steps 1A-4A)."""

    # 1A calibrate: photutils Background2D (SExtractor estimator, 3-sigma clipped boxes,
    # 3x3 median filter of the mesh) and astroscrappy's LA Cosmic with its documented
    # defaults, on the raw counts with the CCD's own gain, read noise, saturation and
    # variance plane.
    background_box: int = 64
    background_filter: int = 3
    background_clip_sigma: float = 3.0
    # A box counts when half its pixels are usable (photutils' default asks for 90%, which
    # no 64-pixel box of M13's crowded real image passes).
    background_exclude_percentile: float = 50.0
    # Saturated stars' masks grow by this many pixels, as LSST's ISR grows its SAT plane:
    # LA Cosmic deliberately leaves a saturated star's surroundings alone (its dilated
    # saturated-star mask), so cosmic rays there go unflagged. On survey-small every such
    # cosmic-ray pixel lay within 6.4 pixels of a saturated one; 8 masks 0.16% of pixels.
    saturation_grow: int = 8
    cr_sigclip: float = 4.5
    cr_sigfrac: float = 0.3
    cr_objlim: float = 5.0
    cr_niter: int = 4
    # 2A warp: bilinear resampling with reproject; a bad pixel turns every output pixel
    # its interpolation touches into NaN, so masks grow by the kernel, as in LSST's warper.
    # roundtrip_coords=False: the TAN->STG transform is invertible over a field; measured
    # 1.8x faster and identical on the survey.
    warp_order: str = "bilinear"
    # 3A coadd: per-pixel iterative clipping about the median (3 sigma, 2 iterations),
    # then the mean weighted per visit by 1 / (3-sigma clipped mean of the warp's variance).
    clip_sigma: float = 3.0
    clip_iterations: int = 2
    weight_clip_sigma: float = 3.0
    # Off, as in the study: the coadd's variance plane scaled to the noise measured in
    # the coadd itself (the 3-sigma clipped variance of image / sqrt(variance) over its
    # pixels), as LSST's coadds do. Resampling correlates pixel noise, so the propagated
    # variance overstates what the pixels scatter by.
    coadd_rescale_variance: bool = False
    # 4A detect: background mesh on the coadd, a PSF-matched Gaussian filter (FWHM in sky
    # pixels, ~1.1 arcsec at 0.333"/px, the survey's typical seeing), 5 sigma of the
    # filtered noise, 8-connected footprints of at least 5 pixels.
    detect_background_box: int = 64
    detect_kernel_fwhm: float = 3.3
    detect_threshold: float = 5.0
    detect_min_pixels: int = 5
    # Deblending (off, as in the study): photutils' deblend_sources on the filtered image,
    # its own defaults (32 exponentially spaced levels, 0.001 of the footprint's flux for
    # a branch to count): crowded fields (M13's core) need it.
    deblend: bool = False
    deblend_levels: int = 32
    deblend_contrast: float = 0.001

    def __post_init__(self):  # values the libraries would refuse, or misread, refused here
        positive = (lambda v: v > 0, "positive")
        check_range(self, background_box=positive,
                    background_filter=(lambda v: v >= 1 and v % 2 == 1, "odd and >= 1"),
                    background_clip_sigma=positive,
                    background_exclude_percentile=(lambda v: 0 <= v <= 100, "0 to 100"),
                    saturation_grow=(lambda v: v >= 0, ">= 0"), cr_sigclip=positive,
                    cr_sigfrac=positive, cr_objlim=positive, cr_niter=positive,
                    warp_order=(lambda v: v in WARP_ORDERS, " or ".join(WARP_ORDERS)),
                    clip_sigma=positive, clip_iterations=(lambda v: v >= 0, ">= 0"),
                    weight_clip_sigma=positive, detect_background_box=positive,
                    detect_kernel_fwhm=positive, detect_threshold=positive,
                    detect_min_pixels=positive, deblend_levels=positive,
                    deblend_contrast=(lambda v: 0 <= v <= 1, "0 to 1"))


WARP_ORDERS = ("nearest-neighbor", "bilinear", "biquadratic", "bicubic")  # reproject's


@dataclass(frozen=True)
class AstroPartitioning:
    """The study's units are fixed (CCD, (visit, patch), patch); what can vary is how
    many rows of a patch a coadd task holds at once, for every visit: its memory."""

    coadd_strip_rows: int = 256

    def __post_init__(self):
        if self.coadd_strip_rows < 1:
            raise ValueError(f"coadd_strip_rows must be positive: {self}")


# -- loading and validation ----------------------------------------------------------------

@dataclass(frozen=True)
class CcdInput:
    path: str
    visit: int
    ccd: int
    shape: tuple[int, int]  # (rows, cols)
    corners: np.ndarray  # (4, 2) RA, Dec of the pixel-grid corners, degrees
    patches: tuple[Patch, ...] = ()
    pixel_scale: float = 0.0  # arcsec, the square root of a pixel's area at the reference

    @property
    def key(self) -> tuple[int, int]:
        return self.visit, self.ccd


FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fits.gz")


def ccd_files(source) -> list[Path]:
    """The FITS files of a directory (any depth, sorted), or the given list of files."""
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise InputError(f"{source}: no such file or directory")
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*")
                       if p.name.lower().endswith(FITS_SUFFIXES) and p.is_file())
        if not files:
            raise InputError(f"{source}: no FITS files ({', '.join(FITS_SUFFIXES)})")
        return files
    if isinstance(source, (str, Path)):
        return [Path(source)]
    return [Path(p) for p in source]


def celestial_wcs(header, path):
    """The header's celestial WCS; InputError saying why there is none."""
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except Exception as exc:  # astropy.wcs raises a zoo of types for bad keywords
            raise InputError(f"{path}: invalid WCS ({str(exc).splitlines()[0]})") from None
    if not wcs.has_celestial:
        ctypes = ", ".join(repr(t) for t in wcs.wcs.ctype) or "none"
        raise InputError(f"{path}: no celestial WCS (axis types: {ctypes}); the pipeline "
                         f"places images on the sky")
    return wcs.celestial


def read_ccd_header(path: Path) -> CcdInput:
    """Check one CCD's file from its headers alone; raise InputError saying what is wrong."""
    with fitsio.open_fits(path) as hdul:
        names = {h.name for h in hdul}
        missing = [p for p in fitsio.PLANES if p not in names]
        if missing:
            raise InputError(f"{path}: no {'/'.join(missing)} extension (a CCD file has "
                             f"IMAGE, MASK and VARIANCE planes; a plain image has none)")
        shapes = {p: hdul[p].shape for p in fitsio.PLANES}
        if len(set(shapes.values())) != 1 or len(shapes["IMAGE"]) != 2:
            found = ", ".join(f"{p} {'x'.join(map(str, s))}" for p, s in shapes.items())
            raise InputError(f"{path}: planes of different shapes ({found})")
        header = hdul["IMAGE"].header
        primary = hdul[0].header
        wcs = celestial_wcs(header, path)
        visit = primary.get("VISIT", primary.get("EXPNUM", header.get("VISIT")))
        ccd = primary.get("CCDNUM", header.get("CCDNUM"))
        if visit is None or ccd is None:
            raise InputError(f"{path}: no VISIT (or EXPNUM) and CCDNUM keywords")
        rows, cols = shapes["IMAGE"]
    px = np.array([-0.5, cols - 0.5, cols - 0.5, -0.5])
    py = np.array([-0.5, -0.5, rows - 0.5, rows - 0.5])
    ra, dec = wcs.pixel_to_world_values(px, py)
    corners = np.column_stack([ra, dec])
    if not np.isfinite(corners).all():
        raise InputError(f"{path}: its WCS does not map the CCD's corners onto the sky")
    return CcdInput(str(Path(path).resolve()), int(visit), int(ccd), (rows, cols), corners,
                    pixel_scale=math.sqrt(_pixel_area(wcs.celestial)) * 3600.0)


def load_survey(source, skymap: SkyMap | None = None, *, ingest_dir=None,
                pixel_scale_arcsec: float | None = None, patch_inner: int = 2000,
                patch_border: int = 100) -> dict[str, Any]:
    """Check a survey's CCD files (headers only) and return the pipeline's initial state.

    Plain images (no IMAGE/MASK/VARIANCE planes) are first made into CCD files in
    `ingest_dir` (pipelines/plain_images.py; what was made of each is state['ingested']).
    A CCD that cannot be used (corrupt file, no WCS, planes of different shapes, no
    overlap with the sky map, a duplicate (visit, ccd)) is skipped, with the reason kept
    in state['skipped']; if none is usable, InputError. Without a sky map, one is fitted
    around the CCDs with the given pixel scale (default: the CCDs' own, their median) and
    patch sizes."""
    from . import plain_images

    found, skipped, plain = [], [], []
    files = list(dict.fromkeys(Path(p).resolve() for p in ccd_files(source)))  # each once
    label = str(source) if isinstance(source, (str, Path)) or not files else \
        str(files[0]) + (f" and {len(files) - 1} more" if len(files) > 1 else "")
    for path in files:
        try:
            if plain_images.is_plain(path):
                plain.append(path)
            else:
                found.append(read_ccd_header(path))
        except InputError as exc:
            skipped.append((str(path), str(exc)))
    ingested = []
    if plain and ingest_dir is None:
        raise InputError(f"{plain[0]}: a plain image; it is made into a CCD file in the "
                         f"run's directory, and none was given")
    if plain:
        # visits made up for plain images come after the CCD files' own
        ingested, refused = plain_images.ingest(
            plain, ingest_dir, first_visit=max((c.visit for c in found), default=0) + 1)
        skipped += refused
        for made in ingested:
            try:
                found.append(read_ccd_header(Path(ingest_dir) / made.ccd_file))
            except InputError as exc:
                skipped.append((made.source, str(exc)))
    seen: dict[tuple[int, int], str] = {}
    unique = []
    for ccd in found:
        if ccd.key in seen:
            reason = f"{ccd.path}: visit {ccd.visit} CCD {ccd.ccd} is already {seen[ccd.key]}"
            skipped.append((ccd.path, reason))
        else:
            seen[ccd.key] = ccd.path
            unique.append(ccd)
    if not unique:
        raise InputError(f"{label}: no usable CCD" + (f"; first problem: {skipped[0][1]}"
                                                       if skipped else ""))
    if skymap is None:
        if pixel_scale_arcsec is None:
            pixel_scale_arcsec = round(float(np.median([c.pixel_scale for c in unique])), 3)
        skymap = SkyMap.covering([c.corners for c in unique], pixel_scale_arcsec,
                                 patch_inner, patch_border)
    ccds = []
    for ccd in unique:
        patches = skymap.patches_overlapping(ccd.corners)
        if patches:
            ccds.append(dataclasses.replace(ccd, patches=patches))
        else:
            skipped.append((ccd.path, f"{ccd.path}: overlaps no patch of the sky map"))
    if not ccds:
        raise InputError(f"{label}: no CCD overlaps the sky map; first problem: "
                         f"{skipped[0][1]}")
    ccds.sort(key=lambda c: c.key)
    return {"ccds": tuple(ccds), "skymap": skymap, "skipped": tuple(skipped),
            "ingested": tuple(ingested)}


def planned_output_bytes(state) -> int:
    """What a run writes: calexps (float32 image and variance, int32 mask per pixel),
    a warp per (visit, patch) and a coadd per patch (image, variance, count)."""
    pixels = state["skymap"].patch_shape[0] * state["skymap"].patch_shape[1]
    calexps = sum(c.shape[0] * c.shape[1] * 12 for c in state["ccds"])
    warps = len({(c.visit, p) for c in state["ccds"] for p in c.patches}) * pixels * 8
    coadds = len({p for c in state["ccds"] for p in c.patches}) * pixels * 10
    return calexps + warps + coadds


def _file_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


# -- 1A calibrate: per CCD -----------------------------------------------------------------

def calibrate_kernel(ccd: CcdInput, workdir: str, params: AstroParams):
    """Background mesh subtracted, cosmic rays found (LA Cosmic) and flagged CR, image and
    variance put on the survey's common flux scale. Returns (key, path or None, facts)."""
    import astroscrappy
    from astropy.stats import SigmaClip
    from photutils.background import Background2D
    from scipy.ndimage import distance_transform_edt

    with fitsio.open_fits(ccd.path) as hdul:
        primary = hdul[0].header.copy()
        image_header = hdul["IMAGE"].header.copy()
        bits = fitsio.with_default_planes(fitsio.mask_bits(hdul["MASK"].header))
        image = fitsio.read_plane(hdul, "IMAGE", path=ccd.path).astype(np.float32)
        mask = fitsio.read_plane(hdul, "MASK", path=ccd.path).astype(np.int32)
        variance = fitsio.read_plane(hdul, "VARIANCE", path=ccd.path).astype(np.float32)
    no_data = ~np.isfinite(image) | ~np.isfinite(variance) | (variance < 0)
    mask[no_data] |= 1 << bits["NO_DATA"]
    saturated = (mask & (1 << bits["SAT"])) != 0
    stars = saturated_stars(saturated, image_header, ccd, params.saturation_grow)
    if saturated.any() and params.saturation_grow > 0:
        near = distance_transform_edt(~saturated) <= params.saturation_grow
        mask[near] |= 1 << bits["SAT"]
    unusable = (mask & fitsio.bits_value(bits, UNUSABLE)) != 0
    if unusable.all():
        return ccd.key, None, {"reason": f"{ccd.path}: every pixel is masked"}
    # Masked pixels get a neutral value so that no filter sees a NaN or a garbage column.
    fill = float(np.median(image[~unusable]))
    image[unusable] = fill
    variance[unusable] = float(np.median(variance[~unusable]))

    gain = float(primary.get("GAIN", 1.0))
    # No inmask: told to ignore masked pixels, LA Cosmic missed cosmic rays that touch the
    # edge frame or a bad column, and left tracks partly flagged (measured on survey-small:
    # 2 of 704 tracks missed and 20 partial; none without). The masked pixels hold the
    # median by now, so they pass for quiet sky.
    crmask, _ = astroscrappy.detect_cosmics(
        image, invar=variance, sigclip=params.cr_sigclip,
        sigfrac=params.cr_sigfrac, objlim=params.cr_objlim, gain=gain,
        readnoise=float(primary.get("RDNOISE", 0.0)),
        satlevel=float(primary.get("SATURATE", np.inf)), niter=params.cr_niter,
        sepmed=True, cleantype="meanmask", fsmode="median")
    crmask &= ~unusable
    mask[crmask] |= 1 << bits["CR"]
    try:
        background = Background2D(
            image, params.background_box, mask=unusable | crmask,
            filter_size=params.background_filter,
            exclude_percentile=params.background_exclude_percentile,
            sigma_clip=SigmaClip(sigma=params.background_clip_sigma)).background
    except ValueError as exc:  # photutils: too few unmasked pixels in every box
        return ccd.key, None, {"reason": f"{ccd.path}: no background estimate "
                                         f"({str(exc).splitlines()[0]})"}
    image -= background.astype(np.float32)
    scale = np.float32(primary.get("FLUXSCAL", 1.0))
    image *= scale
    variance *= scale * scale
    path = Path(workdir) / "calexp" / f"v{ccd.visit:04d}_c{ccd.ccd:03d}.fits"
    fitsio.write_planes(path, primary, {
        "IMAGE": (image, image_header),
        "MASK": (mask, fitsio.mask_header(bits)),
        "VARIANCE": (variance, None)})
    return ccd.key, str(path), {"cosmic_ray_pixels": int(crmask.sum()),
                                "background_median": float(np.median(background)),
                                "saturated": stars}


SATURATED_DTYPE = np.dtype([
    ("visit", "i4"), ("ccd", "i4"),
    ("ra", "f8"), ("dec", "f8"),  # centre of the saturated pixels, degrees
    ("pixels", "i4"),  # saturated pixels (the camera's SAT plane, before growing)
    ("radius_arcsec", "f8"),  # of the hole the grown mask leaves, plus the warp's reach
])


def saturated_stars(saturated: np.ndarray, image_header, ccd: CcdInput,
                    grow: int) -> np.ndarray:
    """The saturated stars of one CCD: each 8-connected group of its SAT pixels as the
    camera marked them. Every usable pixel of them (and `grow` around) is masked, so a
    star saturated in every visit leaves a hole in the coadd; detect puts it back in the
    catalog, flagged, from this list (small: it travels through the client)."""
    return saturated_rows(*saturated_groups(saturated), image_header, ccd, grow)


def saturated_groups(saturated: np.ndarray):
    """(x, y, pixels) of each 8-connected group of a plane's True pixels, in scipy's
    label order (the raster position of each group's first pixel). The centre is the
    group's coordinate sums over its count: sums of whole numbers, exact in any order,
    so an engine's own labelling gives the same bits."""
    from scipy.ndimage import label

    if not saturated.any():
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    labels, n = label(saturated, structure=np.ones((3, 3), dtype=bool))
    ys, xs = np.indices(saturated.shape)
    pixels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    sum_x = np.bincount(labels.ravel(), weights=xs.ravel(), minlength=n + 1)[1:]
    sum_y = np.bincount(labels.ravel(), weights=ys.ravel(), minlength=n + 1)[1:]
    return sum_x / pixels, sum_y / pixels, pixels


def saturated_rows(xs, ys, pixels, image_header, ccd: CcdInput, grow: int) -> np.ndarray:
    """The groups as SATURATED_DTYPE rows: centres on the sky (a few rows: metadata)."""
    rows = np.zeros(len(pixels), dtype=SATURATED_DTYPE)
    if not len(pixels):
        return rows
    wcs = _celestial_wcs(image_header)
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    scale = math.sqrt(_pixel_area(wcs)) * 3600.0
    rows["visit"], rows["ccd"] = ccd.key
    rows["ra"], rows["dec"], rows["pixels"] = ra, dec, pixels
    # the core's radius, the grown mask, and bilinear warping's one pixel
    rows["radius_arcsec"] = (np.sqrt(pixels / math.pi) + grow + 1.0) * scale
    return rows


def plan_calibrate(state, ctx: RunContext) -> Plan:
    ccds = state["ccds"]

    def combine(results):
        calexps, skipped, facts = {}, list(state["skipped"]), {}
        source = {c.key: c.path for c in ccds}
        for key, path, info in results:
            if path is None:
                skipped.append((source[key], info["reason"]))
            else:
                calexps[key] = path
                facts[key] = info
        if not calexps:
            raise InputError(f"no CCD could be calibrated; first problem: {skipped[-1][1]}")
        stars = [facts[key].pop("saturated") for key in sorted(facts)]
        return {"calexps": calexps, "calibration": facts, "skipped": tuple(skipped),
                "saturated": np.concatenate(stars)}

    return Plan(list(ccds), {"workdir": str(ctx.workdir), "params": ctx.params}, combine,
                bytes_in=_file_bytes(c.path for c in ccds),
                voxels=sum(c.shape[0] * c.shape[1] for c in ccds))


# -- 2A warp: per (visit, patch) -----------------------------------------------------------

def warp_kernel(part, skymap: SkyMap, workdir: str, params: AstroParams):
    """Every CCD of one visit that overlaps the patch, resampled onto the patch grid; their
    usable pixels make the visit's warp of the patch (NaN where the visit has no data)."""
    from reproject import reproject_interp

    visit, patch, calexps = part
    height, width = skymap.patch_shape
    patch_wcs = skymap.patch_wcs(patch)
    warp = np.full((2, height, width), np.nan, dtype=np.float32)
    for path in calexps:
        with fitsio.open_fits(path) as hdul:
            wcs = _celestial_wcs(hdul["IMAGE"].header)
            rows, cols = hdul["IMAGE"].shape
            # Patch pixels this CCD can reach, and the CCD pixels those need (+2 margin
            # for the interpolation stencil): a task reads a cut-out, not the CCD.
            out = _footprint_box(wcs, (rows, cols), patch_wcs, (height, width), margin=2)
            if out is None:
                continue
            src = _footprint_box(patch_wcs.slice(out), (out[0].stop - out[0].start,
                                                        out[1].stop - out[1].start),
                                 wcs, (rows, cols), margin=3)
            if src is None:
                continue
            image = fitsio.read_plane(hdul, "IMAGE", *src, path=path).astype(np.float32)
            variance = fitsio.read_plane(hdul, "VARIANCE", *src, path=path).astype(np.float32)
            mask = fitsio.read_plane(hdul, "MASK", *src, path=path)
            unusable = (mask & fitsio.bits_value(fitsio.mask_bits(hdul["MASK"].header),
                                                 UNUSABLE)) != 0
        planes = np.stack([image, variance])
        planes[:, unusable] = np.nan
        # Interpolation keeps surface brightness; a flux per pixel must also scale with
        # the pixels' areas (0.333" sky pixels hold 1.6x the flux of 0.263" CCD pixels).
        area = _pixel_area(patch_wcs) / _pixel_area(wcs)
        planes[0] *= area
        planes[1] *= area * area
        shape = (2, out[0].stop - out[0].start, out[1].stop - out[1].start)
        resampled = reproject_interp((planes, wcs.slice(src)), patch_wcs.slice(out),
                                     shape_out=shape, order=params.warp_order,
                                     roundtrip_coords=False, return_footprint=False)
        target = warp[(slice(None),) + out]
        take = np.isnan(target[0]) & np.isfinite(resampled).all(axis=0)
        target[:, take] = resampled[:, take]
    good = int(np.isfinite(warp[0]).sum())
    if good == 0:
        return visit, patch, None
    header = patch_wcs.to_header()
    header["VISIT"] = visit
    path = Path(workdir) / "warp" / f"v{visit:04d}_p{patch[0]}_{patch[1]}.fits"
    fitsio.write_planes(path, None, {"IMAGE": (warp[0], header),
                                     "VARIANCE": (warp[1], None)})
    return visit, patch, str(path)


def _pixel_area(wcs) -> float:
    from astropy.wcs.utils import proj_plane_pixel_area

    return float(proj_plane_pixel_area(wcs))


def _celestial_wcs(header):
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header).celestial


def _footprint_box(wcs_from, shape_from, wcs_to, shape_to, margin: int):
    """Bounding box (row slice, col slice) in the `to` grid of the `from` grid's pixels,
    widened by `margin` and clipped to the `to` grid; None when they do not meet."""
    rows, cols = shape_from
    # Points along the four edges: a projection bends straight pixel rows slightly.
    t = np.linspace(0.0, 1.0, 9)
    along_x, along_y = -0.5 + t * cols, -0.5 + t * rows
    xs = np.concatenate([along_x, np.full(9, cols - 0.5), along_x, np.full(9, -0.5)])
    ys = np.concatenate([np.full(9, -0.5), along_y, np.full(9, rows - 0.5), along_y])
    ra, dec = wcs_from.pixel_to_world_values(xs, ys)
    x, y = wcs_to.world_to_pixel_values(ra, dec)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    x0 = max(0, math.floor(x.min()) - margin)
    x1 = min(shape_to[1], math.ceil(x.max()) + margin + 1)
    y0 = max(0, math.floor(y.min()) - margin)
    y1 = min(shape_to[0], math.ceil(y.max()) + margin + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _warp_emit(record):
    visit, patches, calexp = record
    return [((visit, patch), calexp) for patch in patches]


def _warp_partition(key, calexps):
    visit, patch = key
    return visit, patch, tuple(calexps)


def plan_warp(state, ctx: RunContext) -> Plan:
    # The study's flatMap CCD -> (visit, patch) and group by (visit, patch); CCDs skipped
    # at calibration have no calexp and take no part.
    records = [(ccd.visit, ccd.patches, state["calexps"][ccd.key]) for ccd in state["ccds"]
               if ccd.key in state["calexps"]]
    shuffle = Shuffle(records, _warp_emit, _warp_partition)
    parts = shuffle.groups()

    def combine(results):
        return {"warps": {(visit, patch): path for visit, patch, path in results if path}}

    skymap = state["skymap"]
    return Plan(parts, {"skymap": skymap, "workdir": str(ctx.workdir), "params": ctx.params},
                combine, bytes_in=_file_bytes(state["calexps"].values()),
                voxels=len(parts) * skymap.patch_shape[0] * skymap.patch_shape[1],
                shuffle=shuffle)


# -- 3A coadd: per patch -------------------------------------------------------------------

def visit_weight(variance: np.ndarray, params: AstroParams) -> float:
    """A visit's weight in its patch's coadd: 1 / the clipped mean of its warp's variance
    (shared with an engine that clips outside the kernel)."""
    from astropy.stats import sigma_clipped_stats

    mean, _, _ = sigma_clipped_stats(variance[np.isfinite(variance)],
                                     sigma=params.weight_clip_sigma)
    return 1.0 / mean


def kept_values(image: np.ndarray, variance: np.ndarray, params: AstroParams) -> np.ndarray:
    """Which (visit, pixel) values of stacked float64 warps the coadd keeps: usable ones
    within `clip_sigma` of the median over visits, iterated (per pixel, so any row
    grouping gives the same answer)."""
    from astropy.stats import sigma_clip

    usable = np.isfinite(image) & np.isfinite(variance)
    clipped = sigma_clip(np.ma.masked_array(image, ~usable), sigma=params.clip_sigma,
                         maxiters=params.clip_iterations, cenfunc="median",
                         stdfunc="std", axis=0, masked=True, copy=True)
    return ~np.ma.getmaskarray(clipped)


def coadd_kernel(part, skymap: SkyMap, workdir: str, params: AstroParams, strip_rows: int):
    """Per-pixel sigma-clipped, visit-weighted mean of a patch's warps, with its variance
    and the number of visits that went into each pixel. Holds `strip_rows` rows of every
    visit at a time."""
    patch, warps = part
    height, width = skymap.patch_shape
    hduls = [fitsio.open_fits(path) for _, path in warps]
    try:
        weights = [visit_weight(fitsio.read_plane(hdul, "VARIANCE", path=path), params)
                   for (_, path), hdul in zip(warps, hduls)]
        weight = np.array(weights, dtype=np.float64)[:, None, None]
        coadd = np.full((height, width), np.nan, dtype=np.float32)
        coadd_var = np.full((height, width), np.nan, dtype=np.float32)
        count = np.zeros((height, width), dtype=np.int16)
        for r0 in range(0, height, strip_rows):
            rows = slice(r0, min(height, r0 + strip_rows))
            image = np.stack([fitsio.read_plane(h, "IMAGE", rows, path=p)
                              for (_, p), h in zip(warps, hduls)]).astype(np.float64)
            variance = np.stack([fitsio.read_plane(h, "VARIANCE", rows, path=p)
                                 for (_, p), h in zip(warps, hduls)]).astype(np.float64)
            keep = kept_values(image, variance, params)
            w = np.where(keep, weight, 0.0)
            total = w.sum(axis=0)
            n = keep.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = (np.where(keep, image, 0.0) * w).sum(axis=0) / total
                var = (np.where(keep, variance, 0.0) * w * w).sum(axis=0) / (total * total)
            coadd[rows] = np.where(n > 0, mean, np.nan)
            coadd_var[rows] = np.where(n > 0, var, np.nan)
            count[rows] = n
    finally:
        for hdul in hduls:
            hdul.close()
    return patch, write_coadd(patch, [v for v, _ in warps], weights, coadd, coadd_var,
                              count, skymap, workdir, params)


def write_coadd(patch: Patch, visits, weights, coadd: np.ndarray, coadd_var: np.ndarray,
                count: np.ndarray, skymap: SkyMap, workdir: str, params: AstroParams) -> str:
    """A patch's coadd file (its planes, the visits and weights in its header, the
    optional variance rescale); returns its path (shared with an engine's own coadd)."""
    header = skymap.patch_wcs(patch).to_header()
    header["NVISITS"] = len(visits)
    for n, (visit, w) in enumerate(zip(visits, weights)):
        header[f"VISIT{n}"] = (visit, f"visit of warp {n}")
        header[f"WEIGHT{n}"] = (w, f"weight of visit {visit}: 1/clipped mean variance")
    if params.coadd_rescale_variance:
        factor = variance_scale(coadd, coadd_var)
        coadd_var *= np.float32(factor)
        header["VARSCALE"] = (factor, "variance scaled by this: the measured noise")
    path = Path(workdir) / "coadd" / f"p{patch[0]}_{patch[1]}.fits"
    fitsio.write_planes(path, None, {"IMAGE": (coadd, header), "VARIANCE": (coadd_var, None),
                                     "EXPCOUNT": (count, None)})
    return str(path)


def variance_scale(image: np.ndarray, variance: np.ndarray, sigma: float = 3.0) -> float:
    """What the variance plane must be multiplied by to describe the image's scatter: the
    sigma-clipped variance of image / sqrt(variance) (sources are clipped away); 1 where
    too few pixels are measured to say (a patch at the survey's edge)."""
    from astropy.stats import sigma_clipped_stats

    usable = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if usable.sum() < 100:
        return 1.0
    z = image[usable].astype(np.float64) / np.sqrt(variance[usable].astype(np.float64))
    _, _, std = sigma_clipped_stats(z, sigma=sigma)
    return float(std) ** 2 if np.isfinite(std) and std > 0 else 1.0


def _coadd_emit(record):
    (visit, patch), warp = record
    return [(patch, (visit, warp))]


def _coadd_partition(patch, visit_warps):
    return patch, tuple(visit_warps)


def plan_coadd(state, ctx: RunContext) -> Plan:
    # Group the warps by patch, each patch's in visit order.
    shuffle = Shuffle(sorted(state["warps"].items()), _coadd_emit, _coadd_partition)
    parts = shuffle.groups()
    skymap = state["skymap"]

    def combine(results):
        return {"coadds": dict(results)}

    shared = {"skymap": skymap, "workdir": str(ctx.workdir), "params": ctx.params,
              "strip_rows": ctx.partitioning.coadd_strip_rows}
    return Plan(parts, shared, combine, bytes_in=_file_bytes(state["warps"].values()),
                voxels=len(state["warps"]) * skymap.patch_shape[0] * skymap.patch_shape[1],
                shuffle=shuffle)


# -- 4A detect: per coadd ------------------------------------------------------------------

CATALOG_DTYPE = np.dtype([
    ("patch_x", "i4"), ("patch_y", "i4"), ("id", "i4"),
    ("x", "f8"), ("y", "f8"),  # centroid, patch pixels (0-based)
    ("ra", "f8"), ("dec", "f8"),  # degrees, ICRS
    ("flux", "f8"), ("flux_err", "f8"),  # footprint sum of the background-subtracted coadd
    ("area", "i4"),  # footprint pixels
    ("flags", "i4"),  # FLAGS bits
])

# Per-source flags a user filters on (catalog column `flags`), bit -> meaning.
FLAG_EDGE, FLAG_BLENDED, FLAG_DEBLENDED, FLAG_SATURATED = 1, 2, 4, 8
FLAGS = {FLAG_EDGE: "footprint touches pixels with no data (masked in every visit, or "
                    "beyond the survey): flux and centroid may be cut",
         FLAG_BLENDED: "footprint holds more than one peak of the filtered image: "
                       "possibly several sources measured as one",
         FLAG_DEBLENDED: "cut by the deblender from a larger footprint",
         FLAG_SATURATED: "a star saturated in every visit that covers it: its core is "
                         "masked, so its flux is a lower bound (its halo), or NaN where "
                         "nothing of it was detected (then the row is the saturated "
                         "pixels' centre, area 0, id < 0)"}


def footprint_flags(segments: np.ndarray, parents: np.ndarray, filtered: np.ndarray,
                    valid: np.ndarray) -> np.ndarray:
    """FLAGS per segment label 1..n of `segments` (after deblending; `parents`, the
    segmentation before it): no-data pixels in a footprint's 8-neighbourhood, peaks of
    the filtered image (a pixel no 3x3 neighbour exceeds), children of one parent."""
    from scipy.ndimage import binary_dilation, maximum_filter

    n = int(segments.max())
    flags = np.zeros(n, dtype=np.int32)
    if n == 0:
        return flags
    near_gap = binary_dilation(~valid, structure=np.ones((3, 3), dtype=bool))
    flags[np.bincount(segments[near_gap], minlength=n + 1)[1:] > 0] |= FLAG_EDGE
    peak = (segments > 0) & (filtered == maximum_filter(filtered, size=3, mode="constant",
                                                        cval=0.0))
    flags[np.bincount(segments[peak], minlength=n + 1)[1:] > 1] |= FLAG_BLENDED
    parent = np.zeros(n + 1, dtype=np.int64)
    parent[segments.ravel()] = parents.ravel()  # a child lies inside one parent
    children = np.bincount(parent[1:], minlength=int(parents.max()) + 1)
    flags[children[parent[1:]] > 1] |= FLAG_DEBLENDED
    return flags


def detect_kernel(part, skymap: SkyMap, params: AstroParams, saturated: np.ndarray):
    """Sources of one coadd: background mesh subtracted, PSF-matched filter, footprints
    above `detect_threshold` sigma of the filtered noise, one catalog row per footprint
    whose centroid lies in the patch's inner region."""
    from astropy.stats import SigmaClip, sigma_clipped_stats
    from photutils.background import Background2D
    from photutils.segmentation import SourceCatalog, detect_sources
    from photutils.utils.exceptions import NoDetectionsWarning
    from scipy.ndimage import correlate1d

    patch, path = part
    with fitsio.open_fits(path) as hdul:
        image = fitsio.read_plane(hdul, "IMAGE", path=path).astype(np.float64)
        variance = fitsio.read_plane(hdul, "VARIANCE", path=path).astype(np.float64)
    valid = np.isfinite(image) & np.isfinite(variance)
    empty = np.zeros(0, dtype=CATALOG_DTYPE)
    nothing = np.zeros((0, 2))
    if valid.sum() < params.detect_min_pixels:
        return patch, with_saturated(empty, patch, skymap, saturated, valid, nothing)
    try:
        background = Background2D(np.where(valid, image, 0.0), params.detect_background_box,
                                  mask=~valid, coverage_mask=~valid, fill_value=0.0,
                                  exclude_percentile=params.background_exclude_percentile,
                                  sigma_clip=SigmaClip(sigma=params.background_clip_sigma)
                                  ).background
    except ValueError:  # a patch at the survey's edge with no fully covered box
        background = np.full(image.shape, sigma_clipped_stats(image[valid])[1])
    data = np.where(valid, image - background, 0.0)
    var = np.where(valid, variance, 0.0)
    # Matched filter: the image correlated with the PSF, its variance with the PSF squared,
    # both separable Gaussians; significance = filtered / sqrt(filtered variance).
    sigma = params.detect_kernel_fwhm / (2 * math.sqrt(2 * math.log(2)))
    r = math.ceil(4 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    filtered = correlate1d(correlate1d(data, k, 0, mode="constant"), k, 1, mode="constant")
    filtered_var = correlate1d(correlate1d(var, k * k, 0, mode="constant"), k * k, 1,
                               mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        significance = np.where(valid & (filtered_var > 0),
                                filtered / np.sqrt(filtered_var), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)  # an empty patch is an answer
        segments = detect_sources(significance, params.detect_threshold,
                                  n_pixels=params.detect_min_pixels, connectivity=8,
                                  mask=~valid)
    if segments is None:
        return patch, with_saturated(empty, patch, skymap, saturated, valid, nothing)
    parents = segments.data
    if params.deblend:
        segments = deblend(filtered, segments, params.detect_min_pixels,
                           params.deblend_levels, params.deblend_contrast)
    flags = footprint_flags(segments.data, parents, filtered, valid)
    catalog = SourceCatalog(data, segments, convolved_data=filtered, error=np.sqrt(var),
                            mask=~valid)
    x = np.asarray(catalog.x_centroid, dtype=np.float64)
    y = np.asarray(catalog.y_centroid, dtype=np.float64)
    own = skymap.in_inner(x, y) & np.isfinite(x) & np.isfinite(y)
    ra, dec = skymap.patch_wcs(patch).pixel_to_world_values(x[own], y[own])
    rows = np.zeros(int(own.sum()), dtype=CATALOG_DTYPE)
    rows["patch_x"], rows["patch_y"] = patch
    rows["id"] = np.asarray(catalog.labels)[own]
    rows["x"], rows["y"], rows["ra"], rows["dec"] = x[own], y[own], ra, dec
    rows["flux"] = np.asarray(catalog.segment_flux)[own]
    rows["flux_err"] = np.asarray(catalog.segment_flux_err)[own]
    rows["area"] = np.asarray(catalog.area.value)[own]
    rows["flags"] = flags[np.asarray(catalog.labels) - 1][own]
    found = np.isfinite(x) & np.isfinite(y)
    return patch, with_saturated(rows, patch, skymap, saturated, valid,
                                 np.column_stack([x[found], y[found]]))


def with_saturated(rows: np.ndarray, patch: Patch, skymap: SkyMap, saturated: np.ndarray,
                   valid: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    """The patch's catalog rows with the saturated stars kept. A star is the CCDs'
    saturated groups merged across visits (centres within half their masked hole's
    radius); one whose centre lies in a hole of the coadd (saturated in every visit)
    flags FLAG_SATURATED the rows within its hole's radius, wherever in the patch grid
    it lies (its halo may be this patch's while its centre is a neighbour's); and the
    patch that owns its centre gives it a row of its own there (flux NaN, id < 0) when no
    footprint at all (`footprints`: every centroid, owned or not) lies within that
    radius. Plain numpy on the catalog rows: every engine's detect calls it."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    if len(saturated) == 0:
        return rows
    wcs = skymap.patch_wcs(patch)
    x, y = wcs.world_to_pixel_values(saturated["ra"], saturated["dec"])
    near = np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (y > -0.5) & \
        (x < valid.shape[1] - 0.5) & (y < valid.shape[0] - 0.5)
    if not near.any():
        return rows
    x, y, stars = x[near], y[near], saturated[near]
    radius = stars["radius_arcsec"] / skymap.pixel_scale_arcsec
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(0.5 * float(radius.max()),
                                                          output_type="ndarray")
    if len(pairs):
        apart = np.hypot(x[pairs[:, 0]] - x[pairs[:, 1]], y[pairs[:, 0]] - y[pairs[:, 1]])
        pairs = pairs[apart <= 0.5 * np.minimum(radius[pairs[:, 0]], radius[pairs[:, 1]])]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                       shape=(len(x), len(x)))
    _, group = connected_components(graph, directed=False)
    rows = rows.copy()
    added = []
    for g in range(group.max() + 1):  # groups numbered by their first member
        member = group == g
        cx, cy = float(x[member].mean()), float(y[member].mean())
        if valid[int(round(cy)), int(round(cx))]:
            continue  # some visit saw it unsaturated: measured there like any source
        reach = float(radius[member].max())
        rows["flags"][np.hypot(rows["x"] - cx, rows["y"] - cy) <= reach] |= FLAG_SATURATED
        seen = len(footprints) and \
            (np.hypot(footprints[:, 0] - cx, footprints[:, 1] - cy) <= reach).any()
        if skymap.in_inner(cx, cy) and not seen:
            row = np.zeros(1, dtype=CATALOG_DTYPE)
            row["patch_x"], row["patch_y"] = patch
            row["id"], row["x"], row["y"] = -1 - len(added), cx, cy
            row["ra"], row["dec"] = wcs.pixel_to_world_values(cx, cy)
            row["flux"] = row["flux_err"] = np.nan
            row["flags"] = FLAG_SATURATED
            added.append(row)
    return np.concatenate([rows, *added]) if added else rows


def deblend(filtered: np.ndarray, segments, min_pixels: int, levels: int, contrast: float):
    """photutils' deblend_sources of the footprints on the filtered image, relabelled
    1..n in label order (shared by every engine's detect)."""
    from astropy.utils.exceptions import AstropyUserWarning
    from photutils.segmentation import deblend_sources

    with warnings.catch_warnings():
        # photutils says when it switches a footprint from exponential to linear levels
        # (a footprint with values <= 0); the result is still its deblending
        warnings.simplefilter("ignore", AstropyUserWarning)
        return deblend_sources(filtered, segments, min_pixels, n_levels=levels,
                               contrast=contrast, mode="exponential", connectivity=8,
                               relabel=True, progress_bar=False)


def plan_detect(state, ctx: RunContext) -> Plan:
    coadds = sorted(state["coadds"].items())
    skymap = state["skymap"]

    def combine(results):
        tables = [rows for _, rows in sorted(results, key=lambda r: r[0])]
        return {"catalog": np.concatenate(tables) if tables
                else np.zeros(0, dtype=CATALOG_DTYPE)}

    return Plan(coadds, {"skymap": skymap, "params": ctx.params,
                         "saturated": state["saturated"]}, combine,
                bytes_in=_file_bytes(state["coadds"].values()),
                voxels=len(coadds) * skymap.patch_shape[0] * skymap.patch_shape[1])


CALIBRATE = Step("calibrate", ("ccds", "skipped"),
                 ("calexps", "calibration", "skipped", "saturated"),
                 plan_calibrate, calibrate_kernel,
                 ("saturation_grow", "cr_sigclip", "cr_sigfrac", "cr_objlim", "cr_niter",
                  "background_box", "background_filter", "background_exclude_percentile",
                  "background_clip_sigma"))
WARP = Step("warp", ("ccds", "calexps", "skymap"), ("warps",), plan_warp, warp_kernel,
            ("warp_order",))
COADD = Step("coadd", ("warps", "skymap"), ("coadds",), plan_coadd, coadd_kernel,
             ("clip_sigma", "clip_iterations", "weight_clip_sigma",
              "coadd_rescale_variance"))
DETECT = Step("detect", ("coadds", "skymap", "saturated"), ("catalog",), plan_detect,
              detect_kernel,
              ("detect_background_box", "background_exclude_percentile",
               "background_clip_sigma", "detect_kernel_fwhm", "detect_threshold",
               "detect_min_pixels", "deblend", "deblend_levels", "deblend_contrast"))

STEPS: tuple[Step, ...] = (CALIBRATE, WARP, COADD, DETECT)
STEP_BY_NAME = {s.name: s for s in STEPS}


def run_pipeline(engine, state: dict, ctx: RunContext,
                 on_step: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    return run_steps(STEPS, engine, state, ctx, on_step)


Params, Partitioning = AstroParams, AstroPartitioning  # the names every pipeline offers
