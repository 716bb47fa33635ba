"""TensorFlow's native neuroscience steps: each of `pipelines/neuro.py`'s five steps
re-expressed in TensorFlow operations, computing what dipy computes.

Volumes are read by `tf.data` (engines/tf/io.py) in file order, [z, y, x]; every method
below is symmetric in its three axes, so nothing is transposed until an output leaves.
What each step reproduces, and how exactly, is said beside it; the bounds the outputs are
held to are in `engines/tf/__init__.py`.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

from pipelines import nifti
from pipelines.errors import InputError

from ..base import native
from . import io

# Memory per batch of work, so that an HCP subject (145x174x145 voxels, 288 volumes)
# runs in bounded memory: the mask's thresholds, the denoiser's slabs.
WORK_BYTES = 256 * 2**20


def _volumes(engine, layout: io.NiftiLayout, indices, label: str):
    """(index, [z, y, x] float32 volume) for `indices`, checked as the reference checks
    them (no NaN or inf), with progress; a file that fails under tf.data is one line."""
    total = len(indices)
    try:
        for done, (k, volume, bad) in enumerate(layout.volumes(indices).prefetch(2), 1):
            io.check_finite(layout.path, k, bad)
            yield int(k), volume
            engine._report(label, done, total)
    except io.read_errors() as exc:
        raise InputError(f"{layout.path}: cannot read its volumes "
                         f"({str(exc).strip().splitlines()[0]})") from None


def _to_xyz(tensor) -> np.ndarray:
    """A [z, y, x] result as the [x, y, z] array the pipeline's state holds."""
    return tf.transpose(tensor).numpy()


# -- 1N mean b0 --------------------------------------------------------------------------

def _first_volume(state) -> tf.Tensor:
    x, y, z = state["shape"]
    return tf.zeros((z, y, x), tf.float32)


@native("mean_b0", compiled=True, follows=())
def mean_b0(engine, step, state, ctx, plan):
    """The b0 volumes summed in float64, over their count, rounded to float32: as the
    reference's kernels (the sum of a few float32 values in float64 is exact, so the order
    of summation does not matter)."""
    layout = io.NiftiLayout.of(state["dwi"])
    index = state["b0_index"]
    total = None
    for _, volume in _volumes(engine, layout, index, step.name):
        volume = tf.cast(volume, tf.float64)
        total = volume if total is None else total + volume
    return {"mean_b0": _to_xyz(tf.cast(total / len(index), tf.float32))}


# -- 1N brain mask: dipy's median_otsu, exactly ----------------------------------------------
#
# median_otsu median-filters the mean b0 `numpass` times (a (2r+1)^3 window, scipy's
# 'reflect' borders), thresholds at dipy's Otsu of the filtered image's 256-bin histogram,
# and dilates. The mask needs no filtered *values*, only comparisons of them with
# thresholds, and for a threshold T a window's median exceeds T exactly when more than
# half its values do: so "filtered > T" for every voxel is a count of (v > T) over each
# window, numpass times over — box sums of 0/1 images, separable, no sorting. The
# histogram's range (the filtered image's min and max, which are values of the image) is
# found by bisection over the image's sorted values, its 256 bin counts by counting at the
# 255 inner edges, and the mask is "filtered > Otsu's threshold". Exact, and no median is
# ever sorted out.

def _reflect_index(n: int, r: int) -> tf.Tensor:
    """Indices of an axis of length n extended by r on each side, scipy 'reflect'
    (d c b a | a b c d | d c b a), for any r."""
    i = tf.range(-r, n + r)
    m = tf.math.floormod(i, 2 * n)
    return tf.where(m >= n, 2 * n - 1 - m, m)


def _reflect(t: tf.Tensor, r: int, axis: int) -> tf.Tensor:
    """`t` extended by r along `axis`, scipy 'reflect' (d c b a | a b c d | d c b a)."""
    n = t.shape[axis]
    if r <= n:  # TensorFlow's SYMMETRIC padding is that, for up to n planes
        pad = [[0, 0]] * len(t.shape)
        pad[axis] = [r, r]
        return tf.pad(t, pad, mode="SYMMETRIC")
    return tf.gather(t, _reflect_index(n, r), axis=axis)


