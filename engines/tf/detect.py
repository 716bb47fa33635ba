"""TensorFlow's native detect step (4A): the reference's `detect_kernel` (pipelines/astro.py)
re-expressed in TensorFlow operations, decision for decision.

Per coadd patch (`_patch_graph`; the heavy parts XLA-compiled):
1. the background of photutils' `Background2D` (`background_2d`, also used by the
   calibrate step): astropy's sigma clipping of each box, the SourceExtractor estimator
   in numpy's own arithmetic, boxes with too few pixels excluded and filled by
   photutils' inverse-distance weighting (which takes its 10 neighbours from scipy's
   cKDTree, emulated: see `_kdtree_query`), the 3x3 median filter of the mesh, scipy's
   cubic-spline zoom (two small matrices), clipped; where photutils raises, the
   reference's fallback (the sigma-clipped median);
2. the matched filter: scipy's `correlate1d` (zero padding) of the background-subtracted
   image with the Gaussian, of the variance with its square, in scipy's summation order;
3. photutils' `detect_sources`: pixels strictly above the threshold, 8-connected
   components by min-label propagation with pointer jumping, numbered as
   `scipy.ndimage.label` numbers them (by the raster position of each component's first
   pixel), components under `n_pixels` dropped and the rest renumbered;
4. photutils' `SourceCatalog` columns: centroid (first moments of the filtered image),
   segment flux, its error, area; the source kept where its centroid is in the patch's
   inner region; sky position through the patch's STG projection (wcslib's formulas).

Everything on pixels is TensorFlow; the host parses WCS keywords, builds constants that
depend only on shapes and parameters (the Gaussian taps, the zoom matrices), and turns
the final per-patch tensors into the catalog rows. The step computes in float64 whatever
`--tf-precision` says, as the reference does: its outputs are decisions (which pixels
pass a threshold), which float32 would flip.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import tensorflow as tf

from pipelines import astro

from ..base import native
from . import io

F64 = tf.float64
I32 = tf.int32


# == the background mesh: photutils.background.Background2D ==============================
#
# What the reference's calls of Background2D do (photutils 3.0, astropy 8.0, scipy 1.17,
# numpy 2.4):
# - pixels masked (mask | coverage_mask | not finite) are left out; the image is cut into
#   boxes of box_size (the last row/column of boxes may be partial); each box is sigma
#   clipped by astropy's C code in double (median centre, population std, at most
#   `maxiters` passes, bounds recomputed on the kept values; finally every value outside
#   the *last* bounds is rejected), except the corner box when both a partial row and a
#   partial column exist: that one goes through astropy's Python path (axis=None), numpy
#   statistics in the data's dtype, which keeps the values that survived every pass;
# - the SourceExtractor estimator per box, by numpy in the data's dtype: 2.5 median -
#   1.5 mean, the mean where the std is 0, the median where |mean - median| / std >= 0.3;
# - a box whose kept pixels number <= (1 - exclude_percentile / 100) * box pixels is
#   excluded (NaN); if every box is, photutils raises ValueError;
# - excluded boxes get photutils' ShepardIDWInterpolator value from the 10 nearest good
#   boxes (weights 1 / distance), then the mesh is median filtered (NaN outside), zoomed
#   with scipy.ndimage.zoom(order=3, mode='reflect', grid_mode=True), cropped, clipped to
#   the mesh's range; coverage-masked pixels get fill_value.
# What numpy computes in the data's dtype (float32 for calibrate's CCDs) is computed here
# the same way, its pairwise sums in its order (`_pairwise_sum`): the mesh has numpy's
# bits. What C computes in double is done in double, where only the summation order
# differs (a few units in the 16th digit; measured against photutils on float32 CCDs:
# the same bits; on the float64 coadds: within 5e-16 of the background's range).

SIGMA_CLIP_MAXITERS = 5  # astropy SigmaClip's default: both kernels pass SigmaClip(sigma=)
IDW_NEIGHBORS = 10  # Background2D._interpolate_grid's n_neighbors
KDTREE_LEAFSIZE = 10  # ShepardIDWInterpolator's (and cKDTree's) default leafsize


def background_2d(data, box_size, *, mask=None, coverage_mask=None, fill_value=0.0,
                  exclude_percentile=10.0, sigma=3.0, maxiters=SIGMA_CLIP_MAXITERS,
                  filter_size=3):
    """photutils' `Background2D(data, box_size, mask=mask, coverage_mask=coverage_mask,
    fill_value=fill_value, exclude_percentile=exclude_percentile,
    sigma_clip=SigmaClip(sigma=sigma, maxiters=maxiters), filter_size=filter_size)
    .background`, with the default SExtractorBackground estimator and zoom interpolator.

    data: a 2-D float32 or float64 tensor (or array); the result has its dtype, as
    photutils' has. mask, coverage_mask: 2-D bool, True where excluded (None: nothing).
    box_size, filter_size: int or (rows, cols). Raises ValueError where photutils does
    because every box is excluded. One graph per shape and options (traced once); inside
    another graph, call `background_2d_graph` instead.
    """
    data = tf.convert_to_tensor(data)
    shape = tuple(data.shape)
    mask = tf.zeros(shape, tf.bool) if mask is None else tf.convert_to_tensor(mask, tf.bool)
    coverage = (tf.zeros(shape, tf.bool) if coverage_mask is None
                else tf.convert_to_tensor(coverage_mask, tf.bool))
    if not 0 <= exclude_percentile <= 100:
        raise ValueError("exclude_percentile must be between 0 and 100 (inclusive)")
    if any(f % 2 == 0 for f in _pair(filter_size)):
        raise ValueError("filter_size must have an odd value for both axes")
    # photutils' other refusals, with its words (the calibrate step records them)
    finite = tf.math.is_finite(data)
    if not bool(tf.reduce_any(finite)):
        raise ValueError("Input data contains all non-finite (NaN or infinity) values. "
                         "Cannot compute a background.")
    if bool(tf.reduce_all(mask | coverage | ~finite)):
        raise ValueError("All input pixels are masked. Cannot compute a background.")
    run = _background_graph(_pair(box_size), _pair(filter_size), float(fill_value),
                            float(exclude_percentile), float(sigma), int(maxiters))
    background, ok = run(data, mask, coverage)
    if not bool(ok):
        box = np.minimum(np.array(_pair(box_size)), shape)
        threshold = (1 - (exclude_percentile / 100.0)) * np.prod(box)
        raise ValueError(f"All boxes contain <= {threshold} unmasked or finite pixels "
                         f"(self.box_size={box!r}, "
                         f"self.exclude_percentile={exclude_percentile!r}). Please check "
                         f'your data or increase "exclude_percentile" to allow more '
                         f"boxes to be included.")
    return background


@functools.lru_cache(maxsize=None)
def _background_graph(box, filt, fill_value, exclude_percentile, sigma, maxiters):
    @tf.function  # not jit-compiled itself: its sort runs in TensorFlow's own kernel
    def run(data, mask, coverage):
        return background_2d_graph(data, mask, coverage, box_size=box, filter_size=filt,
                                   fill_value=fill_value,
                                   exclude_percentile=exclude_percentile, sigma=sigma,
                                   maxiters=maxiters)
    return run


def background_2d_graph(data, mask, coverage, *, box_size, filter_size=3, fill_value=0.0,
                        exclude_percentile=10.0, sigma=3.0,
                        maxiters=SIGMA_CLIP_MAXITERS):
    """`background_2d` as ops for the caller's graph: (background, ok), where ok is False
    where photutils raises ValueError (then the background is fill_value everywhere).
    The boxes are sorted by `tf.sort` in the caller's graph (TensorFlow's CPU sort kernel
    is about twice as fast as XLA's), the rest is one XLA-compiled function."""
    height, width = data.shape
    # photutils clips the box to the image (as_pair's upper bound)
    box = (min(_pair(box_size)[0], height), min(_pair(box_size)[1], width))
    values = tf.cast(data, F64)
    bad = mask | coverage | ~tf.math.is_finite(values)
    groups = _box_groups(values, bad, box)
    ordered = [tf.sort(tf.where(b, tf.constant(np.inf, F64), v), axis=-1) for v, b in groups]
    mesh_to_image = _mesh_graph(data.dtype, (height, width), box, _pair(filter_size),
                                float(fill_value), float(exclude_percentile), float(sigma),
                                int(maxiters))
    return mesh_to_image(groups, ordered, coverage)


def _box_groups(values, bad, box):
    """The boxes as Background2D._calculate_stats hands them to numpy, each group a pair
    ([boxes, pixels] values, masked) with the pixels in numpy's memory order (which
    fixes the order of its sums): the whole boxes row by row within the box; the partial
    row of boxes below them and the partial column to their right column by column (its
    moveaxis/transpose); the corner box row by row."""
    height, width = values.shape
    by, bx = box
    nby, nbx = height // by, width // bx
    y1, x1 = nby * by, nbx * bx
    r, c = height - y1, width - x1

    def whole(t):
        return tf.reshape(tf.transpose(tf.reshape(t[:y1, :x1], [nby, by, nbx, bx]),
                                       [0, 2, 1, 3]), [nby * nbx, by * bx])

    def partial_row(t):
        return tf.reshape(tf.transpose(tf.reshape(t[y1:, :x1], [r, nbx, bx]), [1, 2, 0]),
                          [nbx, bx * r])

    def partial_column(t):
        return tf.reshape(tf.transpose(tf.reshape(t[:y1, x1:], [nby, by, c]), [0, 2, 1]),
                          [nby, c * by])

    def corner(t):
        return tf.reshape(t[y1:, x1:], [1, r * c])

    cut = [whole] + [partial_row] * (r > 0) + [partial_column] * (c > 0) \
        + [corner] * (r > 0 and c > 0)
    return [(f(values), f(bad)) for f in cut]


@functools.lru_cache(maxsize=None)
def _mesh_graph(dtype, shape, box, filter_size, fill_value, exclude_percentile, sigma,
                maxiters):
    """The XLA-compiled rest of Background2D, from the sorted boxes to the image."""
    height, width = shape
    by, bx = box
    nby, nbx = height // by, width // bx
    r, c = height % by, width % bx
    ny, nx = nby + (r > 0), nbx + (c > 0)
    rnd = _rounder(dtype)
    # numpy arrays here, constants of the graph below (this factory may first be called
    # while another graph is traced: a tensor made here would belong to that graph)
    ay, ax = _zoom_matrix(ny, by, height), _zoom_matrix(nx, bx, width)

    @tf.function(jit_compile=True)
    def run(groups, ordered, coverage):
        # astropy's C path clips every group but the corner box (the 4th, where there is
        # one), all at once: the shorter boxes padded with masked pixels, which sort last
        clipped = ordered[:3]
        longest = max(o.shape[-1] for o in clipped)
        lower, upper = _sigma_clip_bounds(
            tf.concat([tf.pad(o, [[0, 0], [0, longest - o.shape[-1]]],
                              constant_values=np.inf) for o in clipped], axis=0),
            sigma, maxiters)
        stats = []
        start = 0
        for k, ((v, b), o) in enumerate(zip(groups, ordered)):
            if k == 3:  # the corner box: astropy's Python path (axis=None)
                stats.append(_corner_box_statistics(v[0], b[0], o[0], sigma, maxiters,
                                                    dtype))
            else:
                rows = slice(start, start + o.shape[0])
                stats.append(_box_statistics(v, b, o, lower[rows], upper[rows], dtype))
                start += o.shape[0]
        mesh = _assemble([estimate for estimate, _ in stats], nby, nbx, r > 0, c > 0)
        n_kept = _assemble([kept for _, kept in stats], nby, nbx, r > 0, c > 0)
        threshold = (1 - exclude_percentile / 100.0) * (by * bx)
        mesh = tf.where(tf.cast(n_kept, F64) <= threshold, tf.constant(np.nan, F64), mesh)
        good = ~tf.math.is_nan(mesh)
        ok = tf.reduce_any(good)
        mesh = rnd(_idw_fill(mesh, good))
        mesh = rnd(_median_filter(mesh, filter_size))
        # scipy.ndimage.zoom, grid_mode=True, cropped to the image: its spline prefilter
        # and evaluation are both linear along each axis, so the zoom is A_y mesh A_x^T.
        background = rnd(tf.matmul(tf.matmul(tf.constant(ay), mesh), tf.constant(ax),
                                   transpose_b=True))
        background = tf.clip_by_value(background, tf.reduce_min(mesh), tf.reduce_max(mesh))
        background = tf.where(coverage | ~ok, tf.constant(fill_value, F64), background)
        return tf.cast(background, dtype), ok

    return run


def _assemble(parts, nby, nbx, has_row, has_col):
    """The mesh from its groups (whole boxes; partial row; partial column; corner)."""
    parts = list(parts)
    mesh = tf.reshape(parts.pop(0), [nby, nbx])
    row = parts.pop(0)[None] if has_row else None
    if has_col:
        mesh = tf.concat([mesh, parts.pop(0)[:, None]], axis=1)
        if has_row:
            row = tf.concat([row, tf.reshape(parts.pop(0), [1, 1])], axis=1)
    return mesh if row is None else tf.concat([mesh, row], axis=0)


def _pair(value):
    return (int(value), int(value)) if np.ndim(value) == 0 else tuple(int(v) for v in value)


def _rounder(dtype):
    """Round float64 values to `dtype` and back: where numpy holds a value in `dtype`."""
    if dtype == F64:
        return lambda t: t
    return lambda t: tf.cast(tf.cast(t, dtype), F64)


def _separate(product):
    """A product rounded on its own before it is added: XLA on CPU contracts a*b+c into
    one fused multiply-add (one rounding) where numpy and scipy's C round twice. A select
    the compiler cannot fold (NaN stays NaN) keeps the two operations apart."""
    return tf.where(product == product, product, tf.constant(np.nan, product.dtype))


def _box_statistics(values, bad, ordered, lower, upper, dtype):
    """Background2D's statistics of a group of boxes ([boxes, pixels]: values and mask in
    numpy's order, and sorted with masked pixels last as +inf) clipped by astropy's C
    path (axis=-1) to its last bounds: (SExtractor estimate as float64, pixels kept)."""
    # the C path rejects every value outside the last bounds (even one an earlier pass
    # rejected), comparing in double
    keep = ~bad & (values >= lower[:, None]) & (values <= upper[:, None])
    n_kept = _count(keep)
    first = _count(ordered < lower[:, None])
    median = _range_median(ordered, first, first + n_kept)
    mean, std = _numpy_mean_std(tf.cast(tf.where(keep, values, 0.0), dtype), keep, n_kept)
    return _sextractor(median, mean, std, dtype), n_kept


def _corner_box_statistics(values, bad, ordered, sigma, maxiters, dtype):
    """The corner box, which astropy clips on its Python path (axis=None): the values
    that survive every pass, compacted in raster order. ([1] estimate as float64, [1]
    pixels kept)."""
    first, stop = _clip_compacted(values, bad, ordered, sigma, maxiters, dtype)
    median = _range_median(ordered, first, stop)
    mean, std = _numpy_mean_std_compacted(
        values, _survivors(values, bad, ordered, first, stop), stop - first, dtype)
    return _sextractor(median, mean, std, dtype)[None], (stop - first)[None]


def _clip_compacted(values, bad, ordered, sigma, maxiters, dtype):
    """astropy's SigmaClip on its Python path (axis=None) of the 1-D values not `bad`:
    numpy's median and std (in the data's dtype) of the survivors give each pass's
    bounds, the survivors within them are kept, until nothing changes or `maxiters`
    passes. The survivors are ordered[first:stop]; returns (first, stop)."""
    first, stop = tf.constant(0, I32), _count(tf.math.is_finite(ordered))
    active = stop > 0
    for _ in tf.range(maxiters):  # a loop in the graph: its body is large
        median = tf.cast(_range_median(ordered, first, stop), dtype)
        _, std = _numpy_mean_std_compacted(values, _survivors(values, bad, ordered, first,
                                                              stop), stop - first, dtype)
        spread = _separate(std * tf.constant(sigma, dtype))
        lo, hi = tf.cast(median - spread, F64), tf.cast(median + spread, F64)
        inside = _in_range(ordered, first, stop)
        new_first = first + _count(inside & (ordered < lo))
        new_stop = stop - _count(inside & (ordered > hi))
        changed = new_stop - new_first != stop - first
        first, stop = tf.where(active, new_first, first), tf.where(active, new_stop, stop)
        active = active & changed
    return first, stop


def _survivors(values, bad, ordered, first, stop):
    """Which values (in raster order) are ordered[first:stop]: a range of sorted values
    is the interval between its ends, ties included."""
    low = tf.gather(ordered, tf.minimum(first, ordered.shape[0] - 1))
    high = tf.gather(ordered, tf.maximum(stop - 1, 0))
    return ~bad & (values >= low) & (values <= high) & (stop > first)


def _sextractor(median, mean, std, dtype):
    """SExtractorBackground's estimate, in numpy's arithmetic in the data's dtype: the
    mode 2.5 median - 1.5 mean; the mean where std is 0; the median where
    |mean - median| / std >= 0.3."""
    median = tf.cast(median, dtype)
    estimate = _separate(2.5 * median) - _separate(1.5 * mean)
    estimate = tf.where(std == 0, mean,
                        tf.where(tf.abs(mean - median) / std >= 0.3, median, estimate))
    return tf.cast(estimate, F64)


def _numpy_mean_std(x, keep, count):
    """np.nanmean and np.nanstd along the last axis of x (the data's dtype, 0 where not
    kept), as numpy computes them: pairwise sums of the whole rows, the division by the
    count in double, the deviations and their squares in x's dtype."""
    n = tf.cast(count, F64)
    mean = tf.cast(tf.cast(_pairwise_sum(x), F64) / n, x.dtype)
    deviation = tf.where(keep, x - mean[..., None], tf.zeros_like(x))
    variance = tf.cast(tf.cast(_pairwise_sum(_separate(deviation * deviation)), F64) / n,
                       x.dtype)
    return mean, tf.sqrt(variance)


def _numpy_mean_std_compacted(values, keep, count, dtype):
    """numpy's mean and std of values[keep] (a 1-D array of `count` values in raster
    order, as astropy's Python path compacts them), in the data's dtype."""
    size = values.shape[0]
    slot = tf.where(keep, tf.cumsum(tf.cast(keep, I32)) - 1, size)
    x = tf.scatter_nd(slot[:, None], tf.cast(tf.where(keep, values, 0.0), dtype),
                      [size + 1])[:size]
    n = tf.cast(count, F64)
    mean = tf.cast(tf.cast(_pairwise_sum_dynamic(x, count), F64) / n, dtype)
    live = tf.range(size) < count
    deviation = tf.where(live, x - mean, tf.zeros_like(x))
    squares = _separate(deviation * deviation)
    variance = tf.cast(tf.cast(_pairwise_sum_dynamic(squares, count), F64) / n, dtype)
    return mean, tf.sqrt(variance)


def _pairwise_sum(x):
    """np.add.reduce along the last axis, in numpy's order (pairwise_sum in numpy's
    loops_utils.h.src): runs of up to 128 values summed with 8 accumulators, then the
    rest one by one; longer runs split in two halves (the first a multiple of 8) summed
    alike and added. The split depends only on the length: the leaves of each length are
    summed together, then added up the tree."""
    def plan(start, n):  # numpy's recursion: a leaf (start, n) or a pair of subtrees
        if n <= 128:
            return (start, n)
        half = n // 2 - (n // 2) % 8
        return (plan(start, half), plan(start + half, n - half))

    def leaves(node):
        return [node] if isinstance(node[0], int) else leaves(node[0]) + leaves(node[1])

    tree = plan(0, x.shape[-1])
    sums = {}
    for length in sorted({n for _, n in leaves(tree)}):
        starts = [s for s, n in leaves(tree) if n == length]
        block = tf.stack([x[..., s:s + length] for s in starts], axis=-2)
        total = _block_sum(block)
        for i, s in enumerate(starts):
            sums[s] = total[..., i]

    def add_up(node):
        return sums[node[0]] if isinstance(node[0], int) else add_up(node[0]) + add_up(node[1])
    return add_up(tree)


def _block_sum(x):
    """numpy's sum of runs of at most 128 values (the last axis), batched."""
    n = x.shape[-1]
    if n < 8:
        total = tf.zeros_like(x[..., 0])
        for i in range(n):
            total = total + x[..., i]
        return total
    full = n - n % 8
    r = x[..., 0:8]
    for i in range(8, full, 8):
        r = r + x[..., i:i + 8]
    total = (((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3]))
             + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7])))
    for i in range(full, n):
        total = total + x[..., i]
    return total


def _pairwise_sum_dynamic(x, n):
    """`_pairwise_sum` of x[:n] (1-D), n known only at run time: numpy's recursion
    unrolled level by level (each level's nodes as vectors of starts and lengths), every
    node of every level summed as a block (used where it is short enough), the levels
    then combined bottom-up."""
    starts, lengths = [tf.zeros([1], I32)], [tf.reshape(n, [1])]
    longest = x.shape[0]
    while longest > 128:  # static: the longest node the next level can hold
        s, length = starts[-1], lengths[-1]
        half = length // 2 - (length // 2) % 8
        starts.append(tf.reshape(tf.stack([s, s + half], axis=1), [-1]))
        lengths.append(tf.reshape(tf.stack([half, length - half], axis=1), [-1]))
        longest = longest // 2 + 8
    blocks = tf.split(_block_sums(x, tf.concat(starts, 0), tf.concat(lengths, 0)),
                      [2 ** level for level in range(len(starts))])
    total = blocks[-1]
    for block, length in zip(reversed(blocks[:-1]), reversed(lengths[:-1])):
        total = tf.where(length <= 128, block, total[0::2] + total[1::2])
    return total[0]


def _block_sums(x, starts, lengths):
    """numpy's sum of x[s:s+l] for each node with l <= 128 (other nodes: anything)."""
    size = x.shape[0]
    offsets = tf.range(128)
    v = tf.gather(x, tf.clip_by_value(starts[:, None] + offsets, 0, size - 1))
    short = tf.zeros_like(v[:, 0])
    for i in range(7):
        short = tf.where(i < lengths, short + v[:, i], short)
    r = v[:, 0:8]
    full = lengths - lengths % 8
    for i in range(8, 128, 8):
        r = tf.where((i < full)[:, None], r + v[:, i:i + 8], r)
    total = (((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3]))
             + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7])))
    for j in range(7):
        rest = tf.gather(v, tf.minimum(full + j, 127), batch_dims=1)
        total = tf.where(full + j < lengths, total + rest, total)
    return tf.where(lengths < 8, short, total)


def _sigma_clip_bounds(ordered, sigma, maxiters):
    """astropy's SigmaClip on its C path (axis=-1: median centre, population std, in
    double) of each row of sorted values (masked ones +inf, last): the last bounds
    computed ([rows] lower, [rows] upper; NaN for a row with no value). The values kept
    by each pass lie between two bounds, so on sorted values they are a contiguous range
    [first, stop): no pass re-sorts."""
    n_valid = _count(tf.math.is_finite(ordered))
    first, stop = tf.zeros_like(n_valid), n_valid
    lower = upper = tf.fill(tf.shape(n_valid), tf.constant(np.nan, F64))
    active = n_valid > 0
    for _ in tf.range(maxiters):  # bounds computed at most `maxiters` times
        median, std = _range_median(ordered, first, stop), _range_std(ordered, first, stop)
        spread = _separate(std * sigma)
        lo, hi = median - spread, median + spread
        inside = _in_range(ordered, first, stop)
        new_first = first + _count(inside & (ordered < lo[..., None]))
        new_stop = stop - _count(inside & (ordered > hi[..., None]))
        lower, upper = tf.where(active, lo, lower), tf.where(active, hi, upper)
        changed = new_stop - new_first != stop - first
        first, stop = tf.where(active, new_first, first), tf.where(active, new_stop, stop)
        active = active & changed & (stop > first)  # stops once nothing changes
    return lower, upper


def _in_range(ordered, first, stop):
    position = tf.range(ordered.shape[-1], dtype=I32)
    return (position >= first[..., None]) & (position < stop[..., None])


def _count(flags):
    return tf.reduce_sum(tf.cast(flags, I32), axis=-1)


def _range_median(ordered, first, stop):
    """The median of ordered[..., first:stop] (NaN where empty), averaging the two middle
    values when the count is even, as numpy and astropy's C code do."""
    count = stop - first
    rank = ordered.shape.rank - 1
    low = tf.gather(ordered, tf.maximum(first + (count - 1) // 2, 0), batch_dims=rank)
    high = tf.gather(ordered, tf.minimum(first + count // 2, ordered.shape[-1] - 1),
                     batch_dims=rank)
    return tf.where(count > 0, 0.5 * (low + high), tf.constant(np.nan, F64))


def _range_std(ordered, first, stop):
    """The population std of ordered[..., first:stop] in double (astropy's C code sums
    in its own order: the same up to the last bits)."""
    inside = _in_range(ordered, first, stop)
    n = tf.cast(stop - first, F64)
    mean = tf.reduce_sum(tf.where(inside, ordered, 0.0), axis=-1) / n
    deviation = tf.where(inside, ordered - mean[..., None], 0.0)
    return tf.sqrt(tf.reduce_sum(_separate(deviation * deviation), axis=-1) / n)


def _median_filter(mesh, size):
    """scipy.ndimage.generic_filter(mesh, nanmedian, size, mode='constant', cval=nan)."""
    fy, fx = size
    if (fy, fx) == (1, 1):
        return mesh
    ny, nx = mesh.shape
    padded = tf.pad(mesh, [[fy // 2, fy // 2], [fx // 2, fx // 2]],
                    constant_values=np.inf)  # outside: left out, like NaN
    window = tf.stack([padded[i:i + ny, j:j + nx] for i in range(fy) for j in range(fx)],
                      axis=-1)
    window = tf.where(tf.math.is_nan(window), tf.constant(np.inf, F64), window)
    ordered = tf.sort(window, axis=-1)
    n = _count(tf.math.is_finite(ordered))
    return _range_median(ordered, tf.zeros_like(n), n)


# -- scipy.ndimage.zoom(order=3, mode='reflect', grid_mode=True) as a matrix --------------

@functools.lru_cache(maxsize=None)
def _zoom_matrix(n_in: int, zoom: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: the first n_out values of zoom's output along one axis as a linear
    map of its input: scipy's spline prefilter, then its evaluation (ni_interpolation.c:
    the grid-mode coordinate, its reflection, the cubic B-spline weights and mirrored
    edge taps). Depends only on shapes: a constant of the graph."""
    size = int(round(n_in * zoom))
    scale = n_in / size
    weights = np.zeros((n_out, n_in))
    for k in range(n_out):
        cc = ((k + 0.5) * scale) - 0.5
        cc = _reflect(cc, n_in)
        start = math.floor(cc) - 1
        for h, w in enumerate(_cubic_weights(cc)):
            weights[k, int(_reflect(start + h, n_in))] += w
    prefilter = np.stack([_spline_prefilter(unit) for unit in np.eye(n_in)], axis=1)
    return weights @ prefilter


def _spline_prefilter(c):
    """ni_splines.c's apply_filter for order 3, mode 'reflect', on one line: scipy's
    recursive filter with its truncation-free but not exact boundary initialisation
    (it differs from the exact interpolating spline by up to 1e-4 on a 3-box mesh, so it
    is run here as scipy runs it, on each unit vector: the filter is linear)."""
    c = np.array(c, dtype=np.float64)
    n = len(c)
    if n <= 1:
        return c
    z = -0.267949192431122706472553658494127633  # sqrt(3) - 2
    c *= (1.0 - z) * (1.0 - 1.0 / z)
    # causal init (_init_causal_reflect)
    z_i, z_n, c0 = z, z ** n, c[0]
    c[0] = c[0] + z_n * c[n - 1]
    for i in range(1, n):
        c[0] += z_i * (c[i] + z_n * c[n - 1 - i])
        z_i *= z
    c[0] *= z / (1 - z_n * z_n)
    c[0] += c0
    for i in range(1, n):
        c[i] += z * c[i - 1]
    c[n - 1] *= z / (z - 1)  # anticausal init (_init_anticausal_reflect)
    for i in range(n - 2, -1, -1):
        c[i] = z * (c[i + 1] - c[i])
    return c


def _reflect(x, n):
    """ni_interpolation.c's map_coordinate, mode 'reflect' (half-sample symmetric)."""
    if n <= 1:
        return 0 * x
    if x < 0:
        if x < -2 * n:
            x = 2 * n * int(-x / (2 * n)) + x
        return x + 2 * n if x < -n else (1e-15 if x > -1e-15 else -x) - 1
    if x > n - 1:
        x -= 2 * n * int(x / (2 * n))
        if x >= n:
            x = 2 * n - x - 1
    return x


def _cubic_weights(x):
    """ni_splines.c's get_spline_interpolation_weights, order 3."""
    x -= math.floor(x)
    y, z = x, 1.0 - x
    w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
    w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
    w0 = z * z * z / 6.0
    return w0, w1, w2, 1.0 - w0 - w1 - w2


# -- excluded boxes: photutils' ShepardIDWInterpolator over scipy's cKDTree ----------------
#
# Each excluded box gets sum(v / d) / sum(1 / d) over its 10 nearest good boxes (d: the
# distance between box indices). On a grid, distances tie all the time, and which of the
# tied boxes make the 10 is cKDTree's choice: the first it meets in its traversal, and
# its heap's order. So the tree is emulated as scipy 1.17 builds (balanced, compact,
# leafsize 10: libstdc++'s nth_element and partition) and queries it (its node and
# neighbour heaps), integer for integer. Checked against cKDTree's neighbour lists on
# 160,000 queries over random grids of 7x7 to 35x35 and 32x64 boxes (including one whose
# build reaches introselect's heap_select fallback); the unit tests keep a sample.

def _idw_fill(mesh, good):
    """The mesh with its excluded (NaN) boxes filled as photutils' _interpolate_grid."""
    ny, nx = mesh.shape
    n = ny * nx
    flat, is_good = tf.reshape(mesh, [n]), tf.reshape(good, [n])
    # good boxes first, each group in raster order (np.where's order)
    n_good = tf.reduce_sum(tf.cast(is_good, I32))
    rank_good = tf.cumsum(tf.cast(is_good, I32)) - 1
    rank_bad = n_good + tf.cumsum(tf.cast(~is_good, I32)) - 1
    order = tf.scatter_nd(tf.where(is_good, rank_good, rank_bad)[:, None],
                          tf.range(n, dtype=I32), [n])
    points = tf.cast(tf.stack([order // nx, order % nx], axis=1), F64)
    values = tf.gather(flat, order)
    filled = flat
    if n_good > 0 and n_good < n:
        tree = _build_kdtree(points, n_good)
        q = n_good
        while q < n:
            neighbors, sq_dist = _kdtree_query(points, n_good, tree, _get(points, q),
                                               IDW_NEIGHBORS)
            found = neighbors >= 0
            weights = tf.where(found, 1.0 / tf.sqrt(tf.where(found, sq_dist, 1.0)), 0.0)
            picked = tf.gather(values, tf.maximum(neighbors, 0))
            value = _pairwise_sum(_separate(weights * picked)) / _pairwise_sum(weights)
            filled = _set(filled, _get(order, q), value)
            q += 1
    return tf.reshape(filled, [ny, nx])


def _get(a, i):
    return tf.gather(a, i)


def _set(a, i, v):
    return tf.tensor_scatter_nd_update(a, tf.reshape(i, [1, 1]), tf.reshape(v, [1]))


def _swap(a, i, j):
    return tf.tensor_scatter_nd_update(a, tf.stack([i, j])[:, None],
                                       tf.stack([_get(a, j), _get(a, i)]))


def _less(key, idx, i, j):
    """comp(idx[i], idx[j]) of cKDTree's build: the points' coordinates compared."""
    return _get(key, _get(idx, i)) < _get(key, _get(idx, j))


def _partition(idx, first, last, key, split):
    """libstdc++'s std::partition (bidirectional form) with key[a] < split."""
    done = tf.constant(False)
    while not done:
        while first != last and _get(key, _get(idx, first)) < split:
            first += 1
        if first == last:
            done = tf.constant(True)
        else:
            last -= 1
            while first != last and not _get(key, _get(idx, last)) < split:
                last -= 1
            if first == last:
                done = tf.constant(True)
            else:
                idx = _swap(idx, first, last)
                first += 1
    return first, idx


def _nth_element(idx, first, nth, last, key):
    """libstdc++'s std::nth_element (introselect)."""
    depth = tf.constant(0, I32)  # 2 * floor(log2(last - first))
    size = last - first
    while tf.bitwise.right_shift(size, 1) > 0:
        size = tf.bitwise.right_shift(size, 1)
        depth += 2
    done = tf.constant(False)
    while not done and last - first > 3:
        if depth == 0:
            idx = _heap_select(idx, first, nth + 1, last, key)
            idx = _swap(idx, first, nth)
            done = tf.constant(True)
        else:
            depth -= 1
            # __unguarded_partition_pivot: median of three to first, then partition
            mid = first + (last - first) // 2
            idx = _move_median_to_first(idx, first, first + 1, mid, last - 1, key)
            cut, idx = _unguarded_partition(idx, first + 1, last, first, key)
            if cut <= nth:
                first = cut
            else:
                last = cut
    if not done:
        idx = _insertion_sort(idx, first, last, key)
    return idx


def _move_median_to_first(idx, result, a, b, c, key):
    ab, bc, ac = _less(key, idx, a, b), _less(key, idx, b, c), _less(key, idx, a, c)
    pick = tf.where(ab, tf.where(bc, b, tf.where(ac, c, a)),
                    tf.where(ac, a, tf.where(bc, c, b)))
    return _swap(idx, result, pick)


def _unguarded_partition(idx, first, last, pivot, key):
    value = _get(key, _get(idx, pivot))  # the pivot's slot is outside [first, last)
    done = tf.constant(False)
    while not done:
        while _get(key, _get(idx, first)) < value:
            first += 1
        last -= 1
        while value < _get(key, _get(idx, last)):
            last -= 1
        if first < last:
            idx = _swap(idx, first, last)
            first += 1
        else:
            done = tf.constant(True)
    return first, idx


def _insertion_sort(idx, first, last, key):
    positions = tf.range(tf.shape(idx)[0], dtype=I32)
    i = first + 1
    while i < last:
        item = _get(idx, i)
        value = _get(key, item)
        if value < _get(key, _get(idx, first)):
            # move_backward [first, i) by one, then the item first
            shifted = tf.gather(idx, tf.maximum(positions - 1, 0))
            idx = tf.where((positions > first) & (positions <= i), shifted, idx)
            idx = _set(idx, first, item)
        else:
            j = i
            while value < _get(key, _get(idx, j - 1)):
                idx = _set(idx, j, _get(idx, j - 1))
                j -= 1
            idx = _set(idx, j, item)
        i += 1
    return idx


def _adjust_heap(idx, first, hole, length, item, key):
    """libstdc++'s __adjust_heap then __push_heap (a max-heap of key[idx[first:]])."""
    top = hole
    second = hole
    while second < (length - 1) // 2:
        second = 2 * (second + 1)
        if _less(key, idx, first + second, first + second - 1):
            second -= 1
        idx = _set(idx, first + hole, _get(idx, first + second))
        hole = second
    if length % 2 == 0 and second == (length - 2) // 2:
        second = 2 * (second + 1)
        idx = _set(idx, first + hole, _get(idx, first + second - 1))
        hole = second - 1
    parent = tf.maximum((hole - 1) // 2, 0)
    while hole > top and _get(key, _get(idx, first + parent)) < _get(key, item):
        idx = _set(idx, first + hole, _get(idx, first + parent))
        hole = parent
        parent = tf.maximum((hole - 1) // 2, 0)
    return _set(idx, first + hole, item)


def _heap_select(idx, first, middle, last, key):
    """libstdc++'s __heap_select: introselect's fallback once its depth limit is hit."""
    length = middle - first
    parent = (length - 2) // 2
    while length >= 2 and parent >= 0:  # __make_heap
        idx = _adjust_heap(idx, first, parent, length, _get(idx, first + parent), key)
        parent -= 1
    i = middle
    while i < last:
        if _less(key, idx, i, first):  # __pop_heap(first, middle, i)
            item = _get(idx, i)
            idx = _set(idx, i, _get(idx, first))
            idx = _adjust_heap(idx, first, tf.constant(0, I32), length, item, key)
        i += 1
    return idx


def _build_kdtree(points, n):
    """cKDTree(points[:n], leafsize=10) as scipy builds it (build.cxx: balanced median
    split on the widest dimension of each node's own bounding box, sliding the split
    when no point lies below it). Returns the index permutation and the node arrays
    (start, end, split dimension (-1: leaf), split value, less child, greater child)."""
    size = points.shape[0]
    slots = 2 * size + 1
    positions = tf.range(size, dtype=I32)
    idx = positions
    start = tf.zeros([slots], I32)
    end = _set(tf.zeros([slots], I32), 0, n)
    dim = tf.fill([slots], -1)
    split_at = tf.zeros([slots], F64)
    less = tf.zeros([slots], I32)
    greater = tf.zeros([slots], I32)
    stack = tf.zeros([slots], I32)  # nodes still to split (any order gives the same tree)
    depth = tf.constant(1, I32)
    count = tf.constant(1, I32)
    while depth > 0:
        depth -= 1
        node = _get(stack, depth)
        s, e = _get(start, node), _get(end, node)
        if e - s > KDTREE_LEAFSIZE:
            member = ((positions >= s) & (positions < e))[:, None]
            coords = tf.gather(points, idx)
            lows = tf.reduce_min(tf.where(member, coords, np.inf), axis=0)
            highs = tf.reduce_max(tf.where(member, coords, -np.inf), axis=0)
            spread = highs - lows
            d = tf.where(spread[1] > spread[0], 1, 0)
            if _get(spread, d) > 0:  # else: every point identical, a leaf
                key = tf.gather(points, d, axis=1)
                mid = s + (e - s) // 2
                idx = _nth_element(idx, s, mid, e, key)
                split = _get(key, _get(idx, mid))
                p, idx = _partition(idx, s, mid, key, split)
                if p == s:  # no point below the median: slide the split up
                    smallest = tf.reduce_min(tf.where(member[:, 0], tf.gather(key, idx),
                                                      np.inf))
                    split = tf.math.nextafter(smallest, tf.constant(np.inf, F64))
                    p, idx = _partition(idx, s, e, key, split)
                dim = _set(dim, node, d)
                split_at = _set(split_at, node, split)
                less = _set(less, node, count)
                greater = _set(greater, node, count + 1)
                start = _set(_set(start, count, s), count + 1, p)
                end = _set(_set(end, count, p), count + 1, e)
                stack = _set(_set(stack, depth, count), depth + 1, count + 1)
                depth += 2
                count += 2
    return idx, (start, end, dim, split_at, less, greater)


def _heap_push(priority, content, n, p, c):
    """ckdtree query.cxx's heap (a min-heap on priority): push."""
    i = n
    priority, content = _set(priority, i, p), _set(content, i, c)
    while i > 0 and _get(priority, i) < _get(priority, tf.maximum((i - 1) // 2, 0)):
        parent = (i - 1) // 2
        priority, content = _swap(priority, i, parent), _swap(content, i, parent)
        i = parent
    return priority, content, n + 1


def _heap_remove(priority, content, n):
    """ckdtree query.cxx's heap: remove the top."""
    n -= 1
    priority, content = _set(priority, 0, _get(priority, n)), _set(content, 0, _get(content, n))
    i, j, k = tf.constant(0, I32), tf.constant(1, I32), tf.constant(2, I32)
    while ((j < n and _get(priority, i) > _get(priority, j))
           or (k < n and _get(priority, i) > _get(priority, k))):
        if k < n and _get(priority, j) > _get(priority, k):
            pick = k
        else:
            pick = j
        priority, content = _swap(priority, pick, i), _swap(content, pick, i)
        i = pick
        j, k = 2 * i + 1, 2 * i + 2
    return priority, content, n


def _kdtree_query(points, n, tree, x, k):
    """cKDTree(points[:n]).query(x, k) as scipy 1.17 answers it (query.cxx,
    query_single_point with p=2, eps=0), on the tree `_build_kdtree` made: ([k] point
    indices in scipy's order, -1 where fewer than k points; [k] squared distances)."""
    idx, (start, end, dim, split_at, less, greater) = tree
    size = points.shape[0]
    slots = 2 * size + 2
    member = (tf.range(size) < n)[:, None]
    lows = tf.reduce_min(tf.where(member, points, np.inf), axis=0)
    highs = tf.reduce_max(tf.where(member, points, -np.inf), axis=0)
    side = tf.where(x - highs > 0, x - highs, tf.where(lows - x > 0, lows - x, 0.0))
    side = side * side
    # node records: node, min distance, per-dimension side distances
    rec_node = tf.zeros([slots], I32)
    rec_dist = _set(tf.zeros([slots], F64), 0, (0.0 + side[0]) + side[1])
    rec_side = tf.tensor_scatter_nd_update(tf.zeros([slots, 2], F64), [[0]], side[None])
    n_rec = tf.constant(1, I32)
    q_pri, q_rec, q_n = tf.zeros([slots], F64), tf.zeros([slots], I32), tf.constant(0, I32)
    nb_pri, nb_idx, nb_n = tf.zeros([k], F64), tf.zeros([k], I32), tf.constant(0, I32)
    bound = tf.constant(np.inf, F64)
    current = tf.constant(0, I32)
    done = tf.constant(False)
    while not done:
        node = _get(rec_node, current)
        if _get(dim, node) == -1:  # a leaf: every point, in the tree's order
            i = _get(start, node)
            while i < _get(end, node):
                point = _get(idx, i)
                diff = _get(points, point) - x
                dist = (0.0 + diff[0] * diff[0]) + diff[1] * diff[1]
                if dist < bound:
                    if nb_n == k:
                        nb_pri, nb_idx, nb_n = _heap_remove(nb_pri, nb_idx, nb_n)
                    nb_pri, nb_idx, nb_n = _heap_push(nb_pri, nb_idx, nb_n, -dist, point)
                    if nb_n == k:
                        bound = -_get(nb_pri, 0)
                i += 1
            if q_n == 0:
                done = tf.constant(True)
            else:
                current = _get(q_rec, 0)
                q_pri, q_rec, q_n = _heap_remove(q_pri, q_rec, q_n)
        elif _get(rec_dist, current) > bound:
            done = tf.constant(True)  # the nearest cell left is too far
        else:
            far = n_rec
            n_rec += 1
            rec_dist = _set(rec_dist, far, _get(rec_dist, current))
            rec_side = tf.tensor_scatter_nd_update(rec_side, [[far]],
                                                   [_get(rec_side, current)])
            axis = _get(dim, node)
            split = _get(split_at, node)
            xd = _get(x, axis)
            below = xd < split  # the near child is the side x is on
            near_node = tf.where(below, _get(less, node), _get(greater, node))
            far_node = tf.where(below, _get(greater, node), _get(less, node))
            gap = tf.where(below, split - xd, xd - split)
            rec_node = _set(_set(rec_node, current, near_node), far, far_node)
            gap = gap * gap
            old_gap = tf.gather_nd(rec_side, tf.stack([far, axis])[None])[0]
            rec_dist = _set(rec_dist, far, _get(rec_dist, far) + (gap - old_gap))
            rec_side = tf.tensor_scatter_nd_update(rec_side, tf.stack([far, axis])[None],
                                                   gap[None])
            if _get(rec_dist, current) > _get(rec_dist, far):
                current, far = far, current
            if _get(rec_dist, far) <= bound:
                q_pri, q_rec, q_n = _heap_push(q_pri, q_rec, q_n, _get(rec_dist, far), far)
    # the neighbours in scipy's order: popped from the heap, farthest first
    neighbors = tf.fill([k], -1)
    sq_dist = tf.fill([k], tf.constant(np.inf, F64))
    while nb_n > 0:
        neighbors = _set(neighbors, nb_n - 1, _get(nb_idx, 0))
        sq_dist = _set(sq_dist, nb_n - 1, -_get(nb_pri, 0))
        nb_pri, nb_idx, nb_n = _heap_remove(nb_pri, nb_idx, nb_n)
    return neighbors, sq_dist


# == sigma-clipped median (astropy's sigma_clipped_stats): the reference's fallback =======

@tf.function(jit_compile=True)  # XLA keeps numpy's order of the adds (Grappler's
def _clipped_median(values, valid, sigma=3.0, maxiters=5):  # graph rewrites would not)
    """sigma_clipped_stats(values[valid])[1]: astropy's Python path, in float64."""
    flat, bad = tf.reshape(values, [-1]), tf.reshape(~valid, [-1])
    ordered = tf.sort(tf.where(bad, tf.constant(np.inf, F64), flat))
    first, stop = _clip_compacted(flat, bad, ordered, sigma, maxiters, F64)
    return _range_median(ordered, first, stop)


# == the matched filter: scipy.ndimage.correlate1d(mode='constant') ========================

def _gaussian_taps(fwhm: float) -> np.ndarray:
    """The reference's kernel, computed by its own expression (a constant of the graph)."""
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    r = math.ceil(4 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def _correlate1d(x, taps, axis):
    """correlate1d of a symmetric odd kernel with zero padding, summed as scipy's C loop
    (ni_filters.c): centre * w0, then (left + right) * w for the outer taps inwards."""
    r = len(taps) // 2
    n = x.shape[axis]
    pad = [[0, 0], [0, 0]]
    pad[axis] = [r, r]
    padded = tf.pad(x, pad)

    def shifted(offset):  # x[i + offset] along `axis`, zero outside
        return (padded[r + offset:r + offset + n] if axis == 0
                else padded[:, r + offset:r + offset + n])

    out = _separate(x * float(taps[r]))
    for j in range(r, 0, -1):
        out = out + _separate((shifted(-j) + shifted(j)) * float(taps[r - j]))
    return out


# == connected components: scipy.ndimage.label with 8-connectivity ========================

def _label_roots(foreground):
    """For each foreground pixel, the raster index of its 8-connected component's first
    pixel (its smallest index); N (= pixel count) for background pixels.

    Every pixel points at a pixel of its own component with a smaller or equal index.
    Each round hooks: every pixel lowers the pointer of the pixel it points at, and its
    own, to the smallest pointer among its 8 neighbours (scatter-min); then pointers jump
    (p = p[p]) until each points at a root. At the fixed point neighbours share one root,
    which is the component's smallest index: the order scipy numbers components in."""
    height, width = foreground.shape
    n = height * width
    big = tf.constant(n, I32)
    own = tf.reshape(tf.range(n, dtype=I32), [height, width])
    # slot n is a sink: background pixels point at it, and it at itself
    pointer = tf.concat([tf.reshape(tf.where(foreground, own, big), [n]), [n]], 0)

    def neighbourhood_min(grid):
        padded = tf.pad(grid, [[1, 1], [1, 1]], constant_values=n)
        out = grid
        for dy in range(3):
            for dx in range(3):
                if (dy, dx) != (1, 1):
                    out = tf.minimum(out, padded[dy:dy + height, dx:dx + width])
        return out

    def jump(p):
        return tf.while_loop(lambda p, changed: changed,
                             lambda p, _: (tf.gather(p, p),
                                           tf.reduce_any(tf.gather(p, p) != p)),
                             [p, tf.constant(True)])[0]

    def round_(p, _):
        grid = tf.reshape(p[:n], [height, width])
        lowest = tf.reshape(tf.where(foreground, neighbourhood_min(grid), big), [n])
        hooked = tf.tensor_scatter_nd_min(p, p[:n, None], lowest)
        hooked = tf.concat([tf.minimum(hooked[:n], lowest), [n]], 0)
        hooked = jump(hooked)
        return hooked, tf.reduce_any(hooked != p)

    pointer = tf.while_loop(lambda p, changed: changed, round_,
                            [pointer, tf.constant(True)])[0]
    return tf.reshape(pointer[:n], [height, width])


def _segments(significance, valid, threshold, n_pixels):
    """photutils' detect_sources: ([H, W] segment ids, 0 outside; number of segments).
    Ids count the kept components in scipy.ndimage.label's order."""
    foreground = (significance > threshold) & valid
    roots = _label_roots(foreground)
    height, width = foreground.shape
    n = height * width
    flat_roots = tf.reshape(roots, [n])
    area = tf.math.unsorted_segment_sum(tf.ones([n], I32), flat_roots, n + 1)[:n]
    is_root = tf.reshape(foreground, [n]) & (flat_roots == tf.range(n, dtype=I32))
    kept = is_root & (area >= n_pixels)
    ids = tf.cumsum(tf.cast(kept, I32))  # id of each kept root, in raster order
    sink = tf.concat([tf.cast(kept, I32) * ids, [0]], 0)  # background -> slot n -> 0
    return tf.reshape(tf.gather(sink, flat_roots), [height, width]), ids[-1]


# == the patch's sky coordinates: wcslib's STG pixel -> world =============================

def _stg_pixel_to_world(x, y, wcs):
    """(ra, dec) in degrees of 0-based pixel coordinates, as astropy's
    pixel_to_world_values for a RA---STG/DEC--STG WCS (wcslib: linear step, stgx2s,
    sphx2s with the native pole at (0, 90))."""
    crpix, pc, cdelt, crval, lonpole = wcs
    p1, p2 = x + 1.0 - crpix[0], y + 1.0 - crpix[1]
    xi = cdelt[0] * (pc[0][0] * p1 + pc[0][1] * p2)
    eta = cdelt[1] * (pc[1][0] * p1 + pc[1][1] * p2)
    r = tf.sqrt(xi * xi + eta * eta)
    phi = tf.where(r == 0, tf.zeros_like(r), _atan2d(xi, -eta))
    theta = 90.0 - 2.0 * _atand(r * (math.pi / 360.0))  # R = 2 (180/pi) tan((90-theta)/2)
    # the spherical rotation (sphx2s), Euler angles (crval1, 90 - crval2, lonpole)
    sin_p, cos_p = _sind(crval[1]), _cosd(crval[1])
    dphi = phi - lonpole
    sin_t, cos_t = _sind(theta), _cosd(theta)
    a = sin_t * cos_p - cos_t * sin_p * _cosd(dphi)
    b = -cos_t * _sind(dphi)
    ra = crval[0] + _atan2d(b, a)
    # wcslib's normalisation: into [0, 360) if crval1 >= 0, (-360, 0] otherwise
    ra = tf.where(crval[0] >= 0, tf.where(ra < 0, ra + 360.0, ra),
                  tf.where(ra > 0, ra - 360.0, ra))
    ra = tf.where(ra > 360.0, ra - 360.0, tf.where(ra < -360.0, ra + 360.0, ra))
    z = sin_t * sin_p + cos_t * cos_p * _cosd(dphi)
    # near the poles arcsin loses precision: wcslib takes the arccos of cos(dec) there
    polar = tf.sign(z) * _degrees(tf.acos(tf.minimum(tf.sqrt(a * a + b * b), 1.0)))
    dec = tf.where(tf.abs(z) > 0.99, polar, _degrees(tf.asin(tf.clip_by_value(z, -1.0, 1.0))))
    return ra, dec


def _degrees(t):
    return t * (180.0 / math.pi)


def _sind(t):
    return tf.sin(t * (math.pi / 180.0))


def _cosd(t):
    return tf.cos(t * (math.pi / 180.0))


def _atand(t):
    return _degrees(tf.atan(t))


def _atan2d(y, x):
    return _degrees(tf.atan2(y, x))


def _wcs_constants(wcs):
    """The keywords the STG transform needs, as float64 tensors (host: WCS keywords
    only): crpix, pc, cdelt, crval, lonpole."""
    w = wcs.wcs
    w.set()
    if any(not c.endswith("STG") for c in w.ctype):
        raise ValueError(f"detect: the patch WCS is {list(w.ctype)}, not STG")
    return tuple(tf.constant(np.asarray(v, np.float64)) for v in
                 (w.crpix, w.get_pc(), w.get_cdelt(), w.crval, w.lonpole))


# == one patch ============================================================================

@functools.lru_cache(maxsize=None)
def _patch_graph(params: astro.AstroParams, border: int, inner: int):
    """The detect of one patch for these parameters (one trace per patch shape): the
    background (`background_2d_graph`), the reference's fallback where Background2D
    raises, then `footprints` and `measure`, XLA-compiled. With deblending on, the
    footprints go through photutils' deblend_sources on the host between the two (its
    multi-thresholding and scikit-image's watershed, whose tie-breaking order is its own:
    the one part of this step that is not TensorFlow)."""
    taps = _gaussian_taps(params.detect_kernel_fwhm)
    taps_sq = taps * taps
    n_pixels = params.detect_min_pixels

    @tf.function(jit_compile=True)
    def footprints(image, variance, valid, background):
        """Matched filter and segmentation."""
        data = tf.where(valid, image - background, 0.0)
        var = tf.where(valid, variance, 0.0)
        filtered = _correlate1d(_correlate1d(data, taps, 0), taps, 1)
        filtered_var = _correlate1d(_correlate1d(var, taps_sq, 0), taps_sq, 1)
        usable = valid & (filtered_var > 0)
        significance = tf.where(
            usable, filtered / tf.sqrt(tf.where(usable, filtered_var, 1.0)), 0.0)
        segments, n_segments = _segments(significance, valid, params.detect_threshold,
                                          n_pixels)
        n_valid = tf.reduce_sum(tf.cast(valid, I32))
        n_segments = tf.where(n_valid < n_pixels, 0, n_segments)  # the reference's early out
        return data, var, filtered, segments, n_segments

    @tf.function(jit_compile=True)
    def measure(data, var, filtered, valid, segments, parents, n_segments, wcs):
        """Catalog columns and flags; the owned rows first."""
        # SourceCatalog: moments of the filtered image (negative values count as 0),
        # flux of the data, error of sqrt(var) squared, area: sums over each segment
        height, width = data.shape
        slots = height * width // n_pixels + 1  # no more segments can exist
        weight = tf.where((segments > 0) & (filtered >= 0), filtered, 0.0)
        ys, xs = tf.meshgrid(tf.range(height, dtype=F64), tf.range(width, dtype=F64),
                             indexing="ij")
        error = tf.sqrt(var)
        columns = tf.stack([weight, weight * xs, weight * ys, data, error * error,
                            tf.ones_like(data)], -1)
        sums = tf.math.unsorted_segment_sum(tf.reshape(columns, [-1, 6]),
                                            tf.reshape(segments, [-1]), slots + 1)[1:]
        x, y = sums[:, 1] / sums[:, 0], sums[:, 2] / sums[:, 0]
        lo, hi = border - 0.5, border + inner - 0.5
        label = tf.range(1, slots + 1, dtype=I32)
        own = ((label <= n_segments) & (x >= lo) & (x < hi) & (y >= lo) & (y < hi)
               & tf.math.is_finite(x) & tf.math.is_finite(y))
        flags = _footprint_flags(segments, parents, filtered, valid, label <= n_segments,
                                 slots)
        # owned rows first, in id order: the reference's catalog[own]
        count = tf.reduce_sum(tf.cast(own, I32))
        position = tf.where(own, tf.cumsum(tf.cast(own, I32)) - 1,
                            count + tf.cumsum(tf.cast(~own, I32)) - 1)
        order = tf.scatter_nd(position[:, None], tf.range(slots, dtype=I32), [slots])
        x, y = tf.gather(x, order), tf.gather(y, order)
        ra, dec = _stg_pixel_to_world(x, y, wcs)
        return (count, tf.gather(label, order), x, y, ra, dec, tf.gather(sums[:, 3], order),
                tf.sqrt(tf.gather(sums[:, 4], order)),
                tf.cast(tf.gather(sums[:, 5], order), I32), tf.gather(flags, order))

    @tf.function
    def background_of(image, variance):
        image, variance = tf.cast(image, F64), tf.cast(variance, F64)
        valid = tf.math.is_finite(image) & tf.math.is_finite(variance)
        background, ok = background_2d_graph(
            tf.where(valid, image, 0.0), ~valid, ~valid,
            box_size=params.detect_background_box, fill_value=0.0,
            exclude_percentile=params.background_exclude_percentile,
            sigma=params.background_clip_sigma)
        if not ok:  # Background2D raised ValueError (no box usable): the reference
            # subtracts the sigma-clipped median of the image
            background = tf.fill(tf.shape(image), _clipped_median(image, valid))
        return image, variance, valid, background

    def run(image, variance, wcs):
        image, variance, valid, background = background_of(image, variance)
        data, var, filtered, segments, n_segments = footprints(image, variance, valid,
                                                               background)
        parents = segments
        if params.deblend and int(n_segments) > 0:
            from photutils.segmentation import SegmentationImage

            split = astro.deblend(filtered.numpy(), SegmentationImage(segments.numpy()),
                                  n_pixels, params.deblend_levels, params.deblend_contrast)
            segments = tf.constant(split.data.astype(np.int32))
            n_segments = tf.constant(int(split.max_label), I32)
        return measure(data, var, filtered, valid, segments, parents, n_segments, wcs)

    return run


def _footprint_flags(segments, parents, filtered, valid, in_use, slots):
    """astro.footprint_flags per label 1..slots (0 where not `in_use`)."""
    height, width = filtered.shape
    flat = tf.reshape(segments, [-1])

    def neighbourhood_max(grid, pad):
        padded = tf.pad(grid, [[1, 1], [1, 1]], constant_values=pad)
        out = grid
        for dy in range(3):
            for dx in range(3):
                out = tf.maximum(out, padded[dy:dy + height, dx:dx + width])
        return out

    # scipy's binary_dilation with a 3x3 structure (outside the patch: not a gap)
    near_gap = neighbourhood_max(tf.cast(~valid, I32), 0)
    edge = tf.math.unsorted_segment_max(tf.reshape(near_gap, [-1]), flat, slots + 1)[1:] > 0
    # scipy's maximum_filter(size=3, mode="constant", cval=0.0)
    peak = (segments > 0) & (filtered == neighbourhood_max(filtered, 0.0))
    peaks = tf.math.unsorted_segment_sum(tf.reshape(tf.cast(peak, I32), [-1]), flat,
                                         slots + 1)[1:]
    parent = tf.math.unsorted_segment_max(tf.reshape(parents, [-1]), flat, slots + 1)[1:]
    parent = tf.where(in_use, parent, 0)  # an unused slot's max is the type's lowest
    children = tf.math.unsorted_segment_sum(tf.cast(in_use, I32), parent, slots + 1)
    deblended = in_use & (tf.gather(children, parent) > 1)
    flags = (tf.where(in_use & edge, astro.FLAG_EDGE, 0)
             | tf.where(in_use & (peaks > 1), astro.FLAG_BLENDED, 0)
             | tf.where(deblended, astro.FLAG_DEBLENDED, 0))
    return tf.cast(flags, I32)


def _as_catalog(patch, outputs) -> np.ndarray:
    """The output boundary: the patch's first `count` rows as CATALOG_DTYPE."""
    count, label, x, y, ra, dec, flux, flux_err, area, flags = (t.numpy() for t in outputs)
    rows = np.zeros(int(count), dtype=astro.CATALOG_DTYPE)
    rows["patch_x"], rows["patch_y"] = patch
    for column, values in (("id", label), ("x", x), ("y", y), ("ra", ra), ("dec", dec),
                           ("flux", flux), ("flux_err", flux_err), ("area", area),
                           ("flags", flags)):
        rows[column] = values[:count]
    return rows


class _FiniteAt:
    """Whether the coadd has data at a pixel, asked of the tensors pixel by pixel: what
    `astro.with_saturated` reads of its `valid` (its shape, a star centre's pixel)."""

    def __init__(self, image, variance):
        self.image, self.variance = image, variance
        self.shape = tuple(image.shape)

    def __getitem__(self, at):
        return bool(tf.math.is_finite(self.image[at]) & tf.math.is_finite(self.variance[at]))


def _read_patch(path):
    """A coadd's IMAGE and VARIANCE planes, through engines.tf.io (one read of the file)."""
    planes = io.fits_planes(path, ("IMAGE", "VARIANCE"))
    return tuple(io.read_planes([planes["IMAGE"], planes["VARIANCE"]]))


@native("detect", compiled=True)
def detect(engine, step, state, ctx, plan):
    """Every coadd of the plan through `_patch_graph`, one after the other (each uses
    every intra-op thread), combined by the plan as the reference's results are."""
    skymap, params = plan.shared["skymap"], plan.shared["params"]
    run = _patch_graph(params, skymap.patch_border, skymap.patch_inner)
    results = []
    for done, (patch, path) in enumerate(plan.partitions, 1):
        image, variance = _read_patch(path)
        outputs = run(image, variance, _wcs_constants(skymap.patch_wcs(patch)))
        rows = _as_catalog(patch, outputs)
        if len(plan.shared["saturated"]):  # the reference's own numpy on the catalog rows
            x, y = outputs[2].numpy(), outputs[3].numpy()  # every footprint, owned or not
            found = np.isfinite(x) & np.isfinite(y)
            rows = astro.with_saturated(rows, patch, skymap, plan.shared["saturated"],
                                        _FiniteAt(image, variance),
                                        np.column_stack([x[found], y[found]]))
        results.append((patch, rows))
        engine._report(step.name, done, len(plan.partitions))
    return plan.combine(results)
