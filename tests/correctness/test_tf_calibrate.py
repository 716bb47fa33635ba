"""TensorFlow's calibrate (engines/tf/calibrate.py), piece by piece, against the libraries
the reference's kernel calls: every piece must give the same bits, since the cosmic-ray
and SAT masks are threshold decisions. Small synthetic images, so this runs in seconds;
the whole step is held to the reference by the step tests."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
astroscrappy = pytest.importorskip("astroscrappy")

from astroscrappy import utils  # noqa: E402
from scipy.ndimage import distance_transform_edt  # noqa: E402

from engines.tf import calibrate  # noqa: E402  (loads engines.tf: its TF settings first)

pytestmark = pytest.mark.correctness


def f32(value):
    return tf.constant(np.float32(value))


def test_separable_medians_and_dilations_are_astroscrappys():
    rng = np.random.default_rng(0)
    for shape in [(37, 53), (9, 9), (4, 30), (64, 31)]:
        x = rng.normal(100, 10, shape).astype(np.float32)
        x[rng.random(shape) < 0.2] = 100.0  # ties
        x[rng.random(shape) < 0.05] = -0.0
        for size in (3, 5, 7, 9):
            got = calibrate.sepmedfilt(tf.constant(x), size).numpy()
            want = getattr(utils, f"sepmedfilt{size}")(x)
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), (shape, size)
        b = rng.random(shape) < 0.05
        assert np.array_equal(calibrate.dilate3(tf.constant(b)).numpy(), utils.dilate3(b))
        for n in (1, 2, 3):
            assert np.array_equal(calibrate.dilate5(tf.constant(b), n).numpy(),
                                  utils.dilate5(b, n)), (shape, n)


def test_laplacian_plus_is_astroscrappys_compiled_arithmetic():
    """Subsample, Laplacian (as GCC -ffast-math grouped it), clip, rebin: bit for bit,
    over values of very different magnitudes so that every rounding shows."""
    rng = np.random.default_rng(1)
    for shape in [(37, 53), (1, 7), (6, 1), (50, 40)]:
        scale = rng.choice([1, 1e3, 1e-3, -1], shape).astype(np.float32)
        x = (rng.normal(100, 30, shape) * scale).astype(np.float32)
        lap = utils.laplaceconvolve(utils.subsample(x))
        lap[lap < 0] = 0.0
        want = utils.rebin(lap)
        got = calibrate.laplacian_plus(tf.constant(x)).numpy()
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), shape


def test_order_statistics():
    rng = np.random.default_rng(2)
    for n in (1, 2, 7, 10, 1001):
        x = rng.normal(0, 1e3, (n, 3)).astype(np.float32)
        x[rng.random(x.shape) < 0.3] = 5.0
        good = rng.random(x.shape) < 0.6
        good[0, 0] = True
        values = x[good]
        got = calibrate.numpy_median(tf.constant(x), tf.constant(good)).numpy()
        assert got == np.float32(np.median(values)), n
        got = calibrate.low_median(tf.constant(x), tf.constant(good)).numpy()
        assert got == utils.median(values.copy(), len(values)), n


def test_saturation_growth_is_distance_transform_edt():
    rng = np.random.default_rng(3)
    for shape in [(40, 70), (12, 9), (3, 20)]:
        sat = rng.random(shape) < 0.01
        sat[0, 3] = sat[-1, -1] = True  # at the edges, where nothing outside counts
        for radius in (1, 2, 5, 8):
            want = distance_transform_edt(~sat) <= radius
            assert np.array_equal(calibrate.grow(tf.constant(sat), radius).numpy(), want)


def synthetic_ccd(seed, shape=(96, 80), gain=4.0, readnoise=7.0, satlevel=30000.0):
    """Sky, stars (some saturated: flat cores at satlevel), cosmic rays (single pixels and
    short tracks, some on stars and at the edges), and the variance plane."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    image = np.full(shape, 200.0)
    for k in range(15):
        y0, x0, sigma = rng.uniform(0, ny), rng.uniform(0, nx), rng.uniform(1.0, 2.0)
        flux = 10 ** rng.uniform(2, 5) if k else 5e6
        image += flux / (2 * np.pi * sigma ** 2) * np.exp(
            -((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * sigma ** 2))
    variance = image / gain + (readnoise / gain) ** 2
    image += rng.normal(0, 1, shape) * np.sqrt(variance)
    for _ in range(25):
        y0, x0, angle = rng.integers(0, ny), rng.integers(0, nx), rng.uniform(0, np.pi)
        for t in range(rng.integers(1, 6)):
            y, x = int(y0 + t * np.sin(angle)), int(x0 + t * np.cos(angle))
            if 0 <= y < ny and 0 <= x < nx:
                image[y, x] += rng.uniform(200, 5000)
    image = np.minimum(image, satlevel)
    return image.astype(np.float32), variance.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lacosmic_is_astroscrappys(seed):
    gain, satlevel = (4.0, 30000.0) if seed != 2 else (1.7, 20000.0)
    image, variance = synthetic_ccd(seed, gain=gain, satlevel=satlevel)
    want, _ = astroscrappy.detect_cosmics(
        image, invar=variance, sigclip=4.5, sigfrac=0.3, objlim=5.0, gain=gain,
        readnoise=7.0, satlevel=satlevel, niter=4, sepmed=True, cleantype="meanmask",
        fsmode="median")
    assert want.sum() > 20  # the test means something
    lacosmic = tf.function(calibrate.lacosmic, jit_compile=True, autograph=False)
    got = lacosmic(tf.constant(image), tf.constant(variance), f32(gain), f32(satlevel),
                   f32(4.5), f32(0.3), f32(5.0), niter=4).numpy()
    assert np.array_equal(got, want), int((got != want).sum())


def test_saturated_star_core_is_masked_as_astroscrappy_does():
    image, _ = synthetic_ccd(0)
    got = calibrate.update_mask(tf.constant(image), f32(30000.0)).numpy()
    assert got.any()
    want = utils.dilate5((image >= 30000.0) & (utils.sepmedfilt7(image) > 3000.0), 2)
    assert np.array_equal(got, want)


def test_masks_and_fill_are_the_reference_kernels():
    """NO_DATA (NaN, inf, negative variance), SAT grown by 8 at the edges, and the fill:
    the reference's own lines, on a mask with BAD, SAT and an unnamed bit."""
    rng = np.random.default_rng(4)
    shape = (60, 50)
    image = rng.normal(200, 5, shape).astype(np.float32)
    variance = rng.normal(50, 5, shape).astype(np.float32)
    mask = np.where(rng.random(shape) < 0.02, 1, 0).astype(np.int32)  # BAD
    mask[rng.random(shape) < 0.003] |= 2  # SAT
    mask[0, 10] |= 2
    mask[5, 5] |= 64  # a plane that is not unusable
    image[3, 4], image[7, 7], variance[8, 8], variance[9, 9] = np.nan, np.inf, np.nan, -1.0
    bits = {"BAD": 0, "SAT": 1, "CR": 3, "EDGE": 4, "NO_DATA": 8}
    unusable_bits = sum(1 << bits[n] for n in ("BAD", "SAT", "CR", "EDGE", "NO_DATA"))

    want_mask = mask.copy()
    no_data = ~np.isfinite(image) | ~np.isfinite(variance) | (variance < 0)
    want_mask[no_data] |= 1 << 8
    want_mask[distance_transform_edt((want_mask & 2) == 0) <= 8] |= 2
    unusable = (want_mask & unusable_bits) != 0
    want_image, want_variance = image.copy(), variance.copy()
    want_image[unusable] = float(np.median(image[~unusable]))
    want_variance[unusable] = float(np.median(variance[~unusable]))

    i32 = lambda v: tf.constant(v, tf.int32)  # noqa: E731
    got = calibrate._masks_and_fill(tf.constant(image), tf.constant(mask),
                                    tf.constant(variance), i32(256), i32(2),
                                    i32(unusable_bits), 8)
    got_mask, got_unusable, n_usable, got_image, got_variance = (t.numpy() for t in got)
    assert np.array_equal(got_mask, want_mask)
    assert np.array_equal(got_unusable, unusable) and n_usable == (~unusable).sum()
    assert np.array_equal(got_image, want_image)
    assert np.array_equal(got_variance, want_variance)
