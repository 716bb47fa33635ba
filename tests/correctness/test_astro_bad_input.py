"""Bad CCDs in a survey: each is skipped with its reason (a survey of 1440 CCDs should not
die of one), or, when nothing usable is left, one clear error. Never a traceback wall or
a silently wrong coadd."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from fixtures.datasets import load_dataset
from pipelines import astro
from pipelines.errors import InputError
from pipelines.steps import RunContext

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def survey(tmp_path):
    """A private copy of the tiny survey's CCDs, free to be damaged, and its sky map."""
    src = load_dataset("survey-tiny").inputs[0]
    ccds = tmp_path / "ccds"
    shutil.copytree(src.directory, ccds)
    return ccds, astro.SkyMap(**src.skymap)


def first_ccd(ccds: Path) -> Path:
    return sorted(ccds.glob("*.fits"))[0]


def edit(path: Path, change):
    with fits.open(path, mode="update") as hdul:
        change(hdul)


def skipped_reason(state, path: Path) -> str:
    reasons = [r for p, r in state["skipped"] if Path(p).name == path.name]
    assert len(reasons) == 1, state["skipped"]
    assert "\n" not in reasons[0]
    return reasons[0]


def load_skipping_one(ccds, skymap, bad):
    total = len(list(ccds.glob("*.fits")))
    state = astro.load_survey(ccds, skymap)
    assert len(state["ccds"]) == total - 1
    assert bad.name not in {Path(c.path).name for c in state["ccds"]}
    return skipped_reason(state, bad)


def test_ccd_without_wcs_is_skipped(survey):
    ccds, skymap = survey
    bad = first_ccd(ccds)

    def drop_wcs(hdul):
        header = hdul["IMAGE"].header
        for key in list(header):
            if re.fullmatch(r"(CTYPE|CRVAL|CRPIX|CDELT|CUNIT)\d|(CD|PC)\d_\d", key):
                del header[key]

    edit(bad, drop_wcs)
    assert "no celestial WCS" in load_skipping_one(ccds, skymap, bad)


def test_planes_of_different_shapes_are_skipped(survey):
    ccds, skymap = survey
    bad = first_ccd(ccds)
    with fits.open(bad) as hdul:
        hdus = [h.copy() for h in hdul]
    hdus[2] = fits.ImageHDU(hdus[2].data[:-1], header=hdus[2].header, name="MASK")
    fits.HDUList(hdus).writeto(bad, overwrite=True)
    assert "planes of different shapes" in load_skipping_one(ccds, skymap, bad)


def test_ccd_overlapping_no_patch_is_skipped(survey):
    ccds, skymap = survey
    bad = first_ccd(ccds)
    edit(bad, lambda hdul: hdul["IMAGE"].header.update(CRVAL1=250.4226, CRVAL2=36.4602))
    assert "overlaps no patch" in load_skipping_one(ccds, skymap, bad)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_fits_is_skipped(survey, damage):
    ccds, skymap = survey
    bad = first_ccd(ccds)
    data = bad.read_bytes()
    bad.write_bytes(b"not a FITS file" * 100 if damage == "garbage" else data[:len(data) // 2])
    assert "not a readable FITS file" in load_skipping_one(ccds, skymap, bad)


def test_no_usable_ccd_is_one_error(tmp_path):
    (tmp_path / "a.fits").write_bytes(b"garbage")
    with pytest.raises(InputError, match="no usable CCD") as err:
        astro.load_survey(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no FITS files"):
        astro.load_survey(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file or directory"):
        astro.load_survey(tmp_path / "nothing-here")


def test_all_masked_ccd_is_skipped_by_every_engine(survey, engine, tmp_path):
    ccds, skymap = survey
    bad = first_ccd(ccds)

    def mask_everything(hdul):
        hdul["MASK"].data[:] |= 1  # bit 0: BAD

    edit(bad, mask_everything)
    state = astro.load_survey(ccds, skymap)
    ctx = RunContext(tmp_path / "run", astro.AstroParams(), astro.AstroPartitioning())
    out = engine.run_step(astro.CALIBRATE, state, ctx).outputs
    assert "every pixel is masked" in skipped_reason(out, bad)
    assert len(out["calexps"]) == len(state["ccds"]) - 1


def test_nan_pixels_become_no_data(survey, engine, tmp_path):
    ccds, skymap = survey
    bad = first_ccd(ccds)

    def blank(hdul):
        hdul["IMAGE"].data[10:20, 30:40] = np.nan

    edit(bad, blank)
    state = astro.load_survey(ccds, skymap)
    ccd = next(c for c in state["ccds"] if Path(c.path).name == bad.name)
    ctx = RunContext(tmp_path / "run", astro.AstroParams(), astro.AstroPartitioning())
    out = engine.run_step(astro.CALIBRATE, {**state, "ccds": (ccd,)}, ctx).outputs
    with fits.open(out["calexps"][ccd.key]) as hdul:
        no_data = (hdul["MASK"].data & (1 << 8)) != 0
        assert no_data[10:20, 30:40].all()
        assert np.isfinite(hdul["IMAGE"].data).all()  # no NaN leaks into later steps


def test_cli_bad_directory_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines", "astro", "--ccds",
                           str(tmp_path), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr


def test_a_ccds_own_mask_planes_are_kept(survey, tmp_path):
    """A camera that numbers its mask planes its own way (here SAT on bit 3, where the
    pipeline's default CR plane sits): the calibrated CCD keeps the file's planes and puts
    the planes it adds on free bits, so no flag is mistaken for another."""
    from engines.reference import ReferenceEngine

    ccds, skymap = survey
    bad = first_ccd(ccds)

    def renumber(hdul):
        header, data = hdul["MASK"].header, hdul["MASK"].data
        for key in [k for k in header if k.startswith("MASKBIT")]:
            del header[key]
        header["MASKBIT0"], header["MASKBIT3"] = "BAD", "SAT"
        sat = (data & 2) != 0
        data[:] = (data & 1) | np.where(sat, 8, 0)

    edit(bad, renumber)
    state = astro.load_survey(ccds, skymap)
    ccd = next(c for c in state["ccds"] if Path(c.path).name == bad.name)
    ctx = RunContext(tmp_path / "run", astro.AstroParams(), astro.AstroPartitioning())
    out = ReferenceEngine().start().run_step(astro.CALIBRATE, {**state, "ccds": (ccd,)},
                                             ctx).outputs
    with fits.open(out["calexps"][ccd.key]) as hdul:
        names = {v: int(k[7:]) for k, v in hdul["MASK"].header.items()
                 if k.startswith("MASKBIT")}
    assert names["SAT"] == 3 and names["BAD"] == 0
    assert names["CR"] not in (0, 3) and len(set(names.values())) == len(names)
