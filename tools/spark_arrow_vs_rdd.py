"""Spark's two ways of moving a step's fragments and results, timed on the same step:
the engine's pair-RDD path (pickled Python objects) against a DataFrame `mapInArrow`
path (Arrow record batches holding the same values as binary columns).

    .venv/bin/pip install pyarrow 'pandas>=2.2'   # mapInArrow needs both; the suite neither
    .venv/bin/python tools/spark_arrow_vs_rdd.py [dataset] [step ...]

Checks that both give the reference's answer, then prints the median of 5 runs of each.
The engine keeps the RDD path: on our steps the values that cross the JVM are small
(fragment descriptions in; sums, sigma lists and FA/MD blocks out), so what decides is
the fixed cost of a job, and a DataFrame job adds Catalyst planning and Arrow conversion
to it. On phantom-small with 2 cores (Spark 4.3.0): mean_b0 0.081 s by RDD, 0.155 s by
Arrow; noise_sigma 0.149 / 0.219 s; fit_tensor 0.573 / 0.600 s.
"""
from __future__ import annotations

import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def arrow_map(engine, kernel, partitions, shared):
    """The same map as SparkEngine.map, through mapInArrow."""
    import pyarrow as pa

    n = engine.partitions(len(partitions))
    dealt = [(i, pickle.dumps(partitions[i])) for p in range(n)
             for i in range(p, len(partitions), n)]
    broadcast = engine.sc.broadcast(shared)
    frame = engine.session.createDataFrame(engine.sc.parallelize(dealt, n),
                                           "id long, fragment binary")

    def run(batches):
        for batch in batches:
            ids = batch.column("id").to_pylist()
            outs = [pickle.dumps(kernel(pickle.loads(f), **broadcast.value), protocol=5)
                    for f in batch.column("fragment").to_pylist()]
            yield pa.record_batch([pa.array(ids, pa.int64()), pa.array(outs, pa.binary())],
                                  names=["id", "result"])

    table = frame.mapInArrow(run, "id long, result binary").toArrow()
    broadcast.destroy()
    keyed = dict(zip(table.column("id").to_pylist(),
                     (pickle.loads(b) for b in table.column("result").to_pylist())))
    return [keyed[i] for i in range(len(partitions))]


def main(dataset="phantom-small", steps=("mean_b0", "noise_sigma", "fit_tensor")):
    from engines import create_engine
    from fixtures.datasets import load_dataset
    from fixtures.reference import reference_run
    from pipelines import PIPELINES
    from pipelines.steps import RunContext
    from tests.checks import assert_match

    data = load_dataset(dataset)
    run = reference_run(data.inputs[0])
    pipeline = PIPELINES[data.pipeline]
    with create_engine("spark") as engine, tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(Path(tmp), pipeline.Params(), pipeline.Partitioning())
        print(f"{dataset}, Spark {engine.sc.version}, {engine.cores} cores, "
              f"{engine.partitions_per_core} partition(s) per core; median of 5 runs")
        for name in steps:
            step = pipeline.STEP_BY_NAME[name]
            plan = step.plan(run.state_before(name), ctx)
            paths = {"rdd": lambda: engine.map(step.kernel, plan.partitions, plan.shared,
                                               name),
                     "arrow": lambda: arrow_map(engine, step.kernel, plan.partitions,
                                                plan.shared)}
            for path, fn in paths.items():
                assert_match(engine, data.pipeline, plan.combine(fn()), run.state,
                             keys=step.outputs)
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                print(f"  {name:12s} {path:6s} {statistics.median(times):8.3f} s")


if __name__ == "__main__":
    main(*sys.argv[1:2], *([sys.argv[2:]] if len(sys.argv) > 2 else []))
