"""Plain FITS images (one image HDU, a celestial WCS, a camera's keywords or none) go in
as they come: what the loader assumes for each is checked value by value, and the real
plain image astropy ships (M13) runs through the command on every engine."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from fixtures.datasets import load_dataset, m13_path
from fixtures.reference import reference_run
from pipelines import astro, plain_images
from pipelines.errors import InputError
from tests.astro_checks import assert_catalog_match, assert_fits_match
from tests.checks import tolerances_of

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]
M13_SKY = ["--pixel-scale", "1.0", "--patch-inner", "128", "--patch-border", "16"]


def m13():
    with fits.open(m13_path()) as hdul:
        return hdul[0].data.copy(), hdul[0].header.copy()


def write_plain(path: Path, data=None, extension=False, **keywords) -> Path:
    """M13's image and WCS (or `data`), with keywords added; in the primary HDU or, with
    `extension`, in an image extension after an empty primary holding the keywords."""
    image, header = m13()
    data = image if data is None else data
    if extension:
        primary = fits.PrimaryHDU(header=fits.Header(keywords))
        fits.HDUList([primary, fits.ImageHDU(data, header)]).writeto(path)
    else:
        header.update(keywords)
        fits.PrimaryHDU(data, header).writeto(path)
    return path


def ingest_one(path, tmp_path):
    made, skipped = plain_images.ingest([path], tmp_path / "ccds")
    assert skipped == [] and len(made) == 1
    with fits.open(tmp_path / "ccds" / made[0].ccd_file) as hdul:
        planes = {p: hdul[p].data.astype(np.float64) for p in ("IMAGE", "MASK", "VARIANCE")}
        return made[0], planes, hdul[0].header.copy()


def test_gain_and_read_noise_make_the_variance(tmp_path):
    made, planes, primary = ingest_one(
        write_plain(tmp_path / "a.fits", GAIN=2.0, RDNOISE=5.0), tmp_path)
    image, _ = m13()
    assert np.array_equal(planes["IMAGE"], image.astype(np.float32))
    want = np.maximum(image, 0) / 2.0 + (5.0 / 2.0) ** 2
    assert np.allclose(planes["VARIANCE"], want, rtol=1e-6)  # float32 on disk
    assert made.variance_from.startswith("GAIN 2") and made.gain == 2.0
    assert primary["GAIN"] == 2.0 and primary["RDNOISE"] == 5.0
    # M13 is a photographic survey: its sky (120 counts, scatter 11.76) is not a CCD's
    # at gain 2 (which predicts sqrt(120 / 2 + 2.5^2) = 8.14): the record says so.
    assert made.noise_ratio == pytest.approx(11.76 / 8.14, abs=0.01)
    assert made.warning and "1.444x what GAIN 2 e-/count predicts" in made.warning
    # a gain that fits: no warning
    made, _, _ = ingest_one(write_plain(tmp_path / "b.fits", GAIN=0.868), tmp_path / "b")
    assert made.noise_ratio == pytest.approx(1.0, abs=0.01) and made.warning is None


def test_sky_subtracted_images_keep_their_sky_noise(tmp_path):
    """A sky already subtracted has no sky term to count: the variance is the measured
    sky variance (plus image / gain with a gain), whatever the sign of the residual sky."""
    image, _ = m13()
    for residual, keywords in ((0.5, {}), (-0.5, {}), (0.5, {"GAIN": 0.87})):
        data = image.astype(np.float32) - 120.0 + residual
        path = write_plain(tmp_path / f"s{residual}{len(keywords)}.fits", data, **keywords)
        made, planes, _ = ingest_one(path, tmp_path / path.stem)
        sky_pixels = np.abs(data[20:-20, 20:-20]) < 5
        median = float(np.median(planes["VARIANCE"][20:-20, 20:-20][sky_pixels]))
        assert 0.8 < median / 11.76 ** 2 < 1.6, (residual, keywords, median)
        assert "sky-subtracted" in made.variance_from and made.warning is None


def test_keywords_of_the_wrong_kind_are_one_line_each(tmp_path):
    cases = {"VISIT": "abc", "CCDNUM": 2.5, "SATURATE": "full", "MAGZERO": "n/a"}
    for key, value in cases.items():
        path = write_plain(tmp_path / f"{key}.fits", **{key: value})
        reason = refused(tmp_path / key, path)
        assert f"{key} = {value!r} is not a" in reason, reason


def test_without_gain_the_variance_is_the_images_own_noise(tmp_path):
    from astropy.stats import sigma_clipped_stats

    made, planes, _ = ingest_one(write_plain(tmp_path / "a.fits"), tmp_path)
    image, _ = m13()
    e = plain_images.EDGE_PIXELS
    _, sky, sigma = sigma_clipped_stats(image[e:-e, e:-e].astype(np.float64), sigma=3.0)
    want = sigma ** 2 * np.maximum(image, sky) / sky
    assert np.allclose(planes["VARIANCE"], want, rtol=1e-6)
    assert made.variance_from.startswith("image noise") and made.warning is None
    # the edge frame is masked EDGE, and nothing else is masked
    edge = 1 << astro.fitsio.DEFAULT_MASK_BITS["EDGE"]
    assert (planes["MASK"] != 0).sum() == made.masked_edge == (planes["MASK"] == edge).sum()
    assert made.masked_edge == 300 * 300 - (300 - 2 * e) ** 2


def test_nan_and_saturated_pixels_are_masked(tmp_path):
    image, _ = m13()
    data = image.astype(np.float32)
    data[100:103, 50] = np.nan
    data[200, 200:205] = 40000.0
    made, planes, primary = ingest_one(
        write_plain(tmp_path / "a.fits", data, SATURATE=35000.0), tmp_path)
    bits = astro.fitsio.DEFAULT_MASK_BITS
    mask = planes["MASK"].astype(np.int64)
    assert made.masked_no_data == 3 and (mask[100:103, 50] & (1 << bits["NO_DATA"])).all()
    assert made.masked_saturated == 5 and (mask[200, 200:205] & (1 << bits["SAT"])).all()
    assert made.saturation_from == "SATURATE" and primary["SATURATE"] == 35000.0
    assert np.isfinite(planes["VARIANCE"]).all()
    # an int16 image without SATURATE: its full scale is the saturation level
    made, _, _ = ingest_one(write_plain(tmp_path / "b.fits"), tmp_path / "b")
    assert (made.saturation, made.saturation_from) == (32767.0,
                                                       "16-bit signed integer full scale")


def test_uint16_images_with_bzero_and_blank(tmp_path):
    """A uint16 camera's image (BITPIX 16, BZERO 32768: astropy cannot memory-map it),
    with BLANK pixels and its full scale saturated."""
    image, header = m13()
    counts = image.astype(np.int64) * 10 + 30000  # up to ~66000: some pixels clip
    counts = np.minimum(counts, 65535)
    hdu = fits.PrimaryHDU(counts.astype(np.uint16), header)  # astropy writes BZERO 32768
    raw = hdu.data
    hdu.writeto(tmp_path / "u16.fits")
    with fits.open(tmp_path / "u16.fits", mode="update", do_not_scale_image_data=True) as h:
        assert h[0].header["BZERO"] == 32768 and h[0].header["BITPIX"] == 16
        h[0].header["BLANK"] = -32768  # raw value of a pixel with no data
        h[0].data[10, 20] = -32768
    made, planes, _ = ingest_one(tmp_path / "u16.fits", tmp_path)
    assert (made.saturation, made.saturation_from) == (65535.0,
                                                       "16-bit unsigned integer full scale")
    assert made.masked_saturated == int((counts >= 65535).sum()) > 0
    assert made.masked_no_data == 1
    keep = np.ones(raw.shape, dtype=bool)
    keep[10, 20] = False
    assert np.array_equal(planes["IMAGE"][keep], counts.astype(np.float32)[keep])


def test_image_in_an_extension_takes_the_primarys_keywords(tmp_path):
    made, _, primary = ingest_one(
        write_plain(tmp_path / "a.fits", extension=True, EXPNUM=4711, CCDNUM=7, EGAIN=1.5),
        tmp_path)
    assert (made.hdu, made.visit, made.visit_from, made.ccd) == (1, 4711, "EXPNUM", 7)
    assert made.gain == 1.5 and primary["VISIT"] == 4711


def test_visits_from_the_time_of_observation(tmp_path):
    """Two CCDs of one exposure and a later exposure, with DATE-OBS only."""
    first = "2015-02-17T03:10:21.5"
    paths = [write_plain(tmp_path / name, **{"DATE-OBS": date})
             for name, date in (("c.fits", "2015-02-17T04:00:00"), ("a.fits", first),
                                ("b.fits", first))]
    made, skipped = plain_images.ingest(paths, tmp_path / "ccds")
    assert skipped == []
    got = {Path(m.source).name: (m.visit, m.ccd) for m in made}
    assert got == {"c.fits": (2, 1), "a.fits": (1, 1), "b.fits": (1, 2)}
    assert {m.visit_from for m in made} == {"DATE-OBS"}
    # without any time or visit keyword: one visit per file
    lone = [write_plain(tmp_path / f"n{k}.fits") for k in range(2)]
    made, _ = plain_images.ingest(lone, tmp_path / "lone")
    assert [(m.visit, m.visit_from) for m in made] == [(1, "one per file"),
                                                       (2, "one per file")]
    # a date alone cannot tell a night's exposures apart; with TIME-OBS it can, and
    # UTC written out ('+00:00', a space for the T) is still a FITS date
    night = [write_plain(tmp_path / f"d{k}.fits", **{"DATE-OBS": "2015-02-17"})
             for k in range(2)]
    made, _ = plain_images.ingest(night, tmp_path / "night")
    assert [m.visit_from for m in made] == ["one per file"] * 2
    clocked = [write_plain(tmp_path / "t0.fits", **{"DATE-OBS": "2015-02-17",
                                                      "TIME-OBS": "03:10:21"}),
               write_plain(tmp_path / "t1.fits", **{"DATE-OBS": "2015-02-17 04:00:00+00:00"})]
    made, skipped = plain_images.ingest(clocked, tmp_path / "clocked")
    assert skipped == [] and [(m.visit, m.visit_from) for m in made] == [
        (1, "DATE-OBS and TIME-OBS"), (2, "DATE-OBS")]


def test_a_file_twice_or_two_files_of_one_ccd_are_refused(tmp_path):
    a = write_plain(tmp_path / "a.fits", VISIT=3, CCDNUM=1)
    b = write_plain(tmp_path / "b.fits", VISIT=3, CCDNUM=1)
    made, skipped = plain_images.ingest([a, a, b], tmp_path / "ccds")
    assert [Path(m.source).name for m in made] == ["a.fits"]
    assert [reason.split(": ", 1)[1] for _, reason in skipped] == [
        "given twice", f"visit 3 CCD 1 (VISIT, CCDNUM) is already {a}"]


def test_an_sdss_like_frame_with_a_calibration_vector_is_one_image(tmp_path):
    image, header = m13()
    fits.HDUList([fits.PrimaryHDU(image, header),
                  fits.ImageHDU(np.ones(300, dtype=np.float32))]).writeto(tmp_path / "f.fits")
    made, _, _ = ingest_one(tmp_path / "f.fits", tmp_path)
    assert made.hdu == 0


def test_zero_points_put_images_on_one_flux_scale(tmp_path):
    paths = [write_plain(tmp_path / "a.fits", VISIT=1, MAGZERO=30.0),
             write_plain(tmp_path / "b.fits", VISIT=2, MAGZERO=31.0)]
    made, _ = plain_images.ingest(paths, tmp_path / "ccds")
    assert made[0].flux_scale == 1.0
    assert made[1].flux_scale == pytest.approx(10 ** -0.4)  # 1 mag deeper: fainter counts


def refused(tmp_path, path) -> str:
    made, skipped = plain_images.ingest([path], tmp_path / "ccds")
    assert made == [] and len(skipped) == 1 and "\n" not in skipped[0][1]
    return skipped[0][1]


def test_what_cannot_be_placed_on_the_sky_is_refused_with_the_reason(tmp_path):
    image, header = m13()
    header["CTYPE1"], header["CTYPE2"] = "LINEAR", "LINEAR"
    fits.PrimaryHDU(image, header).writeto(tmp_path / "linear.fits")
    assert "no celestial WCS (axis types: 'LINEAR', 'LINEAR')" in \
        refused(tmp_path, tmp_path / "linear.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, header),
                  fits.ImageHDU(image, header)]).writeto(tmp_path / "two.fits")
    assert "2 image HDUs" in refused(tmp_path, tmp_path / "two.fits")
    fits.PrimaryHDU(np.stack([image, image]), m13()[1]).writeto(tmp_path / "cube.fits")
    assert "not a 2-D image" in refused(tmp_path, tmp_path / "cube.fits")
    write_plain(tmp_path / "date.fits", **{"DATE-OBS": "last tuesday"})
    assert "is not a date" in refused(tmp_path, tmp_path / "date.fits")


def test_a_plain_image_needs_a_directory_to_be_made_into(tmp_path):
    with pytest.raises(InputError, match="a plain image"):
        astro.load_survey(write_plain(tmp_path / "a.fits"))


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines", "astro", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_an_image_off_the_sky_in_one_line(tmp_path):
    image, header = m13()
    header["CTYPE1"], header["CTYPE2"] = "LINEAR", "LINEAR"
    fits.PrimaryHDU(image, header).writeto(tmp_path / "linear.fits")
    proc = run_cli("--images", tmp_path / "linear.fits", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no celestial WCS" in proc.stderr


def test_cli_runs_astropys_m13_as_it_ships(engine, tmp_path):
    """The real plain image, given as it is: every engine's catalog and coadds are the
    survey-m13 dataset's on the reference (that dataset is made by the same loader)."""
    engine.check_implements(astro.STEPS)
    out = tmp_path / "out"
    proc = run_cli("--engine", engine.name, "--workers", "2", "--images", m13_path(),
                   *M13_SKY, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    survey = load_dataset("survey-m13").inputs[0]
    ref = reference_run(survey)
    got = Table.read(out / "catalog.fits", mask_invalid=False).as_array()
    assert len(got) > 100  # a globular cluster: hundreds of stars
    assert_catalog_match(got, ref.state["catalog"], 1.0, tolerances_of(engine, "astro"))
    for patch, path in ref.state["coadds"].items():
        assert_fits_match(f"coadd {patch}", out / "coadd" / Path(path).name, path,
                          engine.tolerance("coadd", "coadds"))
    run = json.loads((out / "run.json").read_text())
    (made,) = run["ingested"]
    assert made["source"] == str(m13_path()) and made["visit_from"] == "one per file"
    assert made["variance_from"].startswith("image noise")
    assert (out / "ccds" / made["ccd_file"]).is_file() and "ccds/" in run["outputs"]
    header = fits.getheader(out / "catalog.fits", 1)  # the flags say what they mean
    assert [header[f"FLAG{bit}"] for bit in astro.FLAGS] == list(astro.FLAGS.values())
    assert proc.stderr.splitlines()[0].startswith(f"{m13_path()}: visit 1 (one per file)")


def star_field(path: Path, shift, date: str, rng, stars) -> Path:
    """One exposure of a star field made here by hand, not by the suite's generator: a
    CCD-like int16 image (sky 1000 counts, gain 2 e-/count, read noise 5 e-, Gaussian
    stars of sigma 1.5 pixels, clipped at 30000 counts) with a TAN WCS at 0.5"/pixel,
    pointed `shift` pixels away from the field's centre."""
    gain, read_noise, saturation = 2.0, 5.0, 30000.0
    y, x = np.mgrid[:300, :300]
    model = np.full((300, 300), 1000.0)
    for sx, sy, flux in stars:
        model += flux / (2 * np.pi * 1.5 ** 2) * np.exp(
            -((x - sx - shift[0]) ** 2 + (y - sy - shift[1]) ** 2) / (2 * 1.5 ** 2))
    electrons = rng.poisson(model * gain) + rng.normal(0.0, read_noise, model.shape)
    image = np.minimum(np.round(electrons / gain), saturation).astype(np.int16)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [210.0, 12.0]
    wcs.wcs.crpix = [150.5 + shift[0], 150.5 + shift[1]]
    wcs.wcs.cdelt = [-0.5 / 3600, 0.5 / 3600]
    header = wcs.to_header()
    header.update({"GAIN": gain, "RDNOISE": read_noise, "SATURATE": saturation,
                   "DATE-OBS": date, "EXPTIME": 60.0})
    fits.PrimaryHDU(image, header).writeto(path)
    return path


def test_cli_on_a_hand_made_star_field_keeps_its_saturated_stars(tmp_path):
    """Two exposures (DATE-OBS only, GAIN/RDNOISE/SATURATE) of a field made here: the
    variance model from the gain is the noise the pixels have, every star saturated in
    both exposures is in the catalog at its place, flagged, and the unsaturated bright
    stars are found unflagged."""
    rng = np.random.default_rng(42)
    # a jittered 6x6 grid: 36 pixels apart, more than a saturated star's masked hole
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) * 36 + 60
    stars = np.column_stack([grid + rng.uniform(-4, 4, grid.shape),
                             10 ** rng.uniform(4.0, 6.5, len(grid))])
    paths = [star_field(tmp_path / f"exp{k}.fits", shift, date, rng, stars)
             for k, (shift, date) in enumerate((((0.0, 0.0), "2024-03-01T02:00:00"),
                                                ((1.3, 0.7), "2024-03-01T02:05:00")))]
    out = tmp_path / "out"
    proc = run_cli("--images", *paths, "--patch-inner", "200", "--patch-border", "20",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert [(m["visit"], m["visit_from"]) for m in run["ingested"]] == [(1, "DATE-OBS"),
                                                                       (2, "DATE-OBS")]
    for made in run["ingested"]:
        assert made["variance_from"].startswith("GAIN 2 e-/count, read noise 5 e-")
        # the gain's model is the noise the pixels were made with (the counts were
        # rounded: +1/12 count^2 of a 268 count^2 sky variance)
        assert made["noise_ratio"] == pytest.approx(1.0, abs=0.03)
    catalog = Table.read(out / "catalog.fits", mask_invalid=False).as_array()
    wcs = WCS(fits.getheader(paths[0]))
    sx, sy = stars[:, 0], stars[:, 1]
    cx, cy = wcs.world_to_pixel_values(catalog["ra"], catalog["dec"])
    nearest = np.array([np.hypot(cx - x, cy - y).min() for x, y in zip(sx, sy)])
    which = np.array([np.hypot(cx - x, cy - y).argmin() for x, y in zip(sx, sy)])
    peak = stars[:, 2] / (2 * np.pi * 1.5 ** 2) + 1000.0
    saturated = peak > 30000.0 * 1.2  # clearly saturated in both exposures
    clear = peak < 30000.0 * 0.5
    flagged = (catalog["flags"][which] & astro.FLAG_SATURATED) != 0
    print(f"\n{saturated.sum()} saturated stars: {(flagged & saturated).sum()} flagged, "
          f"nearest rows within {nearest[saturated].max():.2f} px")
    assert saturated.sum() >= 5
    assert (nearest[saturated] <= 1.5).all() and flagged[saturated].all()
    assert (nearest[clear] <= 1.0).all() and not flagged[clear].any()
    # one row per saturated star, and its flux unknown or a lower bound (its halo)
    rows_near = [int((np.hypot(cx - x, cy - y) <= 6.0).sum()) for x, y in zip(sx, sy)]
    assert all(rows_near[k] == 1 for k in np.flatnonzero(saturated))
    got = catalog["flux"][which[saturated]]
    assert np.all(np.isnan(got) | (got < stars[saturated, 2]))
    # --deblend, end to end: the same stars, deblending on (the field has no blends)
    proc = run_cli("--images", *paths, "--patch-inner", "200", "--patch-border", "20",
                   "--deblend", "--quiet", "--out", tmp_path / "deblended")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    run = json.loads((tmp_path / "deblended" / "run.json").read_text())
    assert run["params_changed"] == {"deblend": True}
    deblended = Table.read(tmp_path / "deblended" / "catalog.fits", mask_invalid=False).as_array()
    assert len(deblended) == len(catalog)
