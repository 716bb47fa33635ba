"""The TensorFlow engine's neuroscience pieces against the library code they re-express,
on inputs chosen to break them (ties, constant images, borders wider than the image,
other radii), and the measurement behind its one wider bound (FA)."""
import math
from unittest import mock

import nibabel as nib
import numpy as np
import pytest

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro, nifti
from pipelines.errors import EngineUnavailable, InputError

pytestmark = pytest.mark.correctness
tf = pytest.importorskip("tensorflow")
tfn = pytest.importorskip("engines.tf.neuro")
from engines import create_engine  # noqa: E402
from engines.tf import FLOAT32, FLOAT64, io  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return create_engine("tensorflow", workers=2).start()


def mask_of(image, radius=4, numpass=2, dilate=1):
    params = neuro.NeuroParams(median_radius=radius, numpass=numpass, dilate=dilate)
    return neuro.brain_mask_kernel(image, params)


# dipy's Otsu divides 0 by 0 for an empty class (a constant image): its answer stands.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("case", ["noise", "ties", "constant", "tiny", "two-values"])
@pytest.mark.parametrize("radius,numpass,dilate", [(4, 2, 1), (1, 1, None), (2, 3, 0)])
def test_mask_is_dipys(case, radius, numpass, dilate):
    rng = np.random.default_rng(len(case) * 7 + radius)
    image = {
        "noise": lambda: rng.gamma(2.0, 50.0, (13, 11, 9)),
        "ties": lambda: rng.integers(0, 6, (12, 10, 9)),  # medians land on tied values
        "constant": lambda: np.full((8, 7, 6), 3.5),  # histogram of one value
        "tiny": lambda: rng.normal(100, 20, (3, 4, 5)),  # reflect borders wider than it
        "two-values": lambda: np.where(rng.random((9, 9, 9)) < 0.3, 10.0, 1.0),
    }[case]().astype(np.float32)
    want = mask_of(image, radius, numpass, dilate)
    got = tfn.median_otsu_mask(image, radius, numpass, dilate).numpy()
    assert (got == want).all(), f"{int((got != want).sum())} voxels differ"


def test_histogram_edges_are_numpys():
    rng = np.random.default_rng(1)
    pairs = [(0.0, 1.0), (-3.5, 7.25), (5.0, 5.0), (1e-30, 2e-30), (1e6, 1e6 + 1.0)]
    pairs += [tuple(sorted(rng.normal(0, 10 ** rng.uniform(-3, 5), 2))) for _ in range(50)]
    for first, last in pairs:
        first, last = np.float32(first), np.float32(last)
        try:
            _, want = np.histogram(np.array([first, last], np.float32), 256)
        except ValueError:  # "Too many bins for data range": refused as an input error
            with pytest.raises(InputError, match="too narrow for 256 histogram bins"):
                tfn._histogram_edges(tf.constant(first), tf.constant(last), 256)
            continue
        got = tfn._histogram_edges(tf.constant(first), tf.constant(last), 256).numpy()
        assert got.dtype == want.dtype and (got == want).all(), (first, last)


def test_otsu_is_dipys():
    from dipy.segment.threshold import otsu

    rng = np.random.default_rng(2)
    for _ in range(30):
        image = np.concatenate([rng.normal(rng.uniform(0, 50), rng.uniform(1, 9), 3000),
                                rng.normal(rng.uniform(60, 200), rng.uniform(1, 30), 5000)])
        image = image.astype(np.float32)
        counts, edges = np.histogram(image, 256)
        assert tfn._dipy_otsu(tf.constant(counts), tf.constant(edges)).numpy() == otsu(image)


