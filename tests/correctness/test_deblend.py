"""Deblending, an option of the detect step (off in the study's pipeline): every engine
matches the reference with it on, and on astropy's real image of M13, a crowded globular
cluster, it is what makes the catalog agree with photutils run directly on the image."""
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from engines.reference import ReferenceEngine
from fixtures.datasets import load_dataset, m13_path
from fixtures.reference import reference_run
from pipelines import astro
from pipelines.steps import RunContext
from tests.astro_checks import assert_catalog_match
from tests.checks import tolerances_of

pytestmark = pytest.mark.correctness


@pytest.fixture(scope="module")
def m13_run():
    return reference_run(load_dataset("survey-m13").inputs[0])


def detect(engine, run, workdir, **params):
    ctx = RunContext(workdir, astro.AstroParams(**params), astro.AstroPartitioning())
    engine.check_params(astro.STEPS, ctx.params)
    return engine.run_step(astro.DETECT, run.state_before("detect"), ctx).outputs["catalog"]


def test_detect_with_deblending_matches_reference(engine, m13_run, tmp_path):
    want = detect(ReferenceEngine().start(), m13_run, tmp_path / "ref", deblend=True)
    got = detect(engine, m13_run, tmp_path / "engine", deblend=True)
    assert_catalog_match(got, want, 1.0, tolerances_of(engine, "astro"))
    assert (want["flags"] & astro.FLAG_DEBLENDED).sum() > 50  # the cluster's blends


# -- M13 against a star finder run directly on the original image ------------------------

MATCH_PIXELS = 2.0  # 2": the image's seeing disc is ~3 pixels; resampling moves ~0.1
EDGE = 6  # the loader's 4-pixel edge frame and the filter's reach: no one detects there


def independent_catalog():
    """photutils' DAOStarFinder (peak finding with a Gaussian kernel: another algorithm
    than the pipeline's segmentation, so agreement is not built in) on m13.fits itself,
    not on the pipeline's warps or coadds: a 32-pixel background mesh subtracted, the
    pipeline's FWHM, 5 times the background's rms. Returns (x, y, flux), image pixels."""
    from astropy.stats import SigmaClip
    from photutils.background import Background2D
    from photutils.detection import DAOStarFinder

    image = fits.getdata(m13_path()).astype(np.float64)
    background = Background2D(image, 32, filter_size=3, sigma_clip=SigmaClip(sigma=3.0))
    found = DAOStarFinder(threshold=5 * float(np.median(background.background_rms)),
                          fwhm=astro.AstroParams().detect_kernel_fwhm)(
        image - background.background)
    x, y = np.asarray(found["x_centroid"]), np.asarray(found["y_centroid"])
    inside = (x > EDGE) & (x < image.shape[1] - 1 - EDGE) & \
        (y > EDGE) & (y < image.shape[0] - 1 - EDGE)
    return x[inside], y[inside], np.asarray(found["flux"])[inside]


def brightest_third(flux):
    return flux >= np.sort(flux)[::-1][len(flux) // 3 - 1]


def agreement(catalog, independent):
    """(share of the star finder's brightest third the pipeline found, share of the
    pipeline's brightest third the star finder found), matched within MATCH_PIXELS."""
    ix, iy, iflux = independent
    catalog = catalog[np.isfinite(catalog["flux"])]
    wcs = WCS(fits.getheader(m13_path()))
    px, py = wcs.world_to_pixel_values(catalog["ra"], catalog["dec"])
    to_pipeline, _ = cKDTree(np.column_stack([px, py])).query(np.column_stack([ix, iy]))
    to_independent, _ = cKDTree(np.column_stack([ix, iy])).query(np.column_stack([px, py]))
    return (float(np.mean(to_pipeline[brightest_third(iflux)] <= MATCH_PIXELS)),
            float(np.mean(to_independent[brightest_third(catalog["flux"])] <= MATCH_PIXELS)))


def test_m13_deblended_agrees_with_a_star_finder_run_directly(m13_run, tmp_path):
    """Measured: of DAOStarFinder's brightest third (67 stars), the catalog holds 25%
    without deblending (merged footprints: a blend's centroid lies between its stars) and
    92.5% with it; of the catalog's own brightest third, the star finder confirms 67%
    and 78% (the rest: extended or merged light a peak finder does not report). The
    bounds leave room for three or four stars to move across the match radius."""
    independent = independent_catalog()
    off = agreement(m13_run.state["catalog"], independent)
    catalog = detect(ReferenceEngine().start(), m13_run, tmp_path, deblend=True)
    on = agreement(catalog, independent)
    print(f"\nM13, {len(independent[0])} stars by DAOStarFinder: its brightest third "
          f"found {off[0]:.3f} without deblending, {on[0]:.3f} with; the catalog's "
          f"brightest third confirmed {off[1]:.3f} / {on[1]:.3f}")
    assert len(independent[0]) >= 150, "too few stars for a rate to mean anything"
    assert on[0] >= 0.87 and off[0] < 0.5  # the study's footprints do merge M13's stars
    assert on[1] >= off[1]
