"""The suite against an existing Dask cluster: a scheduler and two workers started here as
separate processes on 127.0.0.1, used through `--dask-scheduler` exactly as a user with a
real cluster would."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import run_step_tests_on_tiny, stop

pytestmark = [pytest.mark.correctness, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def start(args, log, env):
    return subprocess.Popen([sys.executable, "-m", "dask", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def dask_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the workers import the suite's kernels
    log = open(tmp_path / "cluster.log", "w")
    procs = [start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(scheduler_file)], log, env)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert procs[0].poll() is None, (tmp_path / "cluster.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start in 60 s"
            time.sleep(0.2)
        for i in range(2):
            procs.append(start(["worker", "--scheduler-file", str(scheduler_file),
                                "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                                "--no-dashboard", "--name", f"worker-{i}"], log, env))
        address = json.loads(scheduler_file.read_text())["address"]
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        stop(procs)
        log.close()


def test_pipeline_runs_through_dask_scheduler_option(dask_cluster):
    import distributed

    run_step_tests_on_tiny("--engine", "dask", "--dask-scheduler", dask_cluster)
    with distributed.Client(dask_cluster, timeout="30s") as client:
        prefixes = client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.task_prefixes))
        assert len(client.scheduler_info()["workers"]) == 2
    assert {"denoise", "fit_tensor", "calibrate", "warp", "coadd", "detect"} <= set(prefixes), \
        prefixes
