"""Bad input gets one clear line, from load time or from inside an engine's workers,
never a hang, a traceback wall or a silently wrong number."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fixtures.datasets import load_dataset
from pipelines import neuro
from pipelines.errors import EngineUnavailable, InputError
from pipelines.steps import RunContext
from tests.processes import free_port

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def subject(tmp_path):
    """A private copy of the tiny phantom's files, free to be damaged."""
    src = load_dataset("phantom-tiny").inputs[0]
    for f in src.files():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / "dwi.nii", tmp_path / "bvals", tmp_path / "bvecs"


def run(engine, files, workdir):
    state = neuro.load_subject(*files)
    ctx = RunContext(workdir, neuro.NeuroParams(), neuro.NeuroPartitioning())
    return neuro.run_pipeline(engine, state, ctx)


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text, f"error is not one line: {text!r}"
    return text


def test_truncated_nifti(subject):
    dwi = subject[0]
    size = dwi.stat().st_size
    with open(dwi, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(InputError, match="truncated") as err:
        neuro.load_subject(*subject)
    one_line(err)


def test_truncated_gzip_nifti(subject, tmp_path):
    gz = tmp_path / "dwi.nii.gz"
    nib.save(nib.load(subject[0]), gz)
    data = gz.read_bytes()
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        neuro.load_subject(gz, *subject[1:])
    one_line(err)


def test_not_a_nifti(subject):
    subject[0].write_bytes(b"this is not an image" * 100)
    with pytest.raises(InputError, match="not a readable NIfTI") as err:
        neuro.load_subject(*subject)
    one_line(err)


def test_bvals_bvecs_count_mismatch(subject):
    bvals = np.loadtxt(subject[1])
    np.savetxt(subject[1], bvals[None, :-1], fmt="%g")
    with pytest.raises(InputError, match=r"volumes, .* 11 b-values, .* 12 directions") as err:
        neuro.load_subject(*subject)
    one_line(err)


def test_no_b0_volume(subject):
    bvals = np.loadtxt(subject[1])
    bvals[bvals <= 10] = 1000
    np.savetxt(subject[1], bvals[None, :], fmt="%g")
    with pytest.raises(InputError, match="no b0 volume") as err:
        neuro.load_subject(*subject)
    one_line(err)


def test_nan_direction_of_diffusion_volume(subject):
    bvecs = np.loadtxt(subject[2])
    bvecs[:, 5] = np.nan
    np.savetxt(subject[2], bvecs)
    with pytest.raises(InputError, match="volume 5 is NaN") as err:
        neuro.load_subject(*subject)
    one_line(err)


@pytest.mark.parametrize("volume", [0, 7])  # a b0 volume (mean b0 step), a DW one (sigma)
def test_nan_in_image_found_by_the_workers(engine, subject, tmp_path, volume):
    img = nib.load(subject[0])
    data = np.memmap(subject[0], dtype=np.float32, mode="r+", offset=img.dataobj.offset,
                     shape=img.shape, order="F")
    data[3, 4, 5, volume] = np.nan
    data.flush()
    del data
    with pytest.raises(InputError, match=f"volume {volume} holds 1 NaN") as err:
        run(engine, subject, tmp_path / "out")
    one_line(err)


def test_unreachable_dask_scheduler():
    pytest.importorskip("distributed")
    from engines.dask import DaskEngine

    start = time.monotonic()
    engine = DaskEngine(scheduler=f"tcp://127.0.0.1:{free_port()}", connect_timeout=2)
    with pytest.raises(EngineUnavailable, match="cannot reach the Dask scheduler") as err:
        engine.start()
    one_line(err)
    assert time.monotonic() - start < 30, "an unreachable scheduler must fail fast"


def test_cli_reports_one_line_and_status_2(subject):
    with open(subject[0], "r+b") as fh:
        fh.truncate(2000)
    proc = subprocess.run([sys.executable, "-m", "pipelines", "neuro", "--dwi", str(subject[0]),
                           "--bvals", str(subject[1]), "--bvecs", str(subject[2]),
                           "--out", str(subject[0].parent / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated" in lines[0]
