"""Benchmarks of every neuroscience step and of the whole pipeline, per engine and dataset.

Each step is fed the reference's outputs of the steps before it, so a step's time is its
own. Every timed answer is checked against the reference before its time is filed: a
fast wrong engine never tops the table. Engine start-up, warm-up and data generation
happen in session fixtures, outside the timed region.
"""
import pytest

from pipelines import neuro
from pipelines.steps import RunContext
from tests.neuro_checks import assert_outputs_match

pytestmark = pytest.mark.perf

ALL_OUTPUTS = ["mean_b0", "mask", "sigma", "denoised", "fa", "md"]


@pytest.mark.parametrize("step", [s.name for s in neuro.STEPS] + ["pipeline"])
def test_neuro(step, engine, dataset, reference, bench, tmp_path):
    # One run folder per subject: each subject's denoised image must outlive the round.
    ctxs = [RunContext(tmp_path / f"subject{i}", neuro.NeuroParams(),
                       neuro.NeuroPartitioning()) for i in range(len(reference))]
    if step == "pipeline":
        states = [neuro.load_subject(*run.subject.files()) for run in reference]

        def run_all():
            return [neuro.run_pipeline(engine, s, c) for s, c in zip(states, ctxs)]

        ref_seconds = sum(sum(run.seconds.values()) for run in reference)
        # The work of the whole pipeline, stated as its heaviest step's: denoising.
        planned = [neuro.DENOISE.plan(run.state, c) for run, c in zip(reference, ctxs)]
    else:
        the_step = neuro.STEP_BY_NAME[step]
        states = [run.state_before(step) for run in reference]

        def run_all():
            return [engine.run_step(the_step, s, c).outputs for s, c in zip(states, ctxs)]

        ref_seconds = sum(run.seconds[step] for run in reference)
        planned = [the_step.plan(s, c) for s, c in zip(states, ctxs)]
    work = {"partitions": sum(len(p.partitions) for p in planned),
            "bytes_in": sum(p.bytes_in for p in planned),
            "voxels": sum(p.voxels for p in planned)}

    def check(outputs):
        for out, run in zip(outputs, reference):
            assert_outputs_match(out, run.state,
                                 keys=ALL_OUTPUTS if step == "pipeline" else None)

    try:
        bench(run_all, check=check, pipeline="neuro", step=step, engine=engine,
              dataset=dataset, reference_seconds=ref_seconds, work=work)
    finally:
        # A denoised image is as big as the input (4.2 GB per HCP subject), and pytest
        # keeps the temporary folders of its last three sessions.
        for image in tmp_path.rglob("*.nii"):
            image.unlink()
