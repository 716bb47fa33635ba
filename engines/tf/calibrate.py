"""TensorFlow's native calibrate step (1A): the reference's `calibrate_kernel`
(pipelines/astro.py) re-expressed in TensorFlow operations, decision for decision.

Per CCD: NO_DATA where the image or variance is not finite or the variance negative;
the SAT plane grown by `saturation_grow` pixels (Euclidean); masked pixels filled with
the median of the usable ones; astroscrappy 1.3's LA Cosmic (`detect_cosmics` with
sepmed=True, cleantype='meanmask', fsmode='median', invar=variance) redone op by op; the
background mesh (`engines.tf.detect.background_2d`, photutils' Background2D) subtracted;
image and variance put on the survey's flux scale.

Why it can match the reference exactly, not just closely: the cosmic-ray mask is a
threshold decision, so every float32 value that feeds a comparison must be the one
astroscrappy computes. Medians are order statistics (any correct algorithm gives the same
value). Every other operation is an IEEE float32 operation (float64 where astroscrappy's
C promotes to double) done in the order astroscrappy's *compiled* code does it: its C
helpers are built with -ffast-math, which let GCC regroup the Laplacian's and the 2x2
rebin's sums, so the groupings here are read off the installed wheel's machine code
(see `laplacian_plus`); the NumPy and Cython parts (noise model, cleaning sums) keep
their source order. No a*b+c appears where rounding could differ (the only products are
by 4 and 0.25), so XLA's FMA contraction changes nothing. The unit tests
(tests/correctness/test_tf_calibrate.py) hold each piece against the library function
it mirrors, bit for bit.

Not covered, because no data here reaches it: TensorFlow's CPU threads flush float32
denormals (|x| < 2**-126) to zero and NumPy does not, so pixel values that small could
round differently; and GPU rounding is untested.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines import astro, fitsio

from ..base import native
from . import detect, io

# -- small exact building blocks ------------------------------------------------------------


def _shift(x, dy: int, dx: int, ny: int, nx: int, hw: int):
    """x[j + dy, i + dx] for the interior pixels j in [hw, ny - hw), i in [hw, nx - hw)."""
    return x[hw + dy:ny - hw + dy, hw + dx:nx - hw + dx]


def _with_border(x, inner, hw: int):
    """`inner` (the interior) framed by x's own border of width hw: astroscrappy's filters
    compute only the interior and copy the input's border pixels through."""
    if hw == 0:
        return inner
    middle = tf.concat([x[hw:-hw, :hw], inner, x[hw:-hw, -hw:]], axis=1)
    return tf.concat([x[:hw], middle, x[-hw:]], axis=0)