@pytest.mark.parametrize("rician", [True, False])
@pytest.mark.parametrize("patch,block", [(1, 5), (1, 2), (2, 3)])
def test_nlmeans_is_dipys_classic(engine, patch, block, rician):
    from dipy.denoise.nlmeans import nlmeans

    rng = np.random.default_rng(patch * 10 + block)
    volume = rng.gamma(4.0, 25.0, (14, 12, 11)).astype(np.float32)
    mask = rng.random(volume.shape) < 0.6
    params = neuro.NeuroParams(patch_radius=patch, block_radius=block, rician=rician)
    want = nlmeans(volume, 12.5, mask=mask, patch_radius=patch, block_radius=block,
                   rician=rician, num_threads=1, method="classic")
    got = tfn._Denoiser(engine, np.ascontiguousarray(mask.T), params).denoise(
        tf.constant(np.ascontiguousarray(volume.T)), 12.5).numpy().T
    assert (got == want).all(), f"max diff {np.abs(got - want).max()}"


def test_nlmeans_slabs_give_the_same_answer(engine, monkeypatch):
    """Slabs bound the denoiser's memory (an HCP volume); their seams change nothing."""
    rng = np.random.default_rng(5)
    volume = tf.constant(rng.gamma(4.0, 25.0, (21, 9, 10)).astype(np.float32))
    mask = np.ones((21, 9, 10), bool)
    whole = tfn._Denoiser(engine, mask, neuro.NeuroParams()).denoise(volume, 9.0)
    monkeypatch.setattr(tfn, "WORK_BYTES", 1)  # one plane per slab
    slabs = tfn._Denoiser(engine, mask, neuro.NeuroParams())
    assert slabs.depth == 1
    assert (slabs.denoise(volume, 9.0).numpy() == whole.numpy()).all()


def test_float32_denoiser_within_its_bound():
    from dipy.denoise.nlmeans import nlmeans

    engine32 = create_engine("tensorflow", workers=2, tf_precision="float32").start()
    rng = np.random.default_rng(3)
    truth = np.where(rng.random((16, 14, 12)) < 0.5, 200.0, 20.0)
    volume = np.abs(truth + rng.normal(0, 10, truth.shape)).astype(np.float32)
    mask = np.ones(volume.shape, bool)
    want = nlmeans(volume, 10.0, mask=mask, patch_radius=1, block_radius=5, rician=True,
                   num_threads=1, method="classic").astype(np.float64)
    got = tfn._Denoiser(engine32, mask.T, neuro.NeuroParams()).denoise(
        tf.constant(np.ascontiguousarray(volume.T)), 10.0).numpy().T.astype(np.float64)
    bound = FLOAT32[("denoise", "denoised")].bound(np.abs(want), np.abs(want).max())
    assert (np.abs(got - want) <= bound).all()
    assert np.abs(got - want).max() > 0  # it is float32: not the float64 path by mistake


def test_noise_sigma_is_dipys():
    from dipy.denoise.noise_estimate import estimate_sigma

    rng = np.random.default_rng(4)
    for shape in [(9, 8, 7), (2, 3, 4), (30, 31, 1)]:
        volume = rng.gamma(3.0, 40.0, shape).astype(np.float32)
        assert float(tfn._estimate_sigma(tf.constant(volume))) == \
            float(estimate_sigma(volume, disable_background_masking=False, N=0)[0])


def test_design_matrix_is_dipys():
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import design_matrix

    for name in ("phantom-tiny", "dipy-small64d"):
        state = load_dataset(name).inputs[0].load_state()
        gtab = gradient_table(state["bvals"], bvecs=state["bvecs"], b0_threshold=10)
        assert (tfn.design_matrix(state["bvals"], state["bvecs"]).numpy()
                == design_matrix(gtab)).all()


@pytest.mark.parametrize("name", ["phantom-tiny", "dipy-small64d"])
def test_fa_bound_is_the_references_own_spread(name, tmp_path):
    """dipy's FA with its float32 logs rounded to nearest (as another CPU's logf may)
    instead of numpy's vectorised logf: the spread the TensorFlow bound rests on."""
    from engines.reference import ReferenceEngine
    from pipelines.steps import RunContext

    run = reference_run(load_dataset(name).inputs[0])
    log = np.log

    def rounded(x, *args, **kwargs):
        x = np.asarray(x)
        if x.dtype == np.float32 and not args and not kwargs:
            return log(x.astype(np.float64)).astype(np.float32)
        return log(x, *args, **kwargs)

    ctx = RunContext(tmp_path, neuro.NeuroParams(), neuro.NeuroPartitioning())
    with mock.patch.object(np, "log", rounded):
        fa = ReferenceEngine().run_step(neuro.FIT_TENSOR, run.state_before("fit_tensor"),
                                        ctx).outputs["fa"]
    spread = np.abs(fa.astype(np.float64) - run.state["fa"]).max()
    assert 0 < spread < FLOAT64[("fit_tensor", "fa")].atol / 2


