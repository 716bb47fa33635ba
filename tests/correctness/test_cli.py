"""The command a user runs on their own files writes what the reference computes."""
import json
import re
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
from pipelines import astro, neuro
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
    got = Table.read(out / "catalog.fits", mask_invalid=False).as_array()
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


def test_cli_debug_adds_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines", "neuro", "--dataset",
                           "survey-tiny", "--debug", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    kept = list(tmp_path.glob(".out.partial-*"))  # the failed run's folder, for its logs
    assert len(kept) == 1 and kept[0].is_dir() and not (tmp_path / "out").exists()
    assert proc.stderr.startswith(f"kept the failed run's folder: {kept[0]}\nTraceback (most "
                                  f"recent call last):\n"), proc.stderr
    assert proc.stderr.endswith("\nerror: survey-tiny is a dataset of the astro pipeline\n")


SMALL_101D_B0 = 50.0  # dipy's small_101D writes its b0 volume as b=15


def small_101d():
    from dipy.data import get_fnames

    return [str(p) for p in get_fnames(name="small_101D")]


def small_101d_reference(workdir: Path) -> dict:
    """The pipeline on dipy's small_101D with the b0 threshold raised, on the reference
    engine in this process: what every engine's command must match."""
    params = neuro.NeuroParams(b0_threshold=SMALL_101D_B0)
    state = neuro.load_subject(*small_101d(), params=params)
    ctx = RunContext(workdir, params, neuro.NeuroPartitioning())
    return neuro.run_pipeline(ReferenceEngine().start(), state, ctx)