# Nicolas Devillard's median networks, as astroscrappy's medutils.c applies them
# (PyOptMed3/5/7/9): compare-exchange pairs, and the index that holds the median.
_NETWORKS = {
    3: ([(0, 1), (1, 2), (0, 1)], 1),
    5: ([(0, 1), (3, 4), (0, 3), (1, 4), (1, 2), (2, 3), (1, 2)], 2),
    7: ([(0, 5), (0, 3), (1, 6), (2, 4), (0, 1), (3, 5), (2, 6), (2, 3), (3, 6), (4, 5),
         (1, 4), (1, 3), (3, 4)], 3),
    9: ([(1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
         (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)], 4),
}


def _median_network(values: list):
    """The median of same-shaped tensors, element by element, by astroscrappy's own
    network. PIX_SORT(a, b) is `if (a > b) swap`, written as such (a select): the result
    is the exact order statistic, however the network is evaluated."""
    p = list(values)
    pairs, middle = _NETWORKS[len(p)]
    for a, b in pairs:
        swap = p[a] > p[b]
        p[a], p[b] = tf.where(swap, p[b], p[a]), tf.where(swap, p[a], p[b])
    return p[middle]


def sepmedfilt(x, size: int):
    """astroscrappy's separable median filter (PySepMedFilt<size>): the median of each
    row window, then the median of those down each column window; the border of width
    size // 2 is the input, unfiltered."""
    hw = size // 2
    ny, nx = x.shape
    if ny <= 2 * hw or nx <= 2 * hw:
        return x
    # Window order as medutils.c fills medarr: centre, -1, +1, -2, +2, ... along a row;
    # centre, -1, +1, +2, -2, +3, -3, ... down a column.
    row_order = [0] + [d for k in range(1, hw + 1) for d in (-k, k)]
    col_order = [0, -1, 1] + [d for k in range(2, hw + 1) for d in (k, -k)]
    rowmed = _median_network([x[:, hw + d:nx - hw + d] for d in row_order])
    inner = _median_network([rowmed[hw + d:ny - hw + d] for d in col_order])
    return _with_border(x, inner, hw)


def _dilate(x, hw: int, corners: bool):
    """astroscrappy's dilate3 (hw=1) / one pass of dilate5 (hw=2, the 5x5 square less
    its corners): OR over the window, border of width hw copied from the input."""
    ny, nx = x.shape
    if ny <= 2 * hw or nx <= 2 * hw:
        return x
    grown = None
    for dy in range(-hw, hw + 1):
        for dx in range(-hw, hw + 1):
            if not corners and abs(dy) == hw and abs(dx) == hw:
                continue
            s = _shift(x, dy, dx, ny, nx, hw)
            grown = s if grown is None else grown | s
    return _with_border(x, grown, hw)


def dilate3(x):
    return _dilate(x, 1, corners=True)


def dilate5(x, iterations: int):
    for _ in range(iterations):
        x = _dilate(x, 2, corners=False)
    return x


def laplacian_plus(x):
    """L+ of LA Cosmic: the image subsampled 2x2 (each pixel replicated), convolved with
    the discrete Laplacian 4p - right - left - below - above, negative values clipped to
    0, rebinned 2x2 by block mean.

    astroscrappy builds imutils.c with -O3 -ffast-math, so GCC re-associated the
    source's step-by-step subtractions; what counts is the machine code of the installed
    1.3 wheel (objdump of PyLaplaceConvolve and PyRebin), whose groupings are kept here,
    region by region of the subsampled image: float32 everywhere except the first row,
    where the C source's `4.0 * d[i] - ...` is a double expression rounded once."""
    ny, nx = x.shape
    sub = tf.repeat(tf.repeat(x, 2, axis=0), 2, axis=1)
    pad = tf.pad(sub, [[1, 1], [1, 1]])  # a neighbour outside the image is absent: 0
    right, left = pad[1:-1, 2:], pad[1:-1, :-2]
    below, above = pad[2:, 1:-1], pad[:-2, 1:-1]  # rows j + 1 and j - 1
    four = 4.0 * sub  # exact: a power of two

    # rows 1 .. H-2: ((4p - right) - left) - (below + above), the first column included
    # (left = 0 there, and x - 0 is exact); the last column (4p - below) - (left + above)
    middle = tf.concat([(((four - right) - left) - (below + above))[1:-1, :-1],
                        ((four - below) - (left + above))[1:-1, -1:]], axis=1)

    def wide(t):
        return tf.cast(t[:1], tf.float64)

    # row 0, in double: (4p - right) - (below + left); corners (4p - right) - below and
    # (4p - left) - below
    four0, right0, left0, below0 = 4.0 * wide(sub), wide(right), wide(left), wide(below)
    top = tf.cast(tf.concat([((four0 - right0) - below0)[:, :1],
                             ((four0 - right0) - (below0 + left0))[:, 1:-1],
                             ((four0 - left0) - below0)[:, -1:]], axis=1), tf.float32)
    # last row: (4p - above) - (right + left); corners 4p - (right + above) and
    # (4p - left) - above
    last = tf.concat([(four - (right + above))[-1:, :1],
                      ((four - above) - (right + left))[-1:, 1:-1],
                      ((four - left) - above)[-1:, -1:]], axis=1)
    lap = tf.concat([top, middle, last], axis=0)
    lap = tf.where(lap < 0.0, tf.zeros_like(lap), lap)
    # PyRebin, as compiled: ((p[2j+1, 2i] + p[2j, 2i+1]) + (p[2j, 2i] + p[2j+1, 2i+1]))
    # times 0.25
    blocks = tf.reshape(lap, (ny, 2, nx, 2))
    a00, a01 = blocks[:, 0, :, 0], blocks[:, 0, :, 1]
    a10, a11 = blocks[:, 1, :, 0], blocks[:, 1, :, 1]
    return ((a10 + a01) + (a00 + a11)) * 0.25


def clean_meanmask(arr, crmask, mask, level):
    """astroscrappy's clean_meanmask: each cosmic-ray pixel off the 2-pixel border becomes
    the mean of the pixels of its 5x5 box that are neither cosmic rays nor masked (the
    float32 running sum in the C loop's order, rows outer), or `level` when none is."""
    ny, nx = arr.shape
    if ny <= 4 or nx <= 4:
        return arr
    bad = crmask | mask
    total = tf.zeros((ny - 4, nx - 4), tf.float32)
    count = tf.zeros((ny - 4, nx - 4), tf.int32)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            good = ~_shift(bad, dy, dx, ny, nx, 2)
            total = total + tf.where(good, _shift(arr, dy, dx, ny, nx, 2), 0.0)
            count = count + tf.cast(good, tf.int32)
    mean = tf.where(count == 0, level, total / tf.cast(count, tf.float32))
    inner = tf.where(_shift(crmask, 0, 0, ny, nx, 2), mean, _shift(arr, 0, 0, ny, nx, 2))
    return _with_border(arr, inner, 2)


def _order_statistic(x, good, k):
    """The k-th smallest (from 0) of x[good], found without sorting (which XLA cannot
    compile well at this size): a binary search over the float32 values' order-preserving
    integer keys for the smallest key with more than k values at or below it; 32 passes of
    a count. Exact: the answer is one of the values."""
    bits = tf.bitcast(x, tf.int32)
    # sign-magnitude -> two's complement order: negative floats' keys reversed (-0.0 sorts
    # just below +0.0)
    keys = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, 0x7FFFFFFF), bits)
    keys = tf.reshape(tf.where(good, tf.cast(keys, tf.int64), 2**31), [-1])
    k = tf.cast(k, tf.int64)

    def step(lo, hi):  # invariant: the answer lies in [lo, hi]
        mid = (lo + hi) // 2
        enough = tf.reduce_sum(tf.cast(keys <= mid, tf.int64)) > k
        return tf.where(enough, lo, mid + 1), tf.where(enough, mid, hi)

    lo, _ = tf.while_loop(lambda lo, hi: lo < hi, step,
                          (tf.constant(-2**31, tf.int64), tf.constant(2**31 - 1, tf.int64)))
    key = tf.cast(lo, tf.int32)
    return tf.bitcast(tf.where(key < 0, tf.bitwise.bitwise_xor(key, 0x7FFFFFFF), key),
                      tf.float32)


