"""TensorFlow's native astro steps: warp (2A) and coadd (3A), re-expressed from the
reference kernels of `pipelines/astro.py` so that they give the same answers.

warp: every (visit, patch) task resamples each of its CCDs onto the patch grid with the
arithmetic of reproject 0.21's `reproject_interp(order="bilinear",
roundtrip_coords=False)`, which calls scipy's `map_coordinates(order=1, mode="constant",
cval=NaN)` through reproject's edge wrapper:
- coordinates: patch pixel -> sky -> CCD pixel, as closed forms of wcslib's STG and TAN
  projections (unit vectors and one 3x3 rotation, which also carries a frame change such
  as FK5 -> ICRS; no trigonometry per pixel), float64, within 1e-9 pixel of wcslib's;
- a coordinate in the outer half of an outermost pixel of the CCD cut-out is moved onto
  that pixel's centre; beyond that the output is NaN;
- the 2x2 stencil is scipy's: weights 1 - f and 1 - (1 - f), a stencil point past the
  last pixel (only ever with weight 0) mirrored back inside, and any NaN in the stencil
  makes the output NaN (0 * NaN), which is how a bad pixel grows by the kernel;
- the cut-out boxes come from the reference's own `_footprint_box` (host metadata), the
  planes are masked and scaled by the pixel-area ratio in float32 before resampling, as
  the reference does, and the first CCD with finite image and variance wins a pixel.
Tasks run visit by visit, and a CCD's prepared planes are kept (a bounded cache) for the
other patches it overlaps: each CCD is read once per step, not once per (visit, patch).

coadd: per pixel, astropy 8's `sigma_clip(axis=0, cenfunc="median", stdfunc="std")`
(its C fast path: median, mean and population std of the values still in, bounds
median -/+ sigma * std, the final mask from the last bounds), then the weighted mean and
variance in float64 in the reference's order: with the same weights, bit for bit the
reference's. The weights are astropy's `sigma_clipped_stats` of each warp's variance
plane with its float32 semantics (float32 median, bounds and comparisons, a float32
1 / mean); numpy sums those float32 means pairwise in float32, here in float64, so a
weight may differ from the reference's in its last bits (measured: at most 2 ulps).
A patch is processed `strip_rows` rows of every visit at a time, as the reference.

Every computation on pixels is TensorFlow (XLA-compiled kernels). The host parses
headers and WCS keywords (astropy), computes the reference's footprint boxes and
pixel-area ratio, and writes the outputs with the suite's FITS writer. Both steps run
`engine.workers` tasks at a time in threads; TensorFlow releases the GIL while it runs.

Precision: both steps compute where the reference computes (float32 planes, float64
interpolation and statistics) whatever `engine.precision` says: the outputs are float32
either way, and float32 arithmetic would change decisions (which pixels have data, which
values are clipped) that the checks require to be identical.
"""
from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines import astro, fitsio

from ..base import StepNotImplemented, native
from .io import FitsPlane, decode, fits_planes, read_planes, read_records

F32, F64 = tf.float32, tf.float64


# -- WCS: wcslib's zenithal projections as closed forms ------------------------------------

PROJECTIONS = ("TAN", "STG")


