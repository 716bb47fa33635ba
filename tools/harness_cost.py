"""What the suite adds to a timed step, measured: the same step timed with and without the
memory sampler (fixtures/measure.py: the only harness work while a round runs; the answer
is checked after the rounds, and progress is off in perf runs), rounds interleaved.

    .venv/bin/python tools/harness_cost.py [dataset] [engine ...]

Prints, per engine and step, the median time of each arm, their difference, and the
sampler's own CPU time over the step's time (what every perf result records as
`harness_share`). The budget is 5% of the step (issue 10); see README "What the harness
costs" for the figures measured on our 2-core machine.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROUNDS = 15


def main(dataset="phantom-tiny", engines=("reference", "dask")):
    from engines import create_engine
    from fixtures.datasets import load_dataset
    from fixtures.measure import PeakMemory
    from fixtures.reference import reference_run
    from pipelines import PIPELINES
    from pipelines.steps import RunContext

    data = load_dataset(dataset)
    run = reference_run(data.inputs[0])
    pipeline = PIPELINES[data.pipeline]
    print(f"{dataset}: median of {ROUNDS} interleaved rounds with and without the sampler")
    for name in engines:
        with create_engine(name) as engine, tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext(Path(tmp), pipeline.Params(), pipeline.Partitioning())
            for step in pipeline.STEPS:
                state = run.state_before(step.name)
                engine.prepare(step, state, ctx)
                engine.run_step(step, state, ctx)  # warm
                times = {"with": [], "without": []}
                shares = []
                for i in range(2 * ROUNDS):
                    arm = ("with", "without")[(i + i // 2) % 2]  # ABBA
                    if arm == "without":
                        started = time.perf_counter()
                        engine.run_step(step, state, ctx)
                        times[arm].append(time.perf_counter() - started)
                        continue
                    # As in a perf run: the sampler is ready before the timer starts,
                    # and samples while the round runs
                    with PeakMemory() as peak:
                        started = time.perf_counter()
                        engine.run_step(step, state, ctx)
                        times[arm].append(time.perf_counter() - started)
                    shares.append(peak.cpu_seconds / times[arm][-1])
                on, off = (statistics.median(times[a]) for a in ("with", "without"))
                print(f"  {name:10s} {step.name:12s} with {on:8.4f} s  without {off:8.4f} s  "
                      f"difference {on / off - 1:+6.1%}  sampler CPU "
                      f"{statistics.median(shares):6.2%} of the step")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["phantom-tiny"]), *([tuple(sys.argv[2:])] if sys.argv[2:] else []))
