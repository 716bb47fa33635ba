"""Fault tolerance: a worker process killed in the middle of a step. An engine that
survives it (Spark retries the task, Dask's scheduler reassigns it) must still give the
reference's answer, with no help from the test."""
import threading
import time

import psutil
import pytest

from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import PIPELINES
from pipelines.steps import RunContext
from tests.checks import assert_match

pytestmark = [pytest.mark.correctness, pytest.mark.slow]


class Killer(threading.Thread):
    """Kills the first worker seen working (its CPU time grows), then stops watching."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.procs = [psutil.Process(pid) for pid in pids]
        self.start_cpu = {p.pid: sum(p.cpu_times()[:2]) for p in self.procs}
        self.stop_watching = threading.Event()
        self.killed = None

    def run(self):
        while not self.stop_watching.is_set():
            for proc in self.procs:
                try:
                    if sum(proc.cpu_times()[:2]) - self.start_cpu[proc.pid] > 0.05:
                        proc.kill()
                        self.killed = proc.pid
                        return
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.01)


def test_step_survives_a_killed_worker(engine, tmp_path):
    run = reference_run(load_dataset("phantom-tiny").inputs[0])
    pipeline = PIPELINES["neuro"]
    # A cheap step first: an engine idle for a while may have let its workers go (Spark
    # stops idle Python workers after a minute) and starts them again on demand.
    engine.run_step(pipeline.STEP_BY_NAME["noise_sigma"], run.state_before("noise_sigma"),
                    RunContext(tmp_path / "wake", pipeline.Params(), pipeline.Partitioning()))
    pids = engine.worker_pids()
    if not pids:
        pytest.skip(f"{engine.name} has no worker process here to kill")
    # The tiny phantom's denoising: ~1 s of work split over the workers, long enough for a
    # worker to be caught mid-task.
    step = pipeline.STEP_BY_NAME["denoise"]
    killer = Killer(pids)
    killer.start()
    try:
        result = engine.run_step(step, run.state_before("denoise"),
                                 RunContext(tmp_path, pipeline.Params(),
                                            pipeline.Partitioning()))
    finally:
        killer.stop_watching.set()
        killer.join()
    assert killer.killed is not None, "the step ended before a worker was caught working"
    assert not psutil.pid_exists(killer.killed) or \
        psutil.Process(killer.killed).status() == psutil.STATUS_ZOMBIE
    assert_match(engine, "neuro", result.outputs, run.state)
    if "retried_tasks" in result.extra:  # an engine that counts its retries saw this one
        assert result.extra["retried_tasks"] >= 1
    # The engine still has its workers for the steps after this one.
    assert engine.worker_pids()


def test_a_task_that_kills_every_worker_it_runs_on_is_one_line(engine):
    """A worker that dies for good: a task whose every attempt kills the process running
    it (here os._exit) ends the step in one line, EngineLost, after the engine's own
    retries; the engine, its workers replaced, still runs the next step."""
    import os

    from pipelines.errors import EngineLost

    if not engine.worker_pids():
        pytest.skip(f"{engine.name} has no worker process here to kill")
    with pytest.raises(EngineLost, match=r"kept dying during exit"):
        engine.map(os._exit, [3], {}, "exit")
    assert engine.map(abs, [-2.5, 3.5], {}, "abs") == [2.5, 3.5]