@dataclass(frozen=True)
class Zenithal:
    """A 2D celestial WCS with a zenithal projection about its reference point (TAN or
    STG, no distortion), reduced to what the per-pixel math needs:
    intermediate (radians) = scale @ (pixel - ref), then the projection gives a unit
    vector in native coordinates, and native_to_sky rotates it into the WCS's frame."""

    proj: str
    ref: np.ndarray  # (2,) 0-based pixel (x, y) of CRPIX
    scale: np.ndarray  # (2, 2) radians per pixel: CD, or CDELT * PC
    native_to_sky: np.ndarray  # (3, 3) rotation
    frame: object  # the astropy celestial frame

    @classmethod
    def of(cls, wcs, what: str = "WCS") -> "Zenithal":
        from astropy.wcs.utils import wcs_to_celestial_frame

        w = wcs.wcs
        w.set()  # wcslib's defaults (LONPOLE) and unit conversions to degrees
        proj = w.ctype[0][5:8] if len(w.ctype[0]) >= 8 else ""
        problems = []
        if wcs.naxis != 2 or w.lng != 0 or w.lat != 1:
            problems.append("axes other than (longitude, latitude)")
        if proj not in PROJECTIONS or w.ctype[1][5:8] != proj or len(w.ctype[0]) != 8:
            problems.append(f"projection {w.ctype[0]!r}")
        if wcs.sip is not None or wcs.cpdis1 is not None or wcs.cpdis2 is not None \
                or wcs.det2im1 is not None or wcs.det2im2 is not None:
            problems.append("distortion terms")
        if w.get_pv():
            problems.append("PV parameters")
        if problems:
            raise StepNotImplemented(
                "tensorflow", "warp", f"{what}: its warp implements TAN and STG celestial "
                f"WCS without distortion; this one has {', '.join(problems)}")
        # wcslib: for a zenithal projection the native pole is the reference point, so
        # the native pole sits at (CRVAL1, CRVAL2) and the celestial pole at native
        # longitude LONPOLE. native -> celestial = Rz(alpha_p) P(delta_p) Rz(-phi_p):
        # the rotation form of wcslib's sphx2s formulas (Calabretta & Greisen 2002, eq. 2).
        alpha_p, delta_p, phi_p = np.radians([w.crval[0], w.crval[1], w.lonpole])
        sd, cd = math.sin(delta_p), math.cos(delta_p)
        tilt = np.array([[-sd, 0.0, cd], [0.0, -1.0, 0.0], [cd, 0.0, sd]])
        native_to_sky = _rot_z(alpha_p) @ tilt @ _rot_z(-phi_p)
        return cls(proj, np.asarray(w.crpix, float) - 1.0,
                   np.radians(np.asarray(wcs.pixel_scale_matrix, float)), native_to_sky,
                   wcs_to_celestial_frame(wcs))


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _frame_rotation(frame_from, frame_to) -> np.ndarray:
    """The rotation that takes unit vectors of `frame_from` to `frame_to`, as astropy's
    high-level `world_to_pixel` transforms a SkyCoord (reproject's `pixel_to_pixel`
    goes through it): e.g. FK5 J2000 <-> ICRS, the 20 mas frame bias, which is 0.02
    pixel at M13's 1"/pixel."""
    if frame_from.is_equivalent_frame(frame_to):
        return np.eye(3)
    from astropy.coordinates import CartesianRepresentation, SkyCoord

    basis = SkyCoord(CartesianRepresentation(np.eye(3)), frame=frame_from)
    matrix = np.asarray(basis.transform_to(frame_to).cartesian.xyz.value, float)
    if not np.allclose(matrix @ matrix.T, np.eye(3), rtol=0, atol=1e-12):
        raise StepNotImplemented("tensorflow", "warp", f"{frame_from.name} -> "
                                 f"{frame_to.name} is not a rotation of the sky")
    return matrix


def pixel_map_params(src: Zenithal, dst: Zenithal, origin=(0.0, 0.0)) -> np.ndarray:
    """The 21 float64 numbers `_pixel_map` needs to take pixels of `src` to pixels of
    `dst`, minus `origin` (x, y): where a cut-out of `dst` starts."""
    rotation = dst.native_to_sky.T @ _frame_rotation(src.frame, dst.frame) @ src.native_to_sky
    return np.concatenate([src.ref, src.scale.ravel(), rotation.ravel(),
                           np.linalg.inv(dst.scale).ravel(),
                           dst.ref - np.asarray(origin, float)])


def _deproject(proj: str, u, v):
    """Intermediate coordinates (radians) -> native unit vector. wcslib: phi =
    atan2(x, -y), theta from R = |(x, y)|; written without trigonometry:
    TAN: R = cot(theta); STG: R = 2 tan((90 deg - theta) / 2)."""
    if proj == "TAN":
        k = tf.math.rsqrt(1.0 + u * u + v * v)
        return -v * k, u * k, k
    s = 0.25 * (u * u + v * v)  # STG: tan^2((90 deg - theta) / 2)
    k = 1.0 / (1.0 + s)
    return -v * k, u * k, (1.0 - s) * k


def _project(proj: str, a, b, c):
    """Native unit vector -> intermediate coordinates (radians); NaN where wcslib has
    no solution (TAN: the far hemisphere; STG: the antipode)."""
    nan = tf.constant(math.nan, F64)
    if proj == "TAN":
        ok = c > 0.0
        return tf.where(ok, b / c, nan), tf.where(ok, -a / c, nan)
    ok = c > -1.0
    k = 2.0 / (1.0 + c)
    return tf.where(ok, b * k, nan), tf.where(ok, -a * k, nan)


def _pixel_map(params, x, y, proj_from: str, proj_to: str):
    """Pixels (x, y) of one zenithal WCS -> pixels of another (`pixel_map_params`)."""
    p = [params[k] for k in range(21)]
    dx, dy = x - p[0], y - p[1]
    u = p[2] * dx + p[3] * dy
    v = p[4] * dx + p[5] * dy
    a, b, c = _deproject(proj_from, u, v)
    a, b, c = (p[6] * a + p[7] * b + p[8] * c,
               p[9] * a + p[10] * b + p[11] * c,
               p[12] * a + p[13] * b + p[14] * c)
    u, v = _project(proj_to, a, b, c)
    return p[15] * u + p[16] * v + p[19], p[17] * u + p[18] * v + p[20]