def test_nifti_reader_is_nibabels(tmp_path):
    """Every layout the reference reads: gzipped, scaled integers, big-endian, float64."""
    rng = np.random.default_rng(6)
    data = rng.integers(-300, 3000, (7, 6, 5, 4)).astype(np.int16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cases = {}
    scaled = nib.Nifti1Image(data, affine)
    scaled.header.set_slope_inter(0.37, 12.5)
    cases["scaled.nii.gz"] = scaled
    cases["float64.nii"] = nib.Nifti1Image(data.astype(np.float64) / 7, affine)
    big = nib.Nifti1Image(data.astype(">f4"), affine)
    big.header.set_data_dtype(">f4")
    cases["big.nii"] = big
    for name, image in cases.items():
        path = tmp_path / name
        nib.save(image, path)
        layout = io.NiftiLayout.of(path)
        got = {int(k): v.numpy() for k, v, _ in layout.volumes([3, 1])}
        for k in (1, 3):
            assert (got[k] == nifti.read_volume(path, k).T).all(), (name, k)


def test_nan_volume_is_the_references_error(engine, tmp_path):
    data = np.ones((4, 4, 4, 3), np.float32)
    data[1, 2, 3, 2] = np.nan
    path = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    layout = io.NiftiLayout.of(path)
    with pytest.raises(InputError, match=r"nan.nii: volume 2 holds 1 NaN or infinite"):
        list(tfn._volumes(engine, layout, range(3), "read"))


def test_fits_reader_is_astropys():
    from pipelines import fitsio

    path = load_dataset("survey-tiny").inputs[0].files()[0]
    planes = io.fits_planes(path)
    with fitsio.open_fits(path) as hdul:
        for name, plane in planes.items():
            want = fitsio.read_plane(hdul, name)
            got = plane.read().numpy()
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
            for start, stop in [(10, 50), (255, 256)]:
                record = io.read_records(*([v] for v in plane.band(start, stop)))
                got = io.decode(record, plane.layout[:1] + (-1, plane.shape[1])).numpy()
                assert np.array_equal(got, want[start:stop], equal_nan=True)
        together = io.read_planes(list(planes.values()))
        assert all(np.array_equal(t.numpy(), p.read().numpy(), equal_nan=True)
                   for t, p in zip(together, planes.values()))


def test_threads_precision_and_device_are_recorded(engine):
    facts = engine.describe()
    assert facts["intra_op_threads"] == engine.workers >= 1
    assert facts["precision"] == "float64" and facts["device"].startswith(("CPU", "GPU"))
    assert facts["versions"]["tensorflow"] == tf.__version__
    with pytest.raises(EngineUnavailable, match="precision must be one of float64, float32"):
        create_engine("tensorflow", tf_precision="float16")
    assert math.isclose(FLOAT64[("fit_tensor", "fa")].atol, 4e-6)


def test_singular_normal_equations_get_the_least_squares_answer():
    """A voxel whose WLS system is singular gets dipy's pinv answer, not NaN (or an
    eigen-decomposition error for the whole batch)."""
    _, _, fa_md = tfn._fit_fns(1.0)
    identity = [float(i == j) for i, j in tfn._UPPER]
    singular = [float(i == j and i < 6) for i, j in tfn._UPPER]  # the S0 column lost
    rhs = tf.constant([[1e-3, 0, 1e-3, 0, 0, 1e-3, 5.0]] * 2, tf.float64)
    fa, md = fa_md(tf.constant([identity, singular], tf.float64), rhs,
                   tf.ones(7, tf.float64), tf.constant(1e-9, tf.float64))
    assert np.isfinite(fa.numpy()).all() and np.allclose(md.numpy(), 1e-3)
