"""The TensorFlow engine's warp and coadd pieces against the library code they
re-express (wcslib through astropy, reproject + scipy's map_coordinates, astropy's
sigma clipping), on inputs chosen to break them: pixels on the edges and half-pixel
borders, NaN in the stencil, FK5 against ICRS, ties, even and odd counts, tiny arrays;
then the two steps end to end on small surveys, and the coadd's independence from its
strip height."""
import math
import pathlib

import numpy as np
import pytest
from astropy.stats import sigma_clip, sigma_clipped_stats
from astropy.wcs import WCS
from astropy.wcs.utils import pixel_to_pixel

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import astro
from pipelines.steps import RunContext

pytestmark = pytest.mark.correctness
tf = pytest.importorskip("tensorflow")
A = pytest.importorskip("engines.tf.astro")
from engines import create_engine  # noqa: E402

SKYMAP = astro.SkyMap(154.1066, -4.9325, 0.333, patch_inner=400, patch_border=20,
                      patches_x=5, patches_y=5)


def ccd_wcs(ra, dec, frame="ICRS", projection="TAN", angle=0.3, scale=0.263):
    """A CCD's WCS as the survey writes them: CD matrix with a small rotation."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = [f"RA---{projection}", f"DEC--{projection}"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [300.5, 520.5]
    c, s, d = math.cos(math.radians(angle)), math.sin(math.radians(angle)), scale / 3600
    wcs.wcs.cd = [[-d * c, d * s], [d * s, d * c]]
    wcs.wcs.radesys = frame
    if frame == "FK5":
        wcs.wcs.equinox = 2000.0
    return wcs


def pixel_map(src, dst, x, y):
    params = A.pixel_map_params(A.Zenithal.of(src), A.Zenithal.of(dst))
    got = A._pixel_map(tf.constant(params), tf.constant(x), tf.constant(y),
                       A.Zenithal.of(src).proj, A.Zenithal.of(dst).proj)
    return [g.numpy() for g in got]


@pytest.mark.parametrize("frame", ["ICRS", "FK5"])
@pytest.mark.parametrize("where", ["survey", "high-dec", "ra-zero"])
def test_pixel_map_is_wcslibs(frame, where):
    """Patch (STG) <-> CCD (TAN) pixels as astropy's pixel_to_pixel gives them (FK5 goes
    through astropy's frame transformation), to 1e-8 pixel: wcslib itself works in
    degrees, whose rounding is ~1e-9 pixel here."""
    centre = {"survey": (154.1066, -4.9325), "high-dec": (40.0, 81.0),
              "ra-zero": (0.01, 12.0)}[where]
    skymap = astro.SkyMap(*centre, 0.333, patch_inner=400, patch_border=20,
                          patches_x=5, patches_y=5)
    patch = skymap.patch_wcs((2, 1))
    ccd = ccd_wcs(centre[0] - 0.02, centre[1] + 0.01, frame)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-300, 900, 4000), rng.uniform(-300, 900, 4000)
    for src, dst in ((patch, ccd), (ccd, patch), (ccd, ccd_wcs(*centre, frame="ICRS"))):
        want = pixel_to_pixel(src, dst, x, y)
        got = pixel_map(src, dst, x, y)
        for g, w in zip(got, want):
            assert np.abs(g - w).max() < 1e-8


def test_other_wcs_are_refused():
    sin = ccd_wcs(10.0, 20.0, projection="SIN")
    with pytest.raises(NotImplementedError, match="SIN"):
        A.Zenithal.of(sin)
    sip = ccd_wcs(10.0, 20.0)
    sip.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    from astropy.wcs import Sip
    sip.sip = Sip(np.zeros((3, 3)), np.zeros((3, 3)), None, None, sip.wcs.crpix)
    with pytest.raises(NotImplementedError):
        A.Zenithal.of(sip)


@tf.function(jit_compile=True)
def resample(image, row, col):
    flat = tf.reshape(image, (-1,))
    return A._bilinear(lambda r, c: (tf.gather(flat, r * image.shape[1] + c),),
                       image.shape[0], image.shape[1], row, col)[0]


@pytest.mark.parametrize("shape", [(6, 9), (1, 5), (4, 1), (2, 2)])
def test_bilinear_is_reprojects(shape):
    """reproject's map_coordinates wrapper over scipy's order-1 spline, exactly: the
    outer half of the outermost pixels, the stencil point mirrored past the last pixel,
    NaN anywhere in the stencil (even at weight 0), NaN and far coordinates."""
    from reproject._array_utils import map_coordinates

    rng = np.random.default_rng(sum(shape))
    image = rng.normal(100, 30, shape).astype(np.float32)
    if image.size > 4:
        image.flat[rng.choice(image.size, 3, replace=False)] = np.nan
    special = []
    for n in shape:  # per axis: borders, half-pixel borders and just inside them, centres
        special.append([-0.5, np.nextafter(-0.5, -1), -0.25, 0.0, n - 1, n - 0.75, n - 0.5,
                        np.nextafter(n - 0.5, 0), -1.0, n, np.nan, 0.5, *range(n)])
    grid = np.array(np.meshgrid(*special, indexing="ij")).reshape(2, -1)
    uniform = np.array([rng.uniform(-1, n, 3000) for n in shape])
    coords = np.concatenate([grid, uniform], axis=1)
    want = map_coordinates(image, coords, order=1, cval=np.nan, mode="constant",
                           output=np.empty(coords.shape[1]))
    got = resample(tf.constant(image), tf.constant(coords[0]), tf.constant(coords[1])).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    # scipy's arithmetic, term for term, in float64; XLA may fuse a multiply and an add
    # (FMA), so the last bit of a float64 may differ; the outputs are float32.
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-15, atol=1e-12)


def test_sorting_network_sorts():
    """Batcher's network on every 0/1 input (the 0-1 principle) up to 12 values."""
    for n in range(1, 13):
        pairs = A._sorting_network(n)
        for bits in range(1 << n):
            v = [(bits >> i) & 1 for i in range(n)]
            for i, j in pairs:
                v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
            assert v == sorted(v), (n, bits)


