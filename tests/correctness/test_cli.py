"""The command a user runs on their own files writes the same NIfTI maps as the reference."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from tests.neuro_checks import assert_outputs_match

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]


def test_cli_writes_the_reference_maps(engine, tmp_path):
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
    assert_outputs_match(written, ref.state)
    assert np.allclose(nib.load(out / "fa.nii.gz").affine, nib.load(subject.dwi).affine)
    run = json.loads((out / "run.json").read_text())
    assert run["engine"] == engine.name and set(run["seconds"]) >= {"denoise", "fit_tensor"}
