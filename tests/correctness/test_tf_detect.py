"""TensorFlow's detect (engines/tf/detect.py), piece by piece, against the libraries the
reference's kernel calls: the labelling against scipy.ndimage.label and photutils'
detect_sources, the background mesh against photutils' Background2D (and its parts:
cKDTree's neighbour choice, scipy's zoom, the clipped median), the matched filter against
scipy's correlate1d, the STG projection against astropy. Small synthetic inputs with fixed
shapes, so each XLA graph compiles once; the whole step is held to the reference by the
step tests."""
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
photutils = pytest.importorskip("photutils")

from astropy.stats import SigmaClip, sigma_clipped_stats  # noqa: E402
from astropy.wcs import WCS  # noqa: E402
from photutils.background import Background2D  # noqa: E402
from photutils.segmentation import detect_sources  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from engines.tf import detect  # noqa: E402  (loads engines.tf: its TF settings first)

pytestmark = pytest.mark.correctness

EIGHT = np.ones((3, 3), bool)


@tf.function(jit_compile=True)
def _roots(foreground):
    return detect._label_roots(foreground)


@tf.function(jit_compile=True)
def _segments(significance, valid):
    return detect._segments(significance, valid, 5.0, 5)


def _random_masks(rng, shape, count):
    """Random masks of several densities, and 8-connected diagonal chains and zigzags:
    components joined only through corners, long snakes (many propagation rounds)."""
    for k in range(count):
        yield rng.random(shape) < (0.1, 0.3, 0.45, 0.6)[k % 4]
    h, w = shape
    chains = np.zeros(shape, bool)
    for i in range(min(h, w)):  # one long diagonal, then its anti-diagonal twin
        chains[i, i] = True
        chains[i, w - 1 - i] = True
    yield chains
    snake = np.zeros(shape, bool)
    for r in range(0, h, 2):  # rows joined alternately at the ends, by diagonal steps
        snake[r, 1:w - 1] = True
        if r + 1 < h:
            snake[r + 1, (w - 1) if (r // 2) % 2 == 0 else 0] = True
    yield snake
    stairs = np.zeros(shape, bool)
    stairs[np.arange(h), (np.arange(h) * 3) % w] = True  # isolated and corner-joined
    yield stairs


def test_labels_are_scipys():
    rng = np.random.default_rng(0)
    for mask in _random_masks(rng, (61, 47), 12):
        want, _ = ndimage.label(mask, structure=EIGHT)
        roots = _roots(tf.constant(mask)).numpy().ravel()
        # scipy numbers components by their first pixel in raster order: rank the roots
        first = np.unique(roots[mask.ravel()])
        got = np.zeros(mask.size, int)
        got[mask.ravel()] = np.searchsorted(first, roots[mask.ravel()]) + 1
        np.testing.assert_array_equal(got.reshape(mask.shape), want)


def test_segments_are_detect_sources():
    rng = np.random.default_rng(1)
    for k, mask in enumerate(_random_masks(rng, (61, 47), 8)):
        significance = np.where(mask, rng.uniform(5.0, 9.0, mask.shape),
                                rng.uniform(0.0, 5.0, mask.shape))
        significance[rng.random(mask.shape) < 0.02] = 5.0  # at the threshold: not above
        valid = rng.random(mask.shape) > (0.05 if k % 2 else 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NoDetectionsWarning: an answer here
            want = detect_sources(significance, 5.0, n_pixels=5, connectivity=8,
                                  mask=~valid)
        ids, n = _segments(tf.constant(significance), tf.constant(valid))
        if want is None:
            assert int(n) == 0
        else:
            np.testing.assert_array_equal(ids.numpy(), want.data)
            assert int(n) == want.n_labels


@tf.function(jit_compile=True)
def _knn(points, n, m):
    tree = detect._build_kdtree(points, n)
    found = tf.zeros([points.shape[0], 10], tf.int32)
    q = 0
    while q < m:
        neighbors, _ = detect._kdtree_query(points, n, tree, tf.gather(points, n + q), 10)
        found = tf.tensor_scatter_nd_update(found, [[q]], neighbors[None])
        q += 1
    return found


def test_kdtree_neighbours_are_ckdtrees():
    """Photutils' IDW fill takes the 10 nearest good boxes from cKDTree; on a grid the
    10th distance is usually tied, and cKDTree's traversal decides: the same lists, in
    the same order, on random and banded 7x7 meshes (the detect step's) and 12x20."""
    rng = np.random.default_rng(2)
    for shape, trials in (((7, 7), 120), ((12, 20), 12)):
        for trial in range(trials):
            good = rng.random(shape) < rng.uniform(0.2, 0.95)
            if trial % 2:
                good[:, :rng.integers(0, shape[1])] = False
            if trial % 3 == 0:
                good[rng.integers(1, shape[0]):, :] = False
            if good.all() or not good.any():
                continue
            yx = np.argwhere(good).astype(float)
            queries = np.argwhere(~good).astype(float)
            _, want = cKDTree(yx, leafsize=10).query(queries, k=10)
            want = np.where(want == len(yx), -1, want)
            got = _knn(tf.constant(np.concatenate([yx, queries])),
                       tf.constant(len(yx), tf.int32), tf.constant(len(queries), tf.int32))
            np.testing.assert_array_equal(got.numpy()[:len(queries)], want)


@tf.function(jit_compile=True)
def _idw(mesh):
    return detect._idw_fill(mesh, ~tf.math.is_nan(mesh))


def test_idw_fill_is_photutils():
    rng = np.random.default_rng(3)
    for trial in range(40):
        mesh = rng.normal(size=(7, 7))
        mesh[rng.random(mesh.shape) < rng.uniform(0.1, 0.7)] = np.nan
        if trial % 2:
            mesh[:, :rng.integers(1, 6)] = np.nan
        if np.isnan(mesh).all():
            continue
        want = Background2D._interpolate_grid(None, mesh)
        np.testing.assert_allclose(_idw(tf.constant(mesh)).numpy(), want, rtol=0,
                                   atol=1e-15)


def test_zoom_is_scipys():
    from scipy.ndimage import zoom
    rng = np.random.default_rng(4)
    for shape, crop in (((1, 4), (60, 250)), ((2, 3), (100, 160)), ((3, 3), (160, 160)),
                        ((7, 7), (440, 440)), ((5, 9), (300, 560))):
        mesh = rng.normal(size=shape)
        want = zoom(mesh, (64, 64), order=3, mode="reflect", grid_mode=True)
        got = (detect._zoom_matrix(shape[0], 64, crop[0]) @ mesh
               @ detect._zoom_matrix(shape[1], 64, crop[1]).T)
        np.testing.assert_allclose(got, want[:crop[0], :crop[1]], rtol=0, atol=1e-14)


def _synthetic(rng, shape, dtype):
    """Sky with a gradient, stars, and masked discs, bad columns and an empty corner."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    image = 100 + 0.05 * x - 0.03 * y + rng.normal(0, 5, shape)
    for _ in range(30):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        image += rng.uniform(50, 5000) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 4.0)
    mask = np.zeros(shape, bool)
    for _ in range(4):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        mask |= (y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(10, 40) ** 2
    mask[:, rng.integers(0, shape[1], 3)] = True
    coverage = (y + x) < shape[0] // 2  # no data in one corner
    return image.astype(dtype), mask, coverage


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_background_is_photutils(dtype):
    """The detect step's call (float64, coverage mask, fill value) and the calibrate
    step's (float32, mask only), on shapes with partial boxes and a corner box. float32:
    the same bits (numpy's float32 sums and arithmetic are reproduced, the double parts
    differ by far less than a float32 unit); float64: within 1e-13 of the background's
    range (the zoom's sums in another order)."""
    rng = np.random.default_rng(5)
    # partial boxes on both sides (so a corner box), or none; one compile per shape
    shapes = [(300, 300), (256, 192)] if dtype == np.float32 else [(190, 250)]
    for shape in shapes:
        image, mask, coverage = _synthetic(rng, shape, dtype)
        kwargs = dict(exclude_percentile=50.0, filter_size=3)
        if dtype == np.float64:
            kwargs.update(coverage_mask=coverage, fill_value=0.0)
            image = np.where(coverage, 0.0, image)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = Background2D(image, 64, mask=mask, sigma_clip=SigmaClip(sigma=3.0),
                                **kwargs).background
        got = detect.background_2d(image, 64, mask=mask, sigma=3.0, **kwargs).numpy()
        assert got.dtype == want.dtype
        if dtype == np.float32:
            np.testing.assert_array_equal(got, want, err_msg=str(shape))
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max(),
                                       err_msg=str(shape))


def test_background_raises_where_photutils_does():
    """With photutils' words (the calibrate step records them). The shape and options of
    the float64 case above: no new compile."""
    image = np.zeros((190, 250))
    mask = np.ones_like(image, bool)
    mask[:10, :10] = False  # 100 good pixels: no box keeps half of its 4096
    kwargs = dict(mask=mask, exclude_percentile=50.0, filter_size=3)
    for options in [kwargs, dict(kwargs, mask=np.ones_like(mask))]:
        with pytest.raises(ValueError) as want:
            Background2D(image, 64, sigma_clip=SigmaClip(sigma=3.0), **options)
        with pytest.raises(ValueError) as got:
            detect.background_2d(image, 64, sigma=3.0, **options)
        assert str(got.value) == str(want.value)


def test_clipped_median_is_sigma_clipped_stats():
    """The reference's fallback where Background2D raises: the same value (one array
    size, so one compile)."""
    rng = np.random.default_rng(6)
    for n in (1, 2, 10, 4000):
        values = np.concatenate([rng.normal(0, 1, n), rng.normal(30, 1, n // 10)])
        valid = rng.random(values.shape) < 0.8
        valid[0] = True
        padded = np.zeros(5000)
        padded[:values.size] = values
        got = detect._clipped_median(tf.constant(padded),
                                     tf.constant(np.arange(5000) < values.size)
                                     & tf.constant(np.pad(valid, (0, 5000 - valid.size))))
        assert got.numpy() == sigma_clipped_stats(values[valid])[1], n


def test_matched_filter_is_correlate1d():
    """The same bits as scipy: its summation order, no fused multiply-add."""
    rng = np.random.default_rng(7)
    image = rng.normal(0, 1, (50, 40))
    taps = detect._gaussian_taps(3.3)
    both = tf.function(jit_compile=True)(
        lambda x: detect._correlate1d(detect._correlate1d(x, taps, 0), taps, 1))
    want = ndimage.correlate1d(ndimage.correlate1d(image, taps, 0, mode="constant"), taps,
                               1, mode="constant")
    np.testing.assert_array_equal(both(tf.constant(image)).numpy(), want)


@pytest.mark.parametrize("center", [(250.4226, 36.4602), (10.0, -70.0), (120.0, 89.95),
                                    (0.001, 0.0)])
def test_stg_pixel_to_world_is_astropys(center):
    """The patch WCS of the sky map (STG, east left), away from and at a pole, and where
    ra wraps through 0."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---STG", "DEC--STG"]
    wcs.wcs.crval = list(center)
    wcs.wcs.cdelt = [-0.333 / 3600, 0.333 / 3600]
    wcs.wcs.crpix = [-350.5, 900.5]
    wcs.wcs.radesys = "ICRS"
    y, x = np.mgrid[-50:2000:37, -50:2000:41].astype(float)
    x, y = x.ravel() + 0.37, y.ravel() - 0.21
    want_ra, want_dec = wcs.pixel_to_world_values(x, y)
    ra, dec = detect._stg_pixel_to_world(tf.constant(x), tf.constant(y),
                                         detect._wcs_constants(wcs))
    np.testing.assert_allclose(dec.numpy(), want_dec, rtol=0, atol=1e-12)
    d_ra = (ra.numpy() - want_ra + 180.0) % 360.0 - 180.0
    assert np.abs(d_ra * np.cos(np.radians(want_dec))).max() < 1e-12
    assert ((ra.numpy() >= 0) & (ra.numpy() < 360)).all()


def _coadd(path, rng, skymap, patch, strip=None):
    """A synthetic coadd as the coadd step writes it: sky noise, sources (some crowded,
    some on the inner region's edge), no data (NaN) over part of the patch, or outside
    a strip of columns."""
    from pipelines import fitsio
    shape = skymap.patch_shape
    y, x = np.mgrid[:shape[0], :shape[1]]
    image = rng.normal(0.2, 1.0, shape)
    for _ in range(40):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        image += rng.uniform(5, 300) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 3.0)
    for cy, cx in ((40, 100), (100, 40)):  # close pairs: one footprint, two peaks
        for dy, flux in ((0, 400.0), (4, 150.0)):
            image += flux * np.exp(-((y - cy - dy) ** 2 + (x - cx) ** 2) / 3.0)
    variance = np.full(shape, 1.0) + 0.01 * np.abs(image)
    if strip is None:
        image[(y + 2 * x) < 90] = np.nan
    else:
        image[:, :strip[0]] = image[:, strip[1]:] = np.nan
        image[60:66, strip[0] + 3:strip[0] + 9] += 200.0
    header = skymap.patch_wcs(patch).to_header()
    fitsio.write_planes(path, None, {"IMAGE": (image.astype(np.float32), header),
                                     "VARIANCE": (variance.astype(np.float32), None)})
    return str(path)


@pytest.mark.parametrize("deblend", [False, True])
def test_patch_is_detect_kernel(tmp_path, deblend):
    """The whole patch graph against the reference's kernel on synthetic coadds: one with
    a no-data corner, one where no box is usable (Background2D raises and the reference
    falls back on the clipped median); footprints deblended or not, flags included."""
    from pipelines import astro
    skymap = astro.SkyMap(150.0, 2.0, 0.333, 128, 16, 2, 2)
    params = astro.AstroParams(deblend=deblend)
    flagged = np.zeros(0, dtype=np.int32)
    run = detect._patch_graph(params, skymap.patch_border, skymap.patch_inner)
    rng = np.random.default_rng(8)
    for k, (patch, strip) in enumerate([((0, 1), None), ((1, 0), (50, 80))]):
        path = _coadd(tmp_path / f"p{k}.fits", rng, skymap, patch, strip)
        _, want = astro.detect_kernel((patch, path), skymap, params,
                                       np.zeros(0, dtype=astro.SATURATED_DTYPE))
        image, variance = detect._read_patch(path)
        got = detect._as_catalog(patch, run(image, variance,
                                            detect._wcs_constants(skymap.patch_wcs(patch))))
        assert len(want) > 0 and len(got) == len(want), (k, len(got), len(want))
        for column in ("patch_x", "patch_y", "id", "area", "flags"):
            np.testing.assert_array_equal(got[column], want[column])
        for column in ("x", "y", "ra", "dec"):
            np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-9)
        for column in ("flux", "flux_err"):
            np.testing.assert_allclose(got[column], want[column], rtol=1e-12)
        flagged = np.concatenate([flagged, want["flags"]])
    # every flag this setting can raise was raised somewhere, so each was compared
    raised = np.bitwise_or.reduce(flagged)
    assert raised & astro.FLAG_EDGE
    assert raised & (astro.FLAG_DEBLENDED if deblend else astro.FLAG_BLENDED)