def test_cli_b0_threshold_runs_small_101d(engine, tmp_path):
    """A real acquisition shipped with dipy whose b0 is b=15: refused at the pinned
    threshold with the reason, run end to end with --b0-threshold, on every engine, and
    the maps match the reference's with the same parameter."""
    engine.check_implements(neuro.STEPS)
    dwi, bvals, bvecs = small_101d()
    command = [sys.executable, "-m", "pipelines", "neuro", "--engine", engine.name,
               "--workers", "2", "--dwi", dwi, "--bvals", bvals, "--bvecs", bvecs, "--quiet"]
    refused = subprocess.run(command + ["--out", str(tmp_path / "pinned")], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "no b0 volume (b <= 10) among 102 b-values" in refused.stderr
    out = tmp_path / "out"
    proc = subprocess.run(command + ["--b0-threshold", str(SMALL_101D_B0), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = small_101d_reference(tmp_path / "ref")
    written = {name: np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
               for name in ("mask", "fa", "md")}
    written["mask"] = written["mask"].astype(bool)
    written["denoised"] = str(out / "denoised.nii")
    assert_match(engine, "neuro", written, want)
    run = json.loads((out / "run.json").read_text())
    assert run["params_changed"] == {"b0_threshold": SMALL_101D_B0}
    assert run["params"]["b0_threshold"] == SMALL_101D_B0


def test_small_101d_reference_is_dipy_called_directly(tmp_path, monkeypatch):
    """The reference's mask and tensor maps on small_101D (b0 threshold 50) are what
    dipy itself gives: median_otsu on the mean b0 (with dipy's own Otsu threshold, which
    the pipeline pins: median_otsu takes scikit-image's when it is importable, and
    photutils' deblender brings scikit-image), and TensorModel (WLS, min_signal=1) on the
    denoised data within that mask."""
    import dipy.segment.mask
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel
    from dipy.segment.mask import median_otsu
    from dipy.segment.threshold import otsu

    monkeypatch.setattr(dipy.segment.mask, "otsu", otsu)

    want = small_101d_reference(tmp_path)
    dwi, bvals, bvecs = small_101d()
    data = np.asarray(nib.load(dwi).dataobj)
    gtab = gradient_table(np.loadtxt(bvals), bvecs=np.loadtxt(bvecs).T,
                          b0_threshold=SMALL_101D_B0)
    assert gtab.b0s_mask.sum() == 1
    mean_b0 = data[..., gtab.b0s_mask].astype(np.float64).mean(axis=-1)
    _, mask = median_otsu(mean_b0, median_radius=4, numpass=2, dilate=1)
    assert np.array_equal(want["mask"], mask)
    denoised = np.asarray(nib.load(want["denoised"]).dataobj)
    fit = TensorModel(gtab, fit_method="WLS", min_signal=1.0).fit(denoised, mask=mask)
    # the suite writes its maps as float32
    assert np.allclose(want["fa"], np.where(mask, fit.fa, 0), rtol=1e-5, atol=1e-6)
    assert np.allclose(want["md"], np.where(mask, fit.md, 0), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("args,says", [
    (["--param", "b0_thresh=50"], "--param b0_thresh: no such parameter of the neuro "
                                  "pipeline; known: b0_threshold, "),
    (["--param", "median_radius=two"], "--param median_radius=two: not a int"),
    (["--param", "median_radius=0"], "--param: median_radius=0: must be positive"),
    (["--param", "rician=maybe"], "--param rician=maybe: not a bool (expected true or false)"),
    (["--param", "fit_method=RESTORE"], "--param: fit_method='RESTORE': must be WLS, OLS or"),
    (["--param", "min_signal=nan"], "--param min_signal=nan: not a float (expected a finite"),
    (["--b0-threshold", "-1"], "--param: b0_threshold=-1.0: must be >= 0"),
    (["--param", "rician"], "--param 'rician': expected NAME=VALUE"),
])
def test_cli_bad_parameters_are_one_line(args, says, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines", "neuro", "--dataset",
                           "phantom-tiny", *args, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {says}"), proc.stderr


def pytest_session(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--no-history", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,says", [
    (["-m", "perf", "--param", "deblend=true"],
     "--param changes {'astro': {'deblend': True}}: perf figures are measured with the "
     "pinned parameters"),
    (["--param", "bogus=1"], "--param bogus: no such parameter of either pipeline"),
    (["--param", "deblend=maybe"], "--param deblend=maybe: not a bool"),
    (["-m", "perf", "--param", "deblend=true", "--perf-params", "--gate"],
     "--gate judges the pinned parameters' times; drop --param"),
])
def test_pytest_param_is_checked_and_kept_out_of_perf(args, says):
    """The suite's own --param: checked as the command's is; perf tests refuse it unless
    --perf-params (and the gate always), so that benchmark figures stay comparable."""
    proc = pytest_session("--collect-only", "-q", *args)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout[-2000:]
    assert f"ERROR: {says}" in proc.stderr, proc.stderr


def test_pytest_param_is_welcome_in_correctness_runs():
    proc = pytest_session("--collect-only", "-q", "-m", "correctness", "--param",
                          "deblend=true", "tests/correctness/test_steps.py")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_pytest_param_reaches_reference_and_engines():
    """With --param the reference is recomputed under it and each engine is held to it:
    the reference's deblended M13 catalog (every engine's in test_deblend.py); an engine's
    own step that does not follow a changed parameter is an expected failure."""
    proc = pytest_session("-q", "tests/correctness/test_steps.py", "--engine", "reference",
                          "--engine", "tensorflow", "--dataset", "survey-tiny", "-k",
                          "warp", "--param", "warp_order=nearest-neighbor", "-rx")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed" in proc.stdout
    if "tensorflow unavailable" not in proc.stdout:
        assert "follows the pinned warp_order='bilinear' only" in proc.stdout


def test_a_parameter_an_engine_does_not_follow_is_refused():
    """An engine's own fit that is WLS only, asked for OLS, refuses before any work in one
    line rather than computing WLS under an OLS label; a parameter it follows passes; the
    suite's kernels follow every one. TensorFlow's own steps declare theirs too."""
    from engines import engine_class
    from engines.base import Engine, StepNotImplemented, native
    from pipelines.errors import EngineUnavailable

    class WlsOnly(Engine):
        name = "wls-only"

        @native("fit_tensor", follows=("b0_threshold", "min_signal"))
        def fit(self, step, state, ctx, plan):
            raise AssertionError("never reached")

    ols = neuro.NeuroParams(fit_method="OLS")
    with pytest.raises(StepNotImplemented, match=r"follows the pinned fit_method='WLS' only"):
        WlsOnly.check_params(neuro.STEPS, ols)
    WlsOnly.check_params(neuro.STEPS, neuro.NeuroParams(b0_threshold=50.0))  # followed
    ReferenceEngine.check_params(neuro.STEPS, ols)
    try:
        tensorflow = engine_class("tensorflow")
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    with pytest.raises(StepNotImplemented, match="tensorflow does not implement fit_tensor"):
        tensorflow.check_params(neuro.STEPS, ols)
    with pytest.raises(StepNotImplemented, match="tensorflow does not implement brain_mask"):
        tensorflow.check_params(neuro.STEPS, neuro.NeuroParams(median_radius=2))
    tensorflow.check_params(neuro.STEPS, neuro.NeuroParams(patch_radius=2))  # followed
    from pipelines import astro
    with pytest.raises(StepNotImplemented, match="tensorflow does not implement coadd"):
        tensorflow.check_params(astro.STEPS, astro.AstroParams(coadd_rescale_variance=True))
    tensorflow.check_params(astro.STEPS, astro.AstroParams(deblend=True))  # followed


def test_step_params_name_what_the_kernels_read():
    """Each step's declared parameters are the Params fields its kernel reads, itself or
    in the functions of its module it hands `params` to: what an engine's own
    implementation is held to (a field missed here would go unchecked)."""
    import inspect
    import re

    from pipelines import PIPELINES

    def read_by(function) -> set[str]:
        source = inspect.getsource(function)
        read = set(re.findall(r"params\.(\w+)", source))
        for name in re.findall(r"(\w+)\((?:[^()]|\([^()]*\))*\bparams\)", source):
            helper = getattr(inspect.getmodule(function), name, None)
            if inspect.isfunction(helper) and helper is not function:
                read |= read_by(helper)
        return read

    for pipeline in PIPELINES.values():
        for step in pipeline.STEPS:
            read = read_by(step.kernel)
            assert read == set(step.params), (step.name, read)


def test_an_earlier_runs_folder_is_refused_or_replaced_whole(tmp_path):
    """A second run into an earlier run's --out: refused in one line; with --overwrite
    the folder is replaced whole (nothing of the earlier run stays beside the new one);
    a folder that is not a run's is never replaced."""
    out = tmp_path / "out"
    run = ["neuro", "--dataset", "phantom-tiny", "--quiet", "--out", str(out)]
    first = subprocess.run([sys.executable, "-m", "pipelines", *run], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (out / "stale.txt").write_text("from an earlier run")
    again = subprocess.run([sys.executable, "-m", "pipelines", *run], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr == (
        f"error: {out}: holds an earlier run's files; --overwrite replaces it whole, or "
        f"choose another folder\n")
    replaced = subprocess.run([sys.executable, "-m", "pipelines", *run, "--overwrite"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "stale.txt").exists() and (out / "run.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own folder")
    refused = subprocess.run([sys.executable, "-m", "pipelines", "neuro", "--dataset",
                              "phantom-tiny", "--out", str(mine), "--overwrite"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "not an earlier run's folder" in refused.stderr
    assert (mine / "notes.txt").is_file()


def test_a_failed_run_leaves_nothing_that_looks_finished(tmp_path):
    """The run writes beside --out and moves into place only when it succeeded: a run
    that fails (here: its only image has no usable pixel) leaves neither --out nor its
    staging folder."""
    from astropy.io import fits as pyfits

    from fixtures.datasets import m13_path

    with pyfits.open(m13_path()) as hdul:
        header = hdul[0].header.copy()
    pyfits.PrimaryHDU(np.full((300, 300), np.nan, dtype=np.float32), header).writeto(
        tmp_path / "blank.fits")
    out = tmp_path / "results" / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines", "astro", "--images",
                           str(tmp_path / "blank.fits"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert not out.exists() and list((tmp_path / "results").iterdir()) == []


def limited_to(size: int):
    """A child process that may write no file beyond `size` bytes (RLIMIT_FSIZE; Python
    ignores SIGXFSZ, so writing past it is an EFBIG error, as a full disk's ENOSPC is)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_full_disk_is_one_line_not_a_crash(engine, tmp_path):
    """The denoised series is allocated for real before workers write it through memory
    maps (where a full disk would be a bus error): with no room, one line naming the file
    and its size, exit status 4, and no output folder."""
    engine.check_implements(neuro.STEPS)
    load_dataset("phantom-tiny")  # made (cached) here, outside the limit
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "neuro", "--engine", engine.name, "--workers",
         "2", "--dataset", "phantom-tiny", "--quiet", "--out", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=600, preexec_fn=limited_to(300_000))
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: disk full: ")
    assert "denoised.nii: no room for its 774.5 KB" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_full_disk_under_the_workers_is_one_line(engine, tmp_path):
    """The astronomy steps' FITS files are written by the workers: each is allocated
    before it is written, so a full disk there is one line naming the file and its size
    (astropy alone says "32768 requested and 3120 written"), exit status 4, no output
    folder; no worker retries it or dies of it."""
    engine.check_implements(astro.STEPS)
    load_dataset("survey-tiny")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "astro", "--engine", engine.name, "--workers",
         "2", "--dataset", "survey-tiny", "--quiet", "--out", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=600, preexec_fn=limited_to(150_000))
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and re.fullmatch(
        r"error: disk full: \S+/calexp/v\d{4}_c\d{3}\.fits: no room for its 409\.0 KB "
        r"\(File too large\)\n", proc.stderr), proc.stderr[-2000:]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_said_before_the_run():
    from pipelines.errors import DiskFull, check_room

    with pytest.raises(DiskFull, match=r"this run's output needs about 1000000.0 TB; its "
                                       r"disk has .* free \(.* missing\)"):
        check_room(ROOT, 10**18, "this run's output")
    check_room(ROOT, 1, "this run's output")


def test_ctrl_c_mid_step_is_one_line_and_leaves_nothing(engine, tmp_path):
    """SIGINT to the command's whole process group (as a terminal's Ctrl-C) while it
    denoises: exit 130, "interrupted" and nothing else on stderr after the signal, no
    output folder, and none of the engine's processes left."""
    import os
    import signal
    import time

    import psutil

    from tests.processes import cli_denoising

    engine.check_implements(neuro.STEPS)
    engine.check_params(neuro.STEPS, neuro.NeuroParams(patch_radius=2, block_radius=8))
    out = tmp_path / "out"
    run = cli_denoising(["--engine", engine.name], out)
    try:
        time.sleep(2.0)
        started = psutil.Process(run.proc.pid).children(recursive=True)
        os.killpg(run.proc.pid, signal.SIGINT)
    finally:
        status, after = run.finish()
    assert status == 130, after[-3000:]
    assert after == "interrupted\n", after[-3000:]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], [p.cmdline()[:3] for p in alive]