@tf.function(jit_compile=True)
def select_pair(x, rank):
    keys = A._float_keys(x)
    high = tf.cast(tf.bitwise.right_shift(keys, 16), tf.int32)
    finite = tf.math.is_finite(x)
    return A._select_pair(rank, keys, high, finite, A._histogram(high, finite, A._KEY_BINS))


def test_order_statistics():
    """The radix selection of ranks r, r + 1 against a sort: negatives, zeros of both
    signs, duplicates, values that share their top 16 bits, NaN and infinities left out."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, 500), rng.normal(1e4, 1, 300), [0.0, -0.0] * 5,
                        np.round(rng.normal(0, 3, 200)), 1 + rng.uniform(0, 1e-6, 100),
                        [np.nan, np.inf, -np.inf] * 3]).astype(np.float32)
    rng.shuffle(x)
    ordered = np.sort(x[np.isfinite(x)])
    for rank in [0, 1, 7, 250, 500, 511, 600, 999, len(ordered) // 2, len(ordered) - 2]:
        first, second = select_pair(tf.constant(x), tf.constant(rank))
        assert first.numpy() == ordered[rank] and second.numpy() == ordered[rank + 1]


def visit_weight(values):
    return float(A._visit_weight(tf.constant(values, tf.float32), tf.constant(3.0),
                                 tf.constant(5)).numpy())


@pytest.mark.parametrize("case", ["sky", "ties", "outliers", "nan", "one", "two", "three",
                                  "eight", "constant"])
def test_visit_weight_is_astropys(case):
    """1 / sigma_clipped_stats' mean of a variance plane. astropy clips a float32 array
    without an axis: numpy's float32 median and comparisons are reproduced exactly, its
    float32 means and stds are pairwise float32 sums (here float64 sums rounded to
    float32), so the weights may differ in the last bits: measured at most 2 ulps on
    every warp of survey-tiny, -m13 and -small."""
    rng = np.random.default_rng(len(case))
    values = {
        "sky": lambda: rng.gamma(40, 4, (60, 70)),
        "ties": lambda: np.round(rng.gamma(40, 4, (60, 70)) / 4) * 4,
        "outliers": lambda: np.where(rng.random((60, 70)) < 0.05, 1e4,
                                     rng.gamma(40, 4, (60, 70))),
        "nan": lambda: np.where(rng.random((60, 70)) < 0.3, np.nan, rng.gamma(40, 4, (60, 70))),
        "one": lambda: np.array([[np.nan, 7.5, np.nan]]),
        "two": lambda: np.array([[3.0, np.nan, 5.0]]),
        "three": lambda: np.array([[3.0, 4.0, 100.0]]),
        "eight": lambda: np.array([[1.0, 2, 2, 2, 3, 3, 50, -4]]),
        "constant": lambda: np.full((5, 5), 2.5),
    }[case]().astype(np.float32)
    mean, _, _ = sigma_clipped_stats(values[np.isfinite(values)], sigma=3.0)
    want = np.float32(1.0) / mean
    got = np.float32(visit_weight(values))
    assert abs(int(got.view(np.int32)) - int(want.view(np.int32))) <= 2, (got, want)


def reference_coadd(image, variance, weight, iterations):
    """The reference kernel's clipping and weighted mean (pipelines/astro.coadd_kernel)."""
    image, variance = image.astype(np.float64), variance.astype(np.float64)
    usable = np.isfinite(image) & np.isfinite(variance)
    clipped = sigma_clip(np.ma.masked_array(image, ~usable), sigma=3.0, maxiters=iterations,
                         cenfunc="median", stdfunc="std", axis=0, masked=True, copy=True)
    keep = ~np.ma.getmaskarray(clipped)
    w = np.where(keep, weight[:, None, None], 0.0)
    total, n = w.sum(axis=0), keep.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (np.where(keep, image, 0.0) * w).sum(axis=0) / total
        var = (np.where(keep, variance, 0.0) * w * w).sum(axis=0) / (total * total)
    return (np.where(n > 0, mean, np.nan).astype(np.float32),
            np.where(n > 0, var, np.nan).astype(np.float32), n.astype(np.int16))