# -- bilinear resampling as reproject + scipy do it -----------------------------------------

def _stencil_axis(coord, n):
    """One axis of reproject's map_coordinates wrapper around scipy's order-1 spline:
    a coordinate in [-0.5, n - 0.5) is valid, clipped into [0, n - 1] (the outer half of
    an outermost pixel takes its centre); start = floor, weights (1 - f, 1 - (1 - f)) as
    scipy computes them; a stencil point past the end (start = n - 1, weight 0) is
    scipy's mirror, n - 2."""
    n_f = tf.cast(n, F64)
    ok = (coord >= -0.5) & (coord < n_f - 0.5)
    clipped = tf.where(ok, tf.clip_by_value(coord, 0.0, n_f - 1.0), 0.0)
    start = tf.floor(clipped)
    w0 = 1.0 - (clipped - start)
    w1 = 1.0 - w0
    i0 = tf.cast(start, tf.int32)
    i1 = tf.where(i0 + 1 < n, i0 + 1, tf.maximum(n - 2, 0))
    return ok, i0, i1, w0, w1


def _bilinear(gather, n_rows, n_cols, row, col):
    """Bilinear values at (row, col), pixels of an n_rows x n_cols image whose planes
    `gather(r, c)` returns (float32): float64, NaN outside, summed in scipy's order
    (((v00 wr0) wc0 + (v01 wr0) wc1) + (v10 wr1) wc0) + (v11 wr1) wc1, so a NaN anywhere
    in the stencil, even at weight 0, gives NaN."""
    ok_r, r0, r1, wr0, wr1 = _stencil_axis(row, n_rows)
    ok_c, c0, c1, wc0, wc1 = _stencil_axis(col, n_cols)
    total = None
    for r, c, wr, wc in ((r0, c0, wr0, wc0), (r0, c1, wr0, wc1),
                         (r1, c0, wr1, wc0), (r1, c1, wr1, wc1)):
        terms = [tf.cast(v, F64) * wr * wc for v in gather(r, c)]
        total = terms if total is None else [t + u for t, u in zip(total, terms)]
    nan = tf.constant(math.nan, F64)
    return [tf.where(ok_r & ok_c, t, nan) for t in total]


# -- 2A warp ------------------------------------------------------------------------------

@tf.function(jit_compile=True)
def _make_table(image, variance, mask, unusable_bits, area):
    """A CCD's table for the resampling to gather from: as the reference, unusable
    pixels NaN and the flux scaled by the pixel-area ratio in float32; image and variance
    side by side ([rows, cols, 2] float32), so that one gather fetches both."""
    unusable = tf.bitwise.bitwise_and(mask, tf.cast(unusable_bits, mask.dtype)) != 0
    nan = tf.constant(math.nan, F32)
    return tf.stack([tf.where(unusable, nan, tf.cast(image, F32)) * area[0],
                     tf.where(unusable, nan, tf.cast(variance, F32)) * area[1]], axis=-1)


