"""The suite against an existing Dask cluster: a scheduler and two workers started here as
separate processes on 127.0.0.1, used through `--dask-scheduler` exactly as a user with a
real cluster would; and that cluster going away mid-step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import cli_denoising, kill_soon, run_step_tests_on_tiny, stop

pytestmark = [pytest.mark.correctness, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def start(args, log, env):
    return subprocess.Popen([sys.executable, "-m", "dask", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def dask_processes(tmp_path):
    """(scheduler address, [scheduler, worker, worker] processes)."""
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
        yield address, procs
    finally:
        stop(procs)
        log.close()


@pytest.fixture
def dask_cluster(dask_processes):
    return dask_processes[0]


def test_pipeline_runs_through_dask_scheduler_option(dask_cluster):
    import distributed

    run_step_tests_on_tiny("--engine", "dask", "--dask-scheduler", dask_cluster)
    with distributed.Client(dask_cluster, timeout="30s") as client:
        prefixes = client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.task_prefixes))
        assert len(client.scheduler_info()["workers"]) == 2
    assert {"denoise", "fit_tensor", "calibrate", "warp", "coadd", "detect"} <= set(prefixes), \
        prefixes


@pytest.mark.parametrize("killed", ["scheduler", "workers"])
def test_a_cluster_lost_mid_step_is_one_line(dask_processes, killed, tmp_path):
    """The scheduler, or every worker (their nannies too), killed while the CLI denoises:
    one line naming the cluster's address, exit status 3, no output folder."""
    address, procs = dask_processes
    out = tmp_path / "run" / "out"
    run = cli_denoising(["--engine", "dask", "--dask-scheduler", address], out)
    try:
        time.sleep(1.0)
        for victim in procs[:1] if killed == "scheduler" else procs[1:]:
            os.killpg(victim.pid, signal.SIGKILL)
    finally:
        status, after = run.finish()
    assert status == 3, after[-3000:]
    says = (f"error: lost the Dask scheduler at {address} during denoise: its connection "
            f"closed\n" if killed == "scheduler" else
            f"error: the Dask cluster at {address} lost denoise's tasks: the workers "
            f"holding their inputs went away\n")
    assert after == says, after[-3000:]
    assert list((tmp_path / "run").iterdir()) == []


def test_a_step_with_no_worker_left_ends(dask_processes):
    """Tasks that need no scattered data would wait for a worker forever: the engine
    gives up after --dask-lost-after, in one line."""
    from engines import create_engine
    from pipelines.errors import EngineLost

    address, procs = dask_processes
    engine = create_engine("dask", dask_scheduler=address, dask_lost_after=3.0).start()
    killer = kill_soon(procs[1:])
    try:
        started = time.monotonic()
        with pytest.raises(EngineLost, match=rf"the Dask cluster at {address} has had no "
                                             rf"worker for 3 s during sleep"):
            engine.map(time.sleep, [30.0] * 4, {}, "sleep")
        assert time.monotonic() - started < 20
    finally:
        killer.join()
        engine.close()