def _planes(t: tf.Tensor, axis: int, start: int, size: int) -> tf.Tensor:
    index = [slice(None)] * len(t.shape)
    index[axis] = slice(start, start + size)
    return t[tuple(index)]


def _box_sum(t: tf.Tensor, w: int, axis: int) -> tf.Tensor:
    """Sums of w consecutive planes along `axis`, from sums of 1, 2, 4... planes: a 9-wide
    window is 4 additions, all of which XLA fuses."""
    n = t.shape[axis] - w + 1
    sums, width = {1: t}, 1
    while 2 * width <= w:
        s = sums[width]
        m = s.shape[axis] - width
        sums[2 * width] = _planes(s, axis, 0, m) + _planes(s, axis, width, m)
        width *= 2
    total, start = None, 0
    for width in sorted(sums, reverse=True):
        if start + width <= w:
            part = _planes(sums[width], axis, start, n)
            total = part if total is None else total + part
            start += width
    return total


def _window_counts(ind: tf.Tensor, r: int) -> tf.Tensor:
    """[K, a, b, c] 0/1 -> how many ones each (2r+1)^3 window holds, reflect borders."""
    for axis in (1, 2, 3):
        ind = _box_sum(_reflect(ind, r, axis), 2 * r + 1, axis)
    return ind


def _filtered_compare(image, thresholds, strict, radius: int, numpass: int):
    """[K, a, b, c] bool: whether the image, median-filtered `numpass` times, is > each
    threshold (where `strict`) or >= it. A window's median is its (w^3 // 2 + 1)-th
    largest value, so it is > T (>= T) exactly when at least w^3 // 2 + 1 of the window's
    values are. Counts are int16: a window holds fewer than 2^15 values up to radius 15."""
    majority = (2 * radius + 1) ** 3 // 2 + 1
    t, strict = thresholds[:, None, None, None], strict[:, None, None, None]
    ind = tf.cast(tf.where(strict, image[None] > t, image[None] >= t), tf.int16)
    for _ in range(numpass):
        ind = tf.cast(_window_counts(ind, radius) >= majority, tf.int16)
    return tf.cast(ind, tf.bool)


@functools.lru_cache(maxsize=None)
def _compare_fn(radius: int, numpass: int):
    # Made once per setting: each call of a new tf.function traces and compiles anew.
    # XLA fuses the paddings, sums and comparisons into a few loops.
    return tf.function(lambda image, t, strict: _filtered_compare(image, t, strict, radius,
                                                                  numpass),
                       jit_compile=True)


