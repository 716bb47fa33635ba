"""Benchmarks of every step and of the whole pipeline, per engine and dataset, for both
pipelines (`step` runs over the steps of the dataset's own pipeline, then "pipeline").

Each step is fed the reference's outputs of the steps before it, so a step's time is its
own. Every timed answer is checked against the reference before its time is filed: a
fast wrong engine never tops the table. Engine start-up, warm-up and data generation
happen in session fixtures, outside the timed region.
"""
import pytest

from pipelines import PIPELINES
from pipelines.steps import RunContext
from tests.checks import CHECKS, assert_match

pytestmark = pytest.mark.perf


@pytest.mark.each_step(whole=True)
def test_perf(step, engine, dataset, params, reference, bench, tmp_path):
    pipeline = PIPELINES[dataset.pipeline]
    # One run folder per input: each run's large files must outlive the round.
    ctxs = [RunContext(tmp_path / f"run{i}", params, pipeline.Partitioning())
            for i in range(len(reference))]
    steps = pipeline.STEPS if step == "pipeline" else [pipeline.STEP_BY_NAME[step]]
    engine.check_params(steps, params)  # pinned (conftest refuses --param without
    # --perf-params); with it, an engine's own step may not follow a changed one
    if step == "pipeline":
        states = [run.source.load_state() for run in reference]

        def run_all():
            return [pipeline.run_pipeline(engine, s, c) for s, c in zip(states, ctxs)]
    else:
        states = [run.state_before(step) for run in reference]

        def run_all():
            return [engine.run_step(steps[0], s, c).outputs for s, c in zip(states, ctxs)]

    for s in steps:  # an engine that compiles per input shape does it here, untimed
        engine.prepare(s, reference[0].state_before(s.name), ctxs[0])
    ref_seconds = sum(run.seconds[s.name] for run in reference for s in steps)
    # The work done: what every step reads, planned from the reference's own states.
    planned = [s.plan(run.state_before(s.name), c)
               for run, c in zip(reference, ctxs) for s in steps]
    work = {"partitions": sum(len(p.partitions) for p in planned),
            "bytes_in": sum(p.bytes_in for p in planned),
            pipeline.UNIT: sum(p.voxels for p in planned)}

    # Every output the step declares must be there and match, not only what came back.
    keys = CHECKS[dataset.pipeline].ALL_OUTPUTS if step == "pipeline" else steps[0].outputs

    def check(outputs):
        for out, run in zip(outputs, reference):
            assert_match(engine, dataset.pipeline, out, run.state, keys=keys)

    try:
        bench(run_all, check=check, pipeline=dataset.pipeline, step=step, engine=engine,
              dataset=dataset, reference_seconds=ref_seconds, work=work)
    finally:
        # Intermediate images are as big as the input (4.2 GB per HCP subject, 115 GB for
        # 24 HiTS visits), and pytest keeps the temporary folders of its last three sessions.
        for image in [*tmp_path.rglob("*.nii"), *tmp_path.rglob("*.fits")]:
            image.unlink()