@pytest.mark.filterwarnings("ignore:Input data contains invalid values")
@pytest.mark.parametrize("iterations", [1, 2, 5, None])
def test_clipped_mean_is_astropys(iterations):
    """Per-pixel clipping (astropy's fast path: the last bounds decide, so a value
    clipped early can come back) and the weighted mean, on stacks with outliers, ties,
    no data in a plane, single visits, and visits padded with no data."""
    rng = np.random.default_rng(7)
    visits, rows, cols = 5, 20, 23
    image = rng.normal(10, 2, (visits, rows, cols))
    image[rng.random(image.shape) < 0.08] = 300.0  # cosmic-ray-like outliers
    image[:, :3] = np.round(image[:, :3])  # ties
    image[2, 5] = image[0, 5]  # identical visits
    image[rng.random(image.shape) < 0.15] = np.nan
    variance = rng.gamma(20, 1, (visits, rows, cols))
    variance[rng.random(image.shape) < 0.05] = np.nan  # data in the image only
    image[:, 7, :4] = np.nan
    image[1:, 8, :4] = np.nan  # one visit
    image, variance = image.astype(np.float32), variance.astype(np.float32)
    weight = rng.uniform(0.5, 2, visits)
    want = reference_coadd(image, variance, weight, iterations)
    padded = 7  # visits of other patches: no data
    pad = ((0, padded - visits), (0, 0), (0, 0))
    kernel = A._coadd_kernel(A._clip_rounds(iterations, padded))
    got = kernel(tf.constant(np.pad(image, pad, constant_values=np.nan)),
                 tf.constant(np.pad(variance, pad, constant_values=np.nan)),
                 tf.constant(np.pad(weight, (0, padded - visits))), tf.constant(3.0, tf.float64))
    np.testing.assert_array_equal(got[2].numpy(), want[2])
    for g, w in zip(got[:2], want[:2]):
        np.testing.assert_array_equal(g.numpy(), w)


# -- the coadd step ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tf_engine():
    return create_engine("tensorflow", workers=2).start()


def run_step(engine, run, step, workdir, strip_rows=256):
    ctx = RunContext(pathlib.Path(workdir), astro.AstroParams(),
                     astro.AstroPartitioning(coadd_strip_rows=strip_rows))
    return engine.run_step(astro.STEP_BY_NAME[step], run.state_before(step), ctx).outputs


def test_coadd_strips_do_not_matter(tf_engine, tmp_path):
    """Any strip height gives the same coadd, bit for bit (only memory changes)."""
    from astropy.io import fits

    run = reference_run(load_dataset("survey-tiny").inputs[0])
    tall = run_step(tf_engine, run, "coadd", tmp_path / "tall")["coadds"]
    thin = run_step(tf_engine, run, "coadd", tmp_path / "thin", strip_rows=7)["coadds"]
    assert set(tall) == set(thin)
    for patch in tall:
        with fits.open(tall[patch]) as a, fits.open(thin[patch]) as b:
            for plane in ("IMAGE", "VARIANCE", "EXPCOUNT"):
                np.testing.assert_array_equal(a[plane].data, b[plane].data)
            assert a["IMAGE"].header == b["IMAGE"].header