class _MedianCounts:
    """Counts of the filtered image against thresholds, in batches that fit WORK_BYTES."""

    def __init__(self, image: tf.Tensor, radius: int, numpass: int):
        if (2 * radius + 1) ** 3 >= 2**15:
            raise InputError(f"median radius {radius} is too large (at most 15)")
        self.image = image
        self.fn = _compare_fn(radius, numpass)
        padded = np.prod([n + 2 * radius for n in image.shape])
        self.batch = int(max(2, min(64, WORK_BYTES // (8 * padded))))

    def compare(self, thresholds: tf.Tensor, strict) -> tf.Tensor:
        """[K, a, b, c] bool, filtered > (where strict) or >= each threshold."""
        strict = tf.broadcast_to(tf.constant(strict), thresholds.shape)
        return self.fn(self.image, thresholds, strict)

    def count(self, thresholds: tf.Tensor, strict=False) -> tf.Tensor:
        """[K] int64: voxels whose filtered value is > (where strict) or >= each
        threshold."""
        k = int(thresholds.shape[0])
        strict = tf.broadcast_to(tf.constant(strict), [k])
        size = 2 if k <= 2 else self.batch  # two shapes: two compilations
        pad = -k % size
        thresholds = tf.concat([thresholds, tf.repeat(thresholds[-1:], pad)], 0)
        strict = tf.concat([strict, tf.repeat(strict[-1:], pad)], 0)
        parts = [tf.math.count_nonzero(self.fn(self.image, thresholds[i:i + size],
                                               strict[i:i + size]), axis=(1, 2, 3))
                 for i in range(0, k, size)]
        return tf.concat(parts, 0)[:k]

    def extremes(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The filtered image's min and max: values of the image (a median is one of its
        window's values), found by bisection over the image's sorted values, both at once."""
        values = tf.sort(tf.reshape(self.image, [-1]))
        n = self.image.shape.num_elements()
        lo_min, hi_min = 0, n - 1  # smallest j with some filtered value <= values[j]
        lo_max, hi_max = 0, n - 1  # largest j with some filtered value >= values[j]
        while lo_min < hi_min or lo_max < hi_max:
            mid_min, mid_max = (lo_min + hi_min) // 2, (lo_max + hi_max + 1) // 2
            above_min, at_max = self.count(tf.stack([values[mid_min], values[mid_max]]),
                                           strict=[True, False]).numpy()
            if above_min < n:
                hi_min = mid_min
            else:
                lo_min = mid_min + 1
            if at_max > 0:
                lo_max = mid_max
            else:
                hi_max = mid_max - 1
        return values[lo_min], values[lo_max]


def _histogram_edges(first: tf.Tensor, last: tf.Tensor, bins: int) -> tf.Tensor:
    """np.histogram's bin edges for float32 data: np.linspace in float32, the range
    widened by 0.5 each side when it is empty (numpy's _get_outer_edges), and its refusal
    of a range too narrow for `bins` distinct edges."""
    if bool(first == last):
        first, last = first - 0.5, last + 0.5
    delta = last - first
    step = delta / bins
    steps = tf.range(bins + 1, dtype=tf.float32)
    # linspace divides first when the step underflows to zero (denormal ranges)
    edges = (steps * step if bool(step != 0) else steps / bins * delta) + first
    edges = tf.concat([edges[:-1], last[None]], 0)  # linspace puts `stop` last exactly
    if not bool(tf.reduce_all(edges[:-1] < edges[1:])):
        raise InputError(f"the filtered mean b0 image spans [{float(first)}, "
                         f"{float(last)}]: too narrow for {bins} histogram bins")
    return edges


def _dipy_otsu(counts: tf.Tensor, edges: tf.Tensor) -> tf.Tensor:
    """dipy.segment.threshold.otsu on a histogram: float64 cumulative sums, the first
    maximum of the between-class variance, and the *left edge* of its bin (dipy names
    np.histogram's edges bin_centers)."""
    hist = tf.cast(counts, tf.float64)
    upper = tf.cast(edges[1:], tf.float64)
    weight1 = tf.cumsum(hist)
    weight2 = tf.reverse(tf.cumsum(tf.reverse(hist, [0])), [0])
    mean1 = tf.cumsum(hist * upper) / weight1
    mean2 = tf.reverse(tf.cumsum(tf.reverse(hist * upper, [0])) / tf.reverse(weight2, [0]),
                       [0])
    variance = weight1[:-1] * weight2[1:] * tf.square(mean1[:-1] - mean2[1:])
    # np.argmax: the first maximum, and a NaN (an empty class's 0/0) beats any number
    nan = tf.math.is_nan(variance)
    best = nan if bool(tf.reduce_any(nan)) else tf.equal(variance, tf.reduce_max(variance))
    return edges[tf.reduce_min(tf.where(best))]


def _dilate(mask: tf.Tensor, iterations: int) -> tf.Tensor:
    """scipy.ndimage.binary_dilation with the 6-neighbour cross, zero borders;
    iterations < 1 repeats until nothing changes, as scipy does."""
    def once(m):
        p = tf.pad(m, [[1, 1]] * 3)
        return (m | p[:-2, 1:-1, 1:-1] | p[2:, 1:-1, 1:-1] | p[1:-1, :-2, 1:-1]
                | p[1:-1, 2:, 1:-1] | p[1:-1, 1:-1, :-2] | p[1:-1, 1:-1, 2:])
    if iterations >= 1:
        for _ in range(iterations):
            mask = once(mask)
        return mask
    while True:
        grown = once(mask)
        if bool(tf.reduce_all(grown == mask)):
            return mask
        mask = grown


def median_otsu_mask(image: tf.Tensor, radius: int, numpass: int, dilate) -> tf.Tensor:
    """dipy's median_otsu mask (with dipy's own Otsu: the reference's pin) of an image."""
    counts = _MedianCounts(tf.convert_to_tensor(image, tf.float32), radius, numpass)
    first, last = counts.extremes()
    edges = _histogram_edges(first, last, 256)
    # bin i holds edges[i] <= v < edges[i+1], the last bin also v == edges[256]: the
    # assignment np.histogram's corrected bin indices give.
    at_least = counts.count(edges[1:-1])
    n = tf.cast(tf.size(image), tf.int64)
    ge = tf.concat([[n], at_least, [0]], 0)
    hist = tf.concat([ge[:-2] - ge[1:-1], ge[-2:-1]], 0)
    threshold = _dipy_otsu(hist, edges)
    mask = counts.compare(tf.repeat(threshold[None], 2), strict=True)[0]
    return mask if dilate is None else _dilate(mask, dilate)


def prepare_brain_mask(engine, state, ctx):
    p = ctx.params
    median_otsu_mask(state["mean_b0"], p.median_radius, p.numpass, p.dilate)


@native("brain_mask", compiled=True, follows=())
def brain_mask(engine, step, state, ctx, plan):
    p = ctx.params
    mask = median_otsu_mask(state["mean_b0"], p.median_radius, p.numpass, p.dilate)
    return plan.combine([mask.numpy()])  # the reference's check of an empty mask


# -- 2N noise sigma: dipy's estimate_sigma (N=0, no background masking) --------------------

@tf.function(jit_compile=True)
def _estimate_sigma(volume):
    """estimate_sigma's arithmetic, op for op in float64: the 6-neighbour sum (scipy
    'reflect' borders; a sum of six float32 values is exact in float64, in any order),
    sqrt(6/7) * (v - sum / 6), the root mean square, rounded to float32 as dipy stores it.
    A different order of the mean's sum (or a fused multiply-add) moves the float64 result
    by ulps that the rounding to float32 removes."""
    v = tf.cast(volume, tf.float64)
    p = tf.pad(v, [[1, 1]] * 3, mode="SYMMETRIC")
    neighbours = (p[:-2, 1:-1, 1:-1] + p[2:, 1:-1, 1:-1] + p[1:-1, :-2, 1:-1]
                  + p[1:-1, 2:, 1:-1] + p[1:-1, 1:-1, :-2] + p[1:-1, 1:-1, 2:])
    block = math.sqrt(6 / 7) * (v - 1 / 6 * neighbours)
    return tf.cast(tf.sqrt(tf.reduce_mean(block * block)), tf.float32)


def prepare_noise_sigma(engine, state, ctx):
    _estimate_sigma(_first_volume(state))


@native("noise_sigma", compiled=True, follows=())
def noise_sigma(engine, step, state, ctx, plan):
    p = ctx.params
    if p.sigma_coils != 0 or not p.sigma_background_masking:
        raise InputError("the TensorFlow engine estimates sigma as the study did (N=0, "
                         "background masking on); other settings are the reference's")
    layout = io.NiftiLayout.of(state["dwi"])
    sigmas = [float(_estimate_sigma(volume)) for _, volume in
              _volumes(engine, layout, range(state["n_volumes"]), step.name)]
    return plan.combine([sigmas])  # the reference's check that every sigma is positive


# -- 2N denoise: dipy's classic non-local means -------------------------------------------
#
# dipy (denspeed.pyx, nlmeans_3d_classic) pads the volume by the block radius B (reflect),
# and for every masked voxel weighs each patch (radius P) centred within B - P of it by
# exp(-(mean squared patch difference) / (sqrt(2) * sigma^2)), then returns
# sqrt(sum(w x^2) / sum(w) - 2 sigma^2) (Rician), 0 below, and 0 outside the mask. Here
# the same sums run as shifted differences over the (2(B-P)+1)^3 offsets, each squared
# difference box-summed over the patch: every voxel of a slab at once, XLA-compiled.

@functools.lru_cache(maxsize=None)
def _nlmeans_fn(dtype, patch: int, block: int, rician: bool):
    search = block - patch
    side = 2 * search + 1
    patch_size = (2 * patch + 1) ** 3

    def box(d):  # sum over each (2 patch + 1)^3 patch, separably
        w = 2 * patch + 1
        n = d.shape[0] - 2 * patch
        d = sum(d[s:s + n] for s in range(w))
        n = d.shape[1] - 2 * patch
        d = sum(d[:, s:s + n] for s in range(w))
        n = d.shape[2] - 2 * patch
        return sum(d[:, :, s:s + n] for s in range(w))

    def inner(t, r):  # t without r planes on each side of each axis
        return t[r:t.shape[0] - r, r:t.shape[1] - r, r:t.shape[2] - r]

    @tf.function(jit_compile=True)
    def nlmeans(padded, mask, sigma, denom):
        """padded: the slab and its `block` margins; mask: the slab's; -> denoised slab."""
        centre = inner(padded, search)
        core = inner(padded, block)
        shape = centre.shape.as_list()  # static, so every slice keeps its shape

        def offset(i, num, den):
            # One (dx, dy) per iteration, the `side` dz offsets unrolled: a small loop
            # body XLA vectorises, and a graph that compiles in about a second.
            for dz in range(side):
                moved = tf.slice(padded, tf.stack([i // side, i % side, dz]), shape)
                diff = centre - moved
                w = tf.exp(-(box(diff * diff) / patch_size) / tf.cast(denom, dtype))
                x = inner(moved, patch)
                # The sums over offsets stay float64 in either precision: in float32 the
                # Rician step below would subtract two nearly equal rounded sums.
                num = num + tf.cast(w * x * x, tf.float64)
                den = den + tf.cast(w, tf.float64)
            return i + 1, num, den

        zero = tf.zeros(core.shape, tf.float64)
        _, num, den = tf.while_loop(lambda i, *_: i < side * side, offset, (0, zero, zero))
        value = num / den
        if rician:
            value = tf.maximum(value - 2 * sigma * sigma, 0)
        return tf.where(mask, tf.sqrt(value), tf.zeros_like(value))

    return nlmeans


def _dipy_padding(n: int, pad: int) -> list[int]:
    """dipy's add_padding_reflection indices along an axis (denspeed.correspond_indices),
    negative ones wrapping as numpy's do."""
    index = np.hstack((np.arange(1, pad + 1)[::-1], np.arange(n),
                       np.arange(n - pad - 1, n - 1)[::-1]))
    return [int(i) % n for i in index]


def _slabs(start: int, stop: int, depth: int) -> list[int]:
    """Starts of slabs of `depth` planes covering [start, stop): all of one depth, so XLA
    compiles once; the last one overlaps its neighbour (its voxels come out the same)."""
    if stop - start <= depth:
        return [start]
    return list(range(start, stop - depth, depth)) + [stop - depth]


class _Denoiser:
    """dipy's classic nlmeans for every volume of one image with one mask."""

    def __init__(self, engine, mask_zyx: np.ndarray, params):
        self.params = params
        self.block = params.block_radius
        self.fn = _nlmeans_fn(engine.dtype, params.patch_radius, params.block_radius,
                              params.rician)
        self.dtype = engine.dtype
        self.shape = mask_zyx.shape
        self.mask = tf.constant(mask_zyx)
        # Only the mask's bounding box is computed: dipy skips unmasked voxels too.
        found = tf.where(self.mask)
        if found.shape[0] == 0:  # an empty mask: one voxel, which comes out 0
            found = tf.zeros((1, 3), tf.int64)
        lows, highs = tf.reduce_min(found, 0).numpy(), tf.reduce_max(found, 0).numpy()
        self.box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(lows, highs))
        plane = np.prod([s.stop - s.start + 2 * self.block for s in self.box[1:]])
        # Each slab voxel holds a few dozen values of `dtype` at once in the loop body.
        per_plane = plane * 48 * self.dtype.size
        self.depth = int(max(1, WORK_BYTES // per_plane))
        self.index = [tf.constant(_dipy_padding(n, self.block)) for n in self.shape]

    def denoise(self, volume: tf.Tensor, sigma: float) -> tf.Tensor:
        b = self.block
        padded = tf.cast(volume, self.dtype)
        for axis, index in enumerate(self.index):
            padded = tf.gather(padded, index, axis=axis)
        # dipy sums sigma over the patch (27 values in a row) and divides: the same
        # float64 operations, once per volume since sigma is the same everywhere.
        patch_size = (2 * self.params.patch_radius + 1) ** 3
        total = 0.0
        for _ in range(patch_size):
            total += sigma
        denom = math.sqrt(2) * (total / patch_size) ** 2
        zs, ys, xs = self.box
        depth = min(self.depth, zs.stop - zs.start)
        pieces, done = [], zs.start
        for z in _slabs(zs.start, zs.stop, depth):
            out = self.fn(padded[z:z + depth + 2 * b, ys.start:ys.stop + 2 * b,
                                 xs.start:xs.stop + 2 * b],
                          self.mask[z:z + depth, ys, xs],
                          tf.constant(sigma, tf.float64), tf.constant(denom, tf.float64))
            pieces.append(out[done - z:])  # an overlapping last slab: its new planes only
            done = z + depth
        inner = tf.concat(pieces, 0)
        pad = [[s.start, n - s.stop] for s, n in zip(self.box, self.shape)]
        return tf.cast(tf.pad(inner, pad), tf.float32)


def prepare_denoise(engine, state, ctx):
    denoiser = _Denoiser(engine, np.ascontiguousarray(state["mask"].T), ctx.params)
    denoiser.denoise(_first_volume(state), 1.0)


@native("denoise", compiled=True, follows=("patch_radius", "block_radius", "rician"))
def denoise(engine, step, state, ctx, plan):
    p = ctx.params
    if p.nlmeans_method != "classic":
        raise InputError(f"the TensorFlow engine runs dipy's classic non-local means, "
                         f"not {p.nlmeans_method!r}")
    denoiser = _Denoiser(engine, np.ascontiguousarray(state["mask"].T), p)
    layout = io.NiftiLayout.of(state["dwi"])
    out = plan.combine([])["denoised"]  # the file the plan made, for workers to fill
    for k, volume in _volumes(engine, layout, range(state["n_volumes"]), step.name):
        result = denoiser.denoise(volume, float(state["sigma"][k]))
        nifti.write_volume(out, k, result.numpy().T)  # [x, y, z] view of [z, y, x]
    return {"denoised": out}


# -- 3N DTI fit: dipy's WLS tensor fit, FA and MD -------------------------------------------
#
# dipy (dti.wls_fit_tensor): the log of the signal floored at min_signal, an OLS fit whose
# predicted signal w weighs each measurement, the WLS solution pinv(X w) (w log s), the
# tensor's eigenvalues (descending, floored at 1e-6 / max|X|), FA and MD. Every sum in it
# runs over the volumes, so the volumes are streamed, twice, in one sequential read each:
# the first pass sums the OLS fit (pinv(X) log s), the second the WLS normal equations
# (X' w^2 X, X' w^2 log s: 28 + 7 sums per voxel), with the design's columns scaled to
# unit norm so that they stay well conditioned. Then one Cholesky solve per voxel, all in
# float64. Memory: 42 float64 sums per brain voxel (0.8 GB for an HCP subject), never the
# image.

VOLUMES_PER_BATCH = 8  # volumes summed per call: fewer calls, little memory


def design_matrix(bvals, bvecs) -> tf.Tensor:
    """dipy.reconst.dti.design_matrix, op for op (so, bit for bit)."""
    b = tf.constant(bvals, tf.float64)
    g = tf.constant(bvecs, tf.float64)
    x, y, z = g[:, 0], g[:, 1], g[:, 2]
    columns = [x * x * 1.0 * b, x * y * 2.0 * b, y * y * 1.0 * b, x * z * 2.0 * b,
               y * z * 2.0 * b, z * z * 1.0 * b, tf.ones_like(b)]
    return -tf.stack(columns, axis=1)


_UPPER = [(i, j) for i in range(7) for j in range(i, 7)]  # the 28 sums of X' w^2 X
_SYMMETRIC = [_UPPER.index((min(i, j), max(i, j))) for i in range(7) for j in range(7)]


@functools.lru_cache(maxsize=None)
def _fit_fns(min_signal: float):
    # The signal of a batch of volumes at the brain voxels: [n voxels, batch] float32.
    signal_spec = tf.TensorSpec([None, None], tf.float32)
    design_spec = tf.TensorSpec([None, 7], tf.float64)

    def log_signal(signal):
        # dipy takes the log of the float32 signal in float32, and so does this.
        return tf.cast(tf.math.log(tf.maximum(signal, min_signal)), tf.float64)

    @tf.function(input_signature=[signal_spec, design_spec, tf.TensorSpec([None, 7], tf.float64)])
    def ols_sums(signal, pinv_rows, total):
        """total + the batch's share of pinv(X) log s; pinv_rows: pinv(X)' of the batch."""
        return total + tf.matmul(log_signal(signal), pinv_rows)

    @tf.function(input_signature=[signal_spec, design_spec, design_spec,
                                  tf.TensorSpec([None, 7], tf.float64),
                                  tf.TensorSpec([None, 28], tf.float64),
                                  tf.TensorSpec([None, 7], tf.float64)])
    def wls_sums(signal, design_rows, scaled_rows, ols, normal, rhs):
        """normal, rhs + the batch's share of X' w^2 X (upper triangle) and X' w^2 log s,
        w the OLS fit's predicted signal (scaled design columns)."""
        w2 = tf.square(tf.exp(tf.matmul(ols, design_rows, transpose_b=True)))
        pairs = tf.stack([scaled_rows[:, i] * scaled_rows[:, j] for i, j in _UPPER], 1)
        return (normal + tf.matmul(w2, pairs),
                rhs + tf.matmul(w2 * log_signal(signal), scaled_rows))

    @tf.function(input_signature=[tf.TensorSpec([None, 28], tf.float64),
                                  tf.TensorSpec([None, 7], tf.float64),
                                  tf.TensorSpec([7], tf.float64), tf.TensorSpec([], tf.float64)])
    def fa_md(normal, rhs, scale, min_diffusivity):
        """Solve each voxel's normal equations; FA and MD of its tensor, as dipy."""
        full = tf.reshape(tf.gather(normal, _SYMMETRIC, axis=1), [-1, 7, 7])
        beta = tf.linalg.cholesky_solve(tf.linalg.cholesky(full), rhs[..., None])[..., 0]
        # A singular system (no voxel of the datasets has one) gets the pseudo-inverse's
        # least-squares answer, as dipy's pinv gives it, rather than NaN.
        bad = tf.where(~tf.reduce_all(tf.math.is_finite(beta), axis=1))
        fixed = tf.linalg.matvec(tf.linalg.pinv(tf.gather_nd(full, bad)), tf.gather_nd(rhs, bad))
        beta = tf.tensor_scatter_nd_update(beta, bad, fixed)
        d = beta / scale
        tensor = tf.stack([tf.stack([d[:, 0], d[:, 1], d[:, 3]], -1),
                           tf.stack([d[:, 1], d[:, 2], d[:, 4]], -1),
                           tf.stack([d[:, 3], d[:, 4], d[:, 5]], -1)], -2)
        evals = tf.maximum(tf.reverse(tf.linalg.eigvalsh(tensor), [-1]), min_diffusivity)
        ev1, ev2, ev3 = evals[:, 0], evals[:, 1], evals[:, 2]
        all_zero = tf.cast(tf.reduce_all(evals == 0, axis=-1), tf.float64)
        fa = tf.sqrt(0.5 * (tf.square(ev1 - ev2) + tf.square(ev2 - ev3)
                            + tf.square(ev3 - ev1))
                     / (ev1 * ev1 + ev2 * ev2 + ev3 * ev3 + all_zero))
        return fa, (ev1 + ev2 + ev3) / 3

    return ols_sums, wls_sums, fa_md


def prepare_fit_tensor(engine, state, ctx):
    ols_sums, wls_sums, fa_md = _fit_fns(ctx.params.min_signal)
    signal, rows = tf.ones((1, 2)), tf.ones((2, 7), tf.float64)
    sums7, sums28 = tf.zeros((1, 7), tf.float64), tf.zeros((1, 28), tf.float64)
    ols_sums(signal, rows, sums7)
    wls_sums(signal, rows, rows, sums7, sums28, sums7)
    identity = tf.constant([[float(i == j) for i, j in _UPPER]], tf.float64)
    fa_md(identity, sums7, tf.ones(7, tf.float64), tf.constant(1e-9, tf.float64))


@native("fit_tensor", compiled=True, follows=("b0_threshold", "min_signal"))
def fit_tensor(engine, step, state, ctx, plan):
    p = ctx.params
    if p.fit_method.upper() not in ("WLS", "WLLS"):
        raise InputError(f"the TensorFlow engine fits the tensor by WLS, not "
                         f"{p.fit_method!r}")
    ols_sums, wls_sums, fa_md = _fit_fns(p.min_signal)
    design = design_matrix(state["bvals"], state["bvecs"])
    scale = tf.norm(design, axis=0)
    scaled = design / scale
    pinv_t = tf.transpose(tf.linalg.pinv(design))  # dipy's pinv(X), as rows per volume
    layout = io.NiftiLayout.of(state["denoised"])
    where = tf.where(np.ascontiguousarray(state["mask"].T))  # brain voxels, [z, y, x]
    n_volumes = layout.shape[3]
    ols = tf.zeros((where.shape[0], 7), tf.float64)
    normal = tf.zeros((where.shape[0], 28), tf.float64)
    rhs = tf.zeros((where.shape[0], 7), tf.float64)

    def batches(label):
        volumes = layout.volumes(range(n_volumes)).batch(VOLUMES_PER_BATCH).prefetch(1)
        try:
            for ks, batch, _ in volumes:  # a fit reads what denoise wrote: NaN-free
                signal = tf.transpose(tf.gather_nd(tf.transpose(batch, (1, 2, 3, 0)), where))
                yield ks, tf.transpose(signal)
                engine._report(label, int(ks[-1]) + 1, n_volumes)
        except io.read_errors() as exc:
            raise InputError(f"{layout.path}: cannot read its volumes "
                             f"({str(exc).strip().splitlines()[0]})") from None

    for ks, signal in batches(f"{step.name} (OLS)"):
        ols = ols_sums(signal, tf.gather(pinv_t, ks), ols)
    for ks, signal in batches(f"{step.name} (WLS)"):
        normal, rhs = wls_sums(signal, tf.gather(design, ks), tf.gather(scaled, ks), ols,
                               normal, rhs)
    fa, md = fa_md(normal, rhs, scale, 1e-6 / -tf.reduce_min(design))
    x, y, z = state["shape"]
    return {name: _to_xyz(tf.scatter_nd(where, tf.cast(value, tf.float32), (z, y, x)))
            for name, value in (("fa", fa), ("md", md))}