class _TableCache:
    """The tables of the CCDs the last tasks used, shared by the step's threads: a CCD
    overlaps several patches of its visit, and tasks run in visit order, so each CCD is
    read and prepared once instead of once per (visit, patch). A table another thread
    is making is waited for, not made twice. At most `capacity` tables are held (a
    task's memory is then bounded by them, not by the survey)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.tables: OrderedDict[object, Future] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, make):
        with self.lock:
            entry = self.tables.get(key)
            mine = entry is None
            if mine:
                entry = self.tables[key] = Future()
                while len(self.tables) > self.capacity:
                    self.tables.popitem(last=False)
            else:
                self.tables.move_to_end(key)
        if mine:  # made outside the lock: the other threads go on meanwhile
            try:
                entry.set_result(make())
            except BaseException as exc:
                entry.set_exception(exc)
                with self.lock:
                    if self.tables.get(key) is entry:
                        del self.tables[key]
        return entry.result()


@functools.lru_cache(maxsize=None)
def _warp_kernel(proj_from: str, proj_to: str):
    """An XLA kernel that resamples one CCD onto the patch pixels of its box and lays
    the result under the pixels the warp has no data for yet (the reference's `take`).
    It computes every patch pixel and keeps those in the box: resampling only the box
    (a third of the patch on average on survey-small), by an XLA loop over tiles or by
    calls on chunks of its pixels, measured no faster here."""

    @tf.function(jit_compile=True)
    def kernel(warp, table, params, box):
        """warp [2, H, W] f32 (image, variance); table: the CCD's `_make_table` table
        [R, C, 2] (one compiled shape per CCD shape); params: `pixel_map_params` to
        cut-out pixels; box: the cut-out's first row, rows, first col, cols (the
        resampling's edges are the cut-out's, as in the reference) and the patch box
        y0, y1, x0, x1."""
        height, width = warp.shape[1], warp.shape[2]
        stride = table.shape[1]
        flat = tf.reshape(table, (-1, 2))
        row0, n_rows, col0, n_cols, y0, y1, x0, x1 = (box[k] for k in range(8))

        def gather(r, c):
            values = tf.gather(flat, (row0 + r) * stride + col0 + c)
            return values[..., 0], values[..., 1]

        iy = tf.range(height)[:, None] + tf.zeros((1, width), tf.int32)
        ix = tf.range(width)[None, :] + tf.zeros((height, 1), tf.int32)
        col, row = _pixel_map(params, tf.cast(ix, F64), tf.cast(iy, F64), proj_from, proj_to)
        image_v, variance_v = _bilinear(gather, n_rows, n_cols, row, col)
        inside = (iy >= y0) & (iy < y1) & (ix >= x0) & (ix < x1)
        take = (tf.math.is_nan(warp[0]) & inside & tf.math.is_finite(image_v)
                & tf.math.is_finite(variance_v))
        return tf.where(take, tf.cast(tf.stack([image_v, variance_v]), F32), warp)

    return kernel


class _HostWcs(threading.local):
    """Each worker thread's own astropy WCS objects (wcslib's structures are not shared
    across threads) and what is derived from them, made once per calexp and patch."""

    def __init__(self):
        self.calexps, self.patches = {}, {}

    def calexp(self, path, header: str):
        if path not in self.calexps:
            from astropy.io import fits

            wcs = astro._celestial_wcs(fits.Header.fromstring(header))
            self.calexps[path] = (wcs, Zenithal.of(wcs, path), astro._pixel_area(wcs))
        return self.calexps[path]

    def patch(self, skymap, patch):
        if patch not in self.patches:
            wcs = skymap.patch_wcs(patch)
            self.patches[patch] = (wcs, Zenithal.of(wcs, f"patch {patch}"),
                                   astro._pixel_area(wcs), wcs.to_header())
        return self.patches[patch]


@dataclass(frozen=True)
class _Calexp:
    """What the host knows of a calexp: its IMAGE header (text, from which each thread
    makes its own WCS) and where its planes lie."""

    header: str
    shape: tuple[int, int]
    planes: dict[str, FitsPlane]
    unusable_bits: int

    @classmethod
    def of(cls, path) -> "_Calexp":
        with fitsio.open_fits(path) as hdul:
            header = hdul["IMAGE"].header.tostring()
            bits = fitsio.bits_value(fitsio.mask_bits(hdul["MASK"].header), astro.UNUSABLE)
            planes = {name: FitsPlane.of(hdul, name, path) for name in fitsio.PLANES}
        return cls(header, planes["IMAGE"].shape, planes, bits)

    def table(self, scale) -> tf.Tensor:
        image, variance, mask = read_planes([self.planes[name] for name in
                                             ("IMAGE", "VARIANCE", "MASK")])
        return _make_table(image, variance, mask, tf.constant(self.unusable_bits, tf.int64),
                           tf.constant(scale, F32))


def _warp_task(part, calexps: dict[str, _Calexp], skymap, workdir, host: _HostWcs,
               tables: _TableCache):
    visit, patch, paths = part
    height, width = skymap.patch_shape
    patch_wcs, patch_z, patch_area, patch_header = host.patch(skymap, patch)
    warp = tf.fill((2, height, width), tf.constant(math.nan, F32))
    for path in paths:
        ccd = calexps[path]
        wcs, ccd_z, ccd_area = host.calexp(path, ccd.header)
        rows, cols = ccd.shape
        # The reference's cut-outs (host metadata): the patch pixels this CCD can reach,
        # and the CCD pixels those need.
        out = astro._footprint_box(wcs, (rows, cols), patch_wcs, (height, width), margin=2)
        if out is None:
            continue
        src = astro._footprint_box(patch_wcs.slice(out), (out[0].stop - out[0].start,
                                                         out[1].stop - out[1].start),
                                   wcs, (rows, cols), margin=3)
        if src is None:
            continue
        area = patch_area / ccd_area
        scale = (np.float32(area), np.float32(area * area))  # the reference's float32 factors
        table = tables.get((path, scale), lambda: ccd.table(scale))
        params = pixel_map_params(patch_z, ccd_z, origin=(src[1].start, src[0].start))
        box = [src[0].start, src[0].stop - src[0].start, src[1].start,
               src[1].stop - src[1].start, out[0].start, out[0].stop, out[1].start,
               out[1].stop]
        warp = _warp_kernel(patch_z.proj, ccd_z.proj)(
            warp, table, tf.constant(params, F64), tf.constant(box, tf.int32))
    if not bool(tf.reduce_any(tf.math.is_finite(warp[0]))):
        return visit, patch, None
    header = patch_header.copy()
    header["VISIT"] = visit
    path = Path(workdir) / "warp" / f"v{visit:04d}_p{patch[0]}_{patch[1]}.fits"
    planes = warp.numpy()  # to the suite's FITS writer
    fitsio.write_planes(path, None, {"IMAGE": (planes[0], header),
                                     "VARIANCE": (planes[1], None)})
    return visit, patch, str(path)


@native("warp", compiled=True, follows=())
def warp(engine, step, state, ctx, plan):
    shared = plan.shared
    parts = plan.partitions
    host = _HostWcs()
    with ThreadPoolExecutor(max_workers=engine.workers) as pool:
        paths = sorted({p for _, _, calexp_paths in parts for p in calexp_paths})
        calexps = dict(zip(paths, pool.map(_Calexp.of, paths)))
        # Room for two visits' CCDs (the threads' tasks straddle a visit's end), within
        # 256 MiB, but at least for the CCDs of the tasks in flight.
        per_visit: dict[int, set] = {}
        for visit, _, calexp_paths in parts:
            per_visit.setdefault(visit, set()).update(calexp_paths)
        most = max((len(calexp_paths) for _, _, calexp_paths in parts), default=1)
        table_bytes = max((c.shape[0] * c.shape[1] * 8 for c in calexps.values()), default=1)
        tables = _TableCache(max(most * engine.workers, min(
            2 * max((len(c) for c in per_visit.values()), default=1),
            (256 << 20) // table_bytes)))
        results = _run_tasks(engine, "warp", pool, parts, lambda part: _warp_task(
            part, calexps, shared["skymap"], shared["workdir"], host, tables),
            order=lambda part: (part[0], part[1]))  # visit by visit: CCDs reused
    return plan.combine(results)


def _run_tasks(engine, label, pool, parts, task, order=None):
    """task(part) for every part on the pool (in `order` of the parts, if given),
    results in partition order, progress as tasks finish."""
    done, lock = [0], threading.Lock()

    def run(part):
        result = task(part)
        with lock:
            done[0] += 1
            engine._report(label, done[0], len(parts))
        return result

    indices = sorted(range(len(parts)), key=lambda i: order(parts[i])) if order \
        else range(len(parts))
    futures = {i: pool.submit(run, parts[i]) for i in indices}
    return [futures[i].result() for i in range(len(parts))]


# -- 3A coadd -----------------------------------------------------------------------------

_KEY_BINS = 1 << 16  # radix of the order-statistic selection: 16 bits at a time


def _float_keys(x):
    """float32 -> uint32 keys in the same order (negative floats reversed below the
    positive ones), to select order statistics by radix."""
    bits = tf.bitcast(x, tf.uint32)
    negative = tf.bitwise.right_shift(bits, 31) == 1
    return tf.where(negative, tf.bitwise.invert(bits),
                    tf.bitwise.bitwise_or(bits, tf.constant(0x80000000, tf.uint32)))


def _key_float(key):
    positive = tf.bitwise.right_shift(key, 31) == 1
    bits = tf.where(positive, tf.bitwise.bitwise_and(key, tf.constant(0x7FFFFFFF, tf.uint32)),
                    tf.bitwise.invert(key))
    return tf.bitcast(bits, F32)


def _histogram(bins, valid, size: int):
    """Counts of `bins` in [0, size) where `valid`: DenseBincount with a constant size
    (tf.math.bincount's size depends on the data, which XLA cannot compile); the invalid
    go to an extra bin, dropped."""
    counts = tf.raw_ops.DenseBincount(input=tf.where(valid, bins, size), size=size + 1,
                                      weights=tf.zeros((0,), tf.int32))
    return counts[:size]


def _locate(counts, rank):
    """The bin of a histogram (a multiple of 256 bins) that holds rank `rank` (0-based),
    and the rank within it. Prefix sums in two levels of 256, and masks rather than
    indexing at a computed position: XLA took minutes to compile a 65536-long cumsum
    or such a slice."""
    index = tf.range(256)
    grid = tf.reshape(counts, (-1, 256))
    rows = tf.reduce_sum(grid, axis=1)
    row = tf.reduce_sum(tf.cast(tf.cumsum(rows) <= rank, tf.int32))
    rank = rank - tf.reduce_sum(tf.where(tf.range(tf.shape(rows)[0]) < row, rows, 0))
    cols = tf.reduce_sum(tf.where(tf.range(tf.shape(rows)[0])[:, None] == row, grid, 0),
                         axis=0)
    col = tf.reduce_sum(tf.cast(tf.cumsum(cols) <= rank, tf.int32))
    rank = rank - tf.reduce_sum(tf.where(index < col, cols, 0))
    return row * 256 + col, rank


def _select_pair(rank, keys, high, valid, high_counts):
    """The values of ranks `rank` and `rank + 1` (0-based) among the valid keys, by radix
    rather than a sort (a float32 sort of a 440x440 plane takes 20-35 ms here): the top
    16 bits from the histogram of the keys' top halves, the low 16 bits from one
    histogram of the keys in those (one or two) top bins, the second bin's keys after
    the first's, so that the two ranks stay adjacent."""
    top1, rank_in = _locate(high_counts, rank)
    top2, _ = _locate(high_counts, rank + 1)
    low = tf.cast(tf.bitwise.bitwise_and(keys, tf.constant(0xFFFF, tf.uint32)), tf.int32)
    second = (high == top2) & (top2 != top1)
    bins = low + tf.where(second, _KEY_BINS, 0)
    counts = _histogram(bins, valid & ((high == top1) | second), 2 * _KEY_BINS)

    def value(rank):
        b, _ = _locate(counts, rank)
        top = tf.where(b < _KEY_BINS, top1, top2)
        key = tf.bitwise.bitwise_or(tf.bitwise.left_shift(tf.cast(top, tf.uint32), 16),
                                    tf.cast(b % _KEY_BINS, tf.uint32))
        return _key_float(key)

    return value(rank_in), value(rank_in + 1)


@tf.function(jit_compile=True)
def _visit_weight(variance, sigma, maxiters):
    """1 / astropy's sigma_clipped_stats(variance[finite], sigma=sigma)[0] (median
    centre, std, `maxiters` iterations), with its float32 semantics: it clips a float32
    array without an axis, so the median is a float32 order statistic (the mean of the
    two middle ones, in float32, for an even count), the bounds median -/+ std * sigma
    are float32, and 1 / mean is a float32 division. Its means and std are pairwise
    float32 sums; here float64 sums (the std's from moments about the median, one pass)
    rounded to float32. Each iteration keeps the values within its bounds among those
    still kept, so the kept values are the finite ones within [max of lows, min of
    highs], and stops when it clipped nothing."""
    x = tf.reshape(variance, (-1,))
    finite = tf.math.is_finite(x)
    x64 = tf.cast(x, F64)
    keys = _float_keys(x)
    high = tf.cast(tf.bitwise.right_shift(keys, 16), tf.int32)
    high_counts = _histogram(high, finite, _KEY_BINS)

    def census(lo, hi):
        """How many finite values lie in [lo, hi], and below lo."""
        return (tf.reduce_sum(tf.cast(finite & (x >= lo) & (x <= hi), tf.int32)),
                tf.reduce_sum(tf.cast(finite & (x < lo), tf.int32)))

    def body(iteration, lo, hi, count, below, _):
        # The values in: a run of `count` in sorted order, after `below` others.
        odd = count % 2 == 1
        middle = below + count // 2
        first, second = _select_pair(tf.where(odd, middle, middle - 1), keys, high, finite,
                                     high_counts)
        median = tf.where(odd, first, (first + second) / 2.0)
        kept = finite & (x >= lo) & (x <= hi)
        shifted = tf.where(kept, x64 - tf.cast(median, F64), 0.0)
        n = tf.cast(count, F64)
        offset = tf.reduce_sum(shifted) / n  # mean - median
        std = tf.sqrt(tf.cast(tf.reduce_sum(shifted * shifted) / n - offset * offset, F32))
        lo = tf.maximum(lo, median - std * sigma)
        hi = tf.minimum(hi, median + std * sigma)
        new_count, new_below = census(lo, hi)
        return iteration + 1, lo, hi, new_count, new_below, new_count != count

    inf = tf.constant(math.inf, F32)
    count, below = census(-inf, inf)
    _, lo, hi, count, _, _ = tf.while_loop(
        lambda iteration, lo, hi, count, below, changed: changed & (iteration < maxiters),
        body, (tf.constant(0), -inf, inf, count, below, tf.constant(True)))
    kept = finite & (x >= lo) & (x <= hi)
    mean = tf.cast(tf.reduce_sum(tf.where(kept, x64, 0.0)) / tf.cast(count, F64), F32)
    return 1.0 / mean


def _sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort: compare-exchange pairs that sort `n` values."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _sort_values(values: list) -> list:
    """Elementwise sort of a list of same-shape tensors (a per-pixel sort across
    visits): a fixed network of minimum/maximum, which XLA fuses into one pass."""
    values = list(values)
    for i, j in _sorting_network(len(values)):
        values[i], values[j] = (tf.minimum(values[i], values[j]),
                                tf.maximum(values[i], values[j]))
    return values


def _pick(values: list, index):
    """values[index] per pixel (index an int tensor of the values' shape)."""
    out = values[0]
    for k in range(1, len(values)):
        out = tf.where(index == k, values[k], out)
    return out


def _clip_rounds(maxiters, visits: int) -> int:
    """How many times astropy computes bounds: at least once, at most `maxiters` (None:
    until nothing changes). An iteration that clips nothing leaves the next one the same
    values, hence the same bounds, so running more is harmless; and each iteration that
    changes something clips a value, so visits + 1 always reach the end."""
    if maxiters is None or maxiters < 0:
        return visits + 1
    return max(1, min(int(maxiters), visits + 1))


@functools.lru_cache(maxsize=None)
def _coadd_kernel(iterations: int):
    @tf.function(jit_compile=True)
    def kernel(image, variance, weight, sigma):
        """image, variance [visits, rows, cols] f32 (NaN: no data; padding visits are all
        NaN); weight [visits] f64 -> coadd, its variance (f32), visits used (int16)."""
        visits = image.shape[0]
        x = [tf.cast(image[v], F64) for v in range(visits)]
        var = [tf.cast(variance[v], F64) for v in range(visits)]
        usable = [tf.math.is_finite(x[v]) & tf.math.is_finite(var[v]) for v in range(visits)]
        inf = tf.constant(math.inf, F64)
        ordered = _sort_values([tf.where(usable[v], x[v], inf) for v in range(visits)])

        def clip(k, lo, hi, bound_lo, bound_hi):
            # astropy's compute_sigma_clipped_bounds, one iteration: bounds from the
            # values still in, which are the usable ones within every bound so far
            # ([lo, hi]): a run of the sorted values, starting at `below`.
            kept = [u & (v >= lo) & (v <= hi) for u, v in zip(usable, x)]
            count = sum(tf.cast(k, tf.int32) for k in kept)
            below = sum(tf.cast(u & (v < lo), tf.int32) for u, v in zip(usable, x))
            middle = below + count // 2
            median = tf.where(count % 2 == 1, _pick(ordered, middle),
                              0.5 * (_pick(ordered, middle) + _pick(ordered, middle - 1)))
            n = tf.cast(count, F64)
            total = tf.where(kept[0], x[0], 0.0)
            for v in range(1, visits):
                total = total + tf.where(kept[v], x[v], 0.0)
            mean = total / n
            spread = tf.where(kept[0], tf.square(mean - x[0]), 0.0)
            for v in range(1, visits):
                spread = spread + tf.where(kept[v], tf.square(mean - x[v]), 0.0)
            std = tf.sqrt(spread / n)
            bound_lo, bound_hi = median - sigma * std, median + sigma * std
            return (k + 1, tf.maximum(lo, bound_lo), tf.minimum(hi, bound_hi), bound_lo,
                    bound_hi)

        everything = tf.fill(tf.shape(x[0]), inf)
        _, _, _, bound_lo, bound_hi = tf.while_loop(
            lambda k, *_: k < iterations, clip,
            (tf.constant(0), -everything, everything, -everything, everything))
        # The final mask is the last bounds applied to every usable value (astropy's
        # fast path), so a value clipped early can come back.
        keep = [u & (v >= bound_lo) & (v <= bound_hi) for u, v in zip(usable, x)]
        # The reference's weighted mean, summed over visits in visit order.
        w = [tf.where(keep[v], weight[v], 0.0) for v in range(visits)]
        total, num, num_var = w[0], tf.where(keep[0], x[0], 0.0) * w[0], \
            tf.where(keep[0], var[0], 0.0) * w[0] * w[0]
        for v in range(1, visits):
            total = total + w[v]
            num = num + tf.where(keep[v], x[v], 0.0) * w[v]
            num_var = num_var + tf.where(keep[v], var[v], 0.0) * w[v] * w[v]
        n = sum(tf.cast(k, tf.int32) for k in keep)
        nan = tf.constant(math.nan, F64)
        coadd = tf.where(n > 0, num / total, nan)
        coadd_var = tf.where(n > 0, num_var / (total * total), nan)
        return tf.cast(coadd, F32), tf.cast(coadd_var, F32), tf.cast(n, tf.int16)

    return kernel


@functools.lru_cache(maxsize=None)
def _strip_reader(dtype: str, cols: int, visits: int, strip_rows: int):
    """A graph: a strip of rows of a patch's warps (one record per warp and plane,
    IMAGE records first) -> image and variance [visits, strip_rows, cols] float32,
    padded with NaN (no data), so that the XLA kernel compiles once for the step."""
    nan = tf.constant(math.nan, F32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)]
                 + [tf.TensorSpec([None], tf.int64)] * 3)
    def read(paths, headers, sizes, footers):
        values = decode(read_records(paths, headers, sizes, footers), (dtype, -1, cols))
        values = tf.cast(tf.reshape(values, (2, tf.size(paths) // 2, -1, cols)), F32)
        pad = [[0, visits - tf.shape(values)[1]], [0, strip_rows - tf.shape(values)[2]],
               [0, 0]]
        return [tf.ensure_shape(tf.pad(values[k], pad, constant_values=nan),
                                (visits, strip_rows, cols)) for k in (0, 1)]

    return read


def _coadd_task(part, skymap, workdir, params, strip_rows: int, visits: int):
    patch, warps = part
    height, width = skymap.patch_shape
    planes = [fits_planes(path, ("IMAGE", "VARIANCE")) for _, path in warps]
    layouts = {(p[n].dtype.str, p[n].shape) for p in planes for n in ("IMAGE", "VARIANCE")}
    if len(layouts) != 1:
        raise ValueError(f"patch {patch}: its warps' planes differ in type or shape "
                         f"({sorted(layouts)})")
    ((dtype, _),) = layouts
    sigma = tf.constant(params.weight_clip_sigma, F32)
    weights = [_visit_weight(tf.cast(p["VARIANCE"].read(), F32), sigma,
                             tf.constant(5))  # sigma_clipped_stats' default maxiters
               for p in planes]  # one whole variance plane at a time, as the reference
    weight = tf.pad(tf.cast(tf.stack(weights), F64), ((0, visits - len(warps)),))
    read_strip = _strip_reader(dtype, width, visits, strip_rows)
    kernel = _coadd_kernel(_clip_rounds(params.clip_iterations, visits))
    clip_sigma = tf.constant(params.clip_sigma, F64)
    pieces = []
    for r0 in range(0, height, strip_rows):  # `strip_rows` rows of every visit at a time
        r1 = min(height, r0 + strip_rows)
        paths, headers, sizes, footers = zip(*(p[name].band(r0, r1)
                                               for name in ("IMAGE", "VARIANCE")
                                               for p in planes))
        image, variance = read_strip(tf.constant(paths),
                                     *(tf.constant(r, tf.int64) for r in (headers, sizes,
                                                                           footers)))
        pieces.append([out[:r1 - r0] for out in kernel(image, variance, weight, clip_sigma)])
    coadd, coadd_var, count = (tf.concat(p, axis=0).numpy() for p in zip(*pieces))
    header = skymap.patch_wcs(patch).to_header()
    header["NVISITS"] = len(warps)
    for n, ((visit, _), w) in enumerate(zip(warps, weights)):
        header[f"VISIT{n}"] = (visit, f"visit of warp {n}")
        header[f"WEIGHT{n}"] = (np.float32(w.numpy()),
                                f"weight of visit {visit}: 1/clipped mean variance")
    path = Path(workdir) / "coadd" / f"p{patch[0]}_{patch[1]}.fits"
    fitsio.write_planes(path, None, {"IMAGE": (coadd, header), "VARIANCE": (coadd_var, None),
                                     "EXPCOUNT": (count, None)})
    return patch, str(path)


@native("coadd", compiled=True, follows=("clip_sigma", "clip_iterations", "weight_clip_sigma"))
def coadd(engine, step, state, ctx, plan):
    shared = plan.shared
    parts = plan.partitions
    if not parts:
        return plan.combine([])
    height = shared["skymap"].patch_shape[0]
    strip_rows = min(shared["strip_rows"], height)
    visits = max(len(warps) for _, warps in parts)  # every patch padded to as many
    width = shared["skymap"].patch_shape[1]
    params = shared["params"]
    with ThreadPoolExecutor(max_workers=engine.workers) as pool:
        # The clipping kernel compiles (on no data) while the first task compiles the
        # weights' kernel: each takes seconds.
        nothing = tf.fill((visits, strip_rows, width), tf.constant(math.nan, F32))
        pool.submit(_coadd_kernel(_clip_rounds(params.clip_iterations, visits)), nothing,
                    nothing, tf.zeros((visits,), F64), tf.constant(params.clip_sigma, F64))
        results = _run_tasks(engine, "coadd", pool, parts, lambda part: _coadd_task(
            part, shared["skymap"], shared["workdir"], shared["params"], strip_rows, visits))
    return plan.combine(results)
