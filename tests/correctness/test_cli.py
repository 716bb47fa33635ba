"""The command a user runs on their own files writes what the reference computes."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from engines.reference import ReferenceEngine
from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import neuro
from pipelines.steps import RunContext
from tests.checks import assert_match, tolerances_of

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]


def test_cli_writes_the_reference_maps(engine, tmp_path):
    engine.check_implements(neuro.STEPS)  # a step it declares unimplemented: xfail
    subject = load_dataset("phantom-tiny").inputs[0]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "neuro", "--engine", engine.name,
         "--workers", "2", "--dwi", str(subject.dwi), "--bvals", str(subject.bvals),
         "--bvecs", str(subject.bvecs), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = reference_run(subject)
    written = {name: np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
               for name in ("mask", "fa", "md")}
    written["mask"] = written["mask"].astype(bool)
    written["denoised"] = str(out / "denoised.nii")
    assert_match(engine, "neuro", written, ref.state)
    assert np.allclose(nib.load(out / "fa.nii.gz").affine, nib.load(subject.dwi).affine)
    run = json.loads((out / "run.json").read_text())
    assert run["engine"] == engine.name and set(run["seconds"]) >= {"denoise", "fit_tensor"}
    # stderr is the command's own progress: no engine banner, log line or traceback
    progress = (f"{engine.name} with ", "  ", *(f"{s.name}: " for s in neuro.STEPS))
    lines = [line for line in proc.stderr.splitlines() if line]  # "\r" splits a line too
    assert all(line.startswith(progress) for line in lines), proc.stderr


def test_cli_quiet_is_quiet(engine, tmp_path):
    """--quiet: nothing on stderr at all, whatever the engine (Spark's JVM banner and its
    workers' output go to spark.log in the output folder, named in run.json)."""
    engine.check_implements(neuro.STEPS)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "neuro", "--engine", engine.name, "--workers",
         "2", "--dataset", "phantom-tiny", "--quiet", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.startswith("wrote ")
    logs = json.loads((out / "run.json").read_text())["logs"]
    assert all((out / name).exists() for name in logs)


def test_cli_astro_writes_the_reference_catalog(engine, tmp_path):
    """A user's directory of CCD files: the command fits its own sky map around them."""
    from astropy.table import Table

    from pipelines import astro
    from tests.astro_checks import assert_catalog_match, assert_fits_match

    engine.check_implements(astro.STEPS)
    survey = load_dataset("survey-tiny").inputs[0]
    out = tmp_path / "out"
    sky = ["--pixel-scale", "0.333", "--patch-inner", "128", "--patch-border", "16"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "astro", "--engine", engine.name, "--workers",
         "2", "--ccds", str(survey.directory), *sky, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The same run through the library, on the reference, is what the command must match.
    state = astro.load_survey(survey.directory, pixel_scale_arcsec=0.333, patch_inner=128,
                              patch_border=16)
    ctx = RunContext(tmp_path / "ref", astro.AstroParams(), astro.AstroPartitioning())
    want = astro.run_pipeline(ReferenceEngine().start(), state, ctx)
    got = Table.read(out / "catalog.fits").as_array()
    assert_catalog_match(got, want["catalog"], state["skymap"].pixel_scale_arcsec,
                         tolerances_of(engine, "astro"))
    for patch, path in want["coadds"].items():
        written = out / "coadd" / Path(path).name
        assert_fits_match(f"coadd {patch}", written, path,
                          engine.tolerance("coadd", "coadds"))
        assert WCS(fits.getheader(written, "IMAGE")).has_celestial
    run = json.loads((out / "run.json").read_text())
    assert run["pipeline"] == "astro" and set(run["seconds"]) == {s.name for s in astro.STEPS}
    assert run["skipped"] == []


@pytest.mark.parametrize("pipeline,name,other", [("astro", "phantom-tiny", "neuro"),
                                                 ("neuro", "survey-tiny", "astro")])
def test_cli_dataset_of_the_other_pipeline_is_one_line(pipeline, name, other, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines", pipeline, "--dataset", name,
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {name} is a dataset of the {other} pipeline"