def low_median(x, good):
    """astroscrappy's PyMedian (quickselect): the element of rank (n - 1) // 2, the lower
    middle for an even count."""
    n = tf.reduce_sum(tf.cast(good, tf.int32))
    return _order_statistic(x, good, tf.maximum(n - 1, 0) // 2)


def numpy_median(x, good):
    """np.median of x[good] in float32: the middle element, or for an even count the two
    middle ones summed in float32 and halved."""
    n = tf.reduce_sum(tf.cast(good, tf.int32))
    hi = _order_statistic(x, good, n // 2)
    lo = tf.cond(n % 2 == 1, lambda: hi,
                 lambda: _order_statistic(x, good, tf.maximum(n // 2 - 1, 0)))
    return tf.where(n % 2 == 1, hi, (lo + hi) / 2.0)


# -- LA Cosmic (astroscrappy 1.3 detect_cosmics) -------------------------------------------

def update_mask(data, satlevel):
    """astroscrappy's update_mask with no input mask: saturated-star cores (pixels at or
    above satlevel where the 7-wide separable median is above satlevel / 10, that quotient
    taken in double as Cython does, then compared in float32 as NumPy does with a Python
    float), dilated twice by the 5x5 cross-less-corners kernel."""
    threshold = tf.cast(tf.cast(satlevel, tf.float64) / 10.0, tf.float32)
    satpixels = (data >= satlevel) & (sepmedfilt(data, 7) > threshold)
    return dilate5(satpixels, 2)


def lacosmic(image, variance, gain, satlevel, sigclip, sigfrac, objlim, niter: int):
    """The cosmic-ray mask of astroscrappy.detect_cosmics(image, invar=variance,
    sigclip, sigfrac, objlim, gain, satlevel, niter, sepmed=True, cleantype='meanmask',
    fsmode='median'). Scalars are float32 tensors (Cython's `float` parameters); the
    read noise is not used when a variance is given."""
    cleanarr = image * gain
    clean_var = variance * (gain * gain)  # gain * gain: a C float product
    mask = update_mask(cleanarr, satlevel)
    goodpix = ~mask
    background_level = low_median(cleanarr, goodpix)
    background_var_level = low_median(clean_var, goodpix)
    sigcliplow = sigfrac * sigclip  # a C float product
    floor_var, floor_f = np.float32(0.00001), np.float32(0.01)

    def body(i, cleanarr, clean_var, crmask, found):
        s = laplacian_plus(cleanarr)
        m5 = sepmedfilt(clean_var, 7)
        m5 = tf.where(m5 < floor_var, floor_var, m5)
        noise = tf.sqrt(m5)
        s = s / (2.0 * noise)
        sp = s - sepmedfilt(s, 7)
        cosmics = (sp > sigclip) & goodpix
        f = sepmedfilt(cleanarr, 5)
        f = (f - sepmedfilt(f, 9)) / noise
        f = tf.where(f < floor_f, floor_f, f)
        cosmics = cosmics & (sp / f > objlim)
        cosmics = dilate3(cosmics) & goodpix & (sp > sigclip)
        cosmics = dilate3(cosmics) & goodpix & (sp > sigcliplow)
        found = tf.reduce_any(cosmics)
        crmask = crmask | cosmics
        # astroscrappy stops when an iteration finds nothing; the arrays cleaned then are
        # never used, so they are cleaned unconditionally here.
        cleanarr = clean_meanmask(cleanarr, crmask, mask, background_level)
        clean_var = clean_meanmask(clean_var, crmask, mask, background_var_level)
        return i + 1, cleanarr, clean_var, crmask, found

    _, _, _, crmask, _ = tf.while_loop(
        lambda i, cleanarr, clean_var, crmask, found: (i < niter) & found, body,
        (tf.constant(0), cleanarr, clean_var, tf.zeros_like(mask), tf.constant(True)))
    return crmask


# -- the saturation growth and the masks ---------------------------------------------------

def disk_half_widths(radius: int) -> list[tuple[int, int]]:
    """(dy, w): the row offsets of the disk of integer offsets dx^2 + dy^2 <= radius^2 and
    each row's half width. `distance_transform_edt(~sat) <= radius` holds exactly at the
    pixels within that disk of a saturated pixel: the EDT is sqrt of an integer squared
    distance, and sqrt(k) <= radius iff k <= radius^2."""
    return [(dy, math.isqrt(radius * radius - dy * dy)) for dy in range(-radius, radius + 1)]


def _rows_from(x, dy: int):
    """out[j] = x[j + dy], False where j + dy falls outside the image."""
    ny = x.shape[0]
    if abs(dy) >= ny:
        return tf.zeros_like(x)
    if dy >= 0:
        return tf.pad(x[dy:], [[0, dy], [0, 0]])
    return tf.pad(x[:ny + dy], [[-dy, 0], [0, 0]])


def grow(sat, radius: int):
    """Pixels within Euclidean distance `radius` of a True pixel of `sat`, inside the
    image (nothing outside it counts): a dilation by the disk, done as one horizontal
    max-pool per half width (SAME padding ignores what lies outside), shifted by each
    row offset of the disk."""
    if radius <= 0:
        return sat
    as_float = tf.cast(sat, tf.float32)[tf.newaxis, :, :, tf.newaxis]
    pooled = {}  # half width -> each row dilated by it
    grown = tf.zeros_like(sat)
    for dy, w in disk_half_widths(radius):
        if w not in pooled:
            pooled[w] = tf.nn.max_pool2d(as_float, (1, 2 * w + 1), 1, "SAME")[0, :, :, 0] > 0
        grown = grown | _rows_from(pooled[w], dy)
    return grown


# -- the step ------------------------------------------------------------------------------

@tf.function(jit_compile=True, autograph=False)
def _masks_and_fill(image, mask, variance, no_data, sat, unusable_bits, grow_radius):
    """The reference's masks and fill, before LA Cosmic: NO_DATA where image or variance
    is not finite or the variance negative; SAT grown; the unusable pixels filled with the
    median of the usable ones (image and variance apart). `grow_radius` is a Python int
    (part of the trace); the bit values are int32 tensors."""
    bad = ~tf.math.is_finite(image) | ~tf.math.is_finite(variance) | (variance < 0)
    mask = tf.where(bad, mask | no_data, mask)
    saturated = (mask & sat) != 0
    mask = tf.where(grow(saturated, grow_radius), mask | sat, mask)
    unusable = (mask & unusable_bits) != 0
    usable = ~unusable
    n_usable = tf.reduce_sum(tf.cast(usable, tf.int32))
    # With nothing usable the CCD is skipped; the medians are then never looked at.
    image = tf.where(unusable, numpy_median(image, usable), image)
    variance = tf.where(unusable, numpy_median(variance, usable), variance)
    return mask, unusable, n_usable, image, variance


@tf.function(jit_compile=True, autograph=False)
def _cosmic_rays(image, variance, unusable, mask, cr, gain, satlevel, sigclip, sigfrac,
                 objlim, niter):
    """LA Cosmic's mask less the unusable pixels (the reference's crmask &= ~unusable),
    flagged CR in the mask plane, and its pixel count."""
    crmask = lacosmic(image, variance, gain, satlevel, sigclip, sigfrac, objlim, niter)
    crmask = crmask & ~unusable
    return crmask, tf.where(crmask, mask | cr, mask), tf.reduce_sum(tf.cast(crmask, tf.int32))


@tf.function(jit_compile=True, autograph=False)
def _flux_scale(image, variance, background, scale):
    """image - background (cast to float32 first, as the reference does), then both
    planes on the flux scale, float32 throughout (variance times scale * scale); and the
    background's median as np.median takes it."""
    median = numpy_median(background, tf.ones_like(background, tf.bool))
    image = (image - tf.cast(background, tf.float32)) * scale
    return image, variance * (scale * scale), median


@tf.function
def _group_sums(core):
    """Per 8-connected group of `core` (scipy's label order: its first pixel's raster
    position): coordinate sums and pixel count, whole numbers, exact."""
    height, width = core.shape
    roots = tf.reshape(detect._label_roots(core), [-1])  # H*W for background
    n = height * width
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.int64), tf.range(width, dtype=tf.int64),
                         indexing="ij")
    sums = tf.math.unsorted_segment_sum(
        tf.stack([tf.reshape(xs, [-1]), tf.reshape(ys, [-1]),
                  tf.ones([n], tf.int64)], -1), roots, n + 1)[:n]
    first = tf.where(sums[:, 2] > 0)[:, 0]  # each group's root: its first pixel, ascending
    return tf.gather(sums, first)


def _groups(core):
    """astro.saturated_groups, in TensorFlow: (x, y, pixels) of each group."""
    sums = _group_sums(core).numpy()
    count = sums[:, 2]
    return sums[:, 0] / count, sums[:, 1] / count, count


def _header_float(header, key, default) -> float:
    return float(header.get(key, default))


def calibrate_ccd(ccd: astro.CcdInput, workdir: str, params: astro.AstroParams):
    """One CCD, as the reference's calibrate_kernel: (key, calexp path or None, facts)."""
    with fitsio.open_fits(ccd.path) as hdul:  # headers only; the pixels come via tf.data
        primary = hdul[0].header.copy()
        image_header = hdul["IMAGE"].header.copy()
        bits = fitsio.with_default_planes(fitsio.mask_bits(hdul["MASK"].header))
    planes = io.fits_planes(ccd.path)
    image, mask, variance = io.read_planes([planes[name] for name in fitsio.PLANES])
    # as the reference reads them: float32, int32, float32
    image, mask = tf.cast(image, tf.float32), tf.cast(mask, tf.int32)
    variance = tf.cast(variance, tf.float32)

    def bit(names):
        return tf.constant(fitsio.bits_value(bits, names), tf.int32)

    # the saturated stars the detect step keeps: groups labelled in TensorFlow, their
    # few rows put on the sky by the reference's own function
    core = (mask & bit(["SAT"])) != 0
    groups = _groups(core) if bool(tf.reduce_any(core)) else astro.saturated_groups(
        np.zeros((1, 1), dtype=bool))
    stars = astro.saturated_rows(*groups, image_header, ccd, params.saturation_grow)

    mask, unusable, n_usable, image, variance = _masks_and_fill(
        image, mask, variance, bit(["NO_DATA"]), bit(["SAT"]), bit(astro.UNUSABLE),
        int(params.saturation_grow))
    if int(n_usable) == 0:
        return ccd.key, None, {"reason": f"{ccd.path}: every pixel is masked"}

    # Cython's `float` parameters of detect_cosmics: the header values rounded to float32.
    def f32(value):
        return tf.constant(np.float32(value))

    crmask, mask, cr_pixels = _cosmic_rays(
        image, variance, unusable, mask, bit(["CR"]),
        f32(_header_float(primary, "GAIN", 1.0)),
        f32(_header_float(primary, "SATURATE", np.inf)), f32(params.cr_sigclip),
        f32(params.cr_sigfrac), f32(params.cr_objlim), int(params.cr_niter))
    try:
        background = detect.background_2d(
            image, params.background_box, mask=unusable | crmask,
            filter_size=params.background_filter,
            exclude_percentile=params.background_exclude_percentile,
            sigma=params.background_clip_sigma)
    except ValueError as exc:  # photutils' words: too few unmasked pixels in every box
        return ccd.key, None, {"reason": f"{ccd.path}: no background estimate "
                                         f"({str(exc).splitlines()[0]})"}
    image, variance, background_median = _flux_scale(
        image, variance, background, f32(_header_float(primary, "FLUXSCAL", 1.0)))
    path = Path(workdir) / "calexp" / f"v{ccd.visit:04d}_c{ccd.ccd:03d}.fits"
    fitsio.write_planes(path, primary, {
        "IMAGE": (image.numpy(), image_header),
        "MASK": (mask.numpy(), fitsio.mask_header(bits)),
        "VARIANCE": (variance.numpy(), None)})
    return ccd.key, str(path), {"cosmic_ray_pixels": int(cr_pixels),
                                "background_median": float(background_median),
                                "saturated": stars}


@native("calibrate", compiled=True)
def calibrate(engine, step, state, ctx, plan):
    """Every CCD of the plan, `engine.workers` at a time (TensorFlow releases the GIL
    while its graphs run, and one CCD's host work, reading headers and writing the calexp,
    overlaps another's compute), combined by the plan as the reference's results are."""
    workdir, params = plan.shared["workdir"], plan.shared["params"]
    total = len(plan.partitions)
    results = []
    with ThreadPoolExecutor(max(1, min(engine.workers, total))) as pool:
        for done, result in enumerate(pool.map(
                lambda ccd: calibrate_ccd(ccd, workdir, params), plan.partitions), 1):
            results.append(result)
            engine._report(step.name, done, total)
    return plan.combine(results)
