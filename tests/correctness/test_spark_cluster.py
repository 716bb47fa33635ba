"""The suite against a real Spark standalone cluster: a master and two workers started
here from pyspark's own `bin/spark-class`, as separate processes bound to 127.0.0.1, and
used through `--spark-master` exactly as a user with a real cluster would; and that
cluster, or the driver's JVM, going away mid-step."""
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.processes import cli_denoising, kill_soon, free_port, run_step_tests_on_tiny, stop

pytestmark = [pytest.mark.correctness, pytest.mark.slow]
WORKERS = 2


def bound_port(service: str, procs, log: Path, timeout: float = 90) -> int:
    """The port a Spark service says it bound. Not the one asked for: Spark moves on to the
    next port when another process took the asked-for one between free_port() and the bind,
    and that process (another Spark's UI, in one CI run) then answered our /json/ queries."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"Successfully started service '{service}' on port (\d+)")
    while not (found := pattern.search(log.read_text())):
        assert all(p.poll() is None for p in procs), log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"Spark's {service} did not start in {timeout} s"
        time.sleep(0.3)
    return int(found.group(1))


def master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=10) as r:
        return json.load(r)


def spark_runnable():
    """Skip, with the reason, where pyspark or Java 17+ is missing."""
    pytest.importorskip("pyspark")
    from engines.spark import find_java
    from pipelines.errors import EngineUnavailable

    try:
        find_java()
    except EngineUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def spark_cluster(tmp_path):
    spark_runnable()
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    port, ui_port = free_port(), free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_NO_DAEMONIZE": "1",
           "SPARK_HOME": str(spark_class.parents[1])}
    log_path = tmp_path / "cluster.log"
    log = open(log_path, "w")
    procs = []

    def launch(*args):
        procs.append(subprocess.Popen(["bash", str(spark_class), *args], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=tmp_path))

    try:
        launch("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
               "--port", str(port), "--webui-port", str(ui_port))
        port = bound_port("sparkMaster", procs, log_path)
        ui_port = bound_port("MasterUI", procs, log_path)
        master = f"spark://127.0.0.1:{port}"
        for i in range(WORKERS):
            launch("org.apache.spark.deploy.worker.Worker", master, "--host", "127.0.0.1",
                   "--cores", "1", "--memory", "2g", "--webui-port", "0",
                   "--work-dir", str(tmp_path / f"worker-{i}"))
        deadline = time.monotonic() + 90
        while len(master_state(ui_port)["workers"]) < WORKERS:
            assert all(p.poll() is None for p in procs), log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the workers did not register in 90 s"
            time.sleep(0.3)
        yield master, ui_port, procs
    finally:
        stop(procs)
        log.close()


def test_pipelines_run_through_spark_master_option(spark_cluster):
    master, ui_port, _ = spark_cluster
    run_step_tests_on_tiny("--engine", "spark", "--spark-master", master,
                           "--spark-executor-memory", "1g")
    # The work ran on this cluster: one finished application, on both workers' cores.
    state = master_state(ui_port)
    apps = [a for a in state["completedapps"] if a["name"] == "image-analytics-bench"]
    assert len(apps) == 1 and apps[0]["cores"] == WORKERS, state["completedapps"]
    assert len(state["workers"]) == WORKERS and \
        all(w["state"] == "ALIVE" for w in state["workers"]), state["workers"]


def test_unreachable_master_is_one_line(tmp_path):
    spark_runnable()
    from engines import create_engine
    from pipelines.errors import EngineUnavailable

    start = time.monotonic()
    with pytest.raises(EngineUnavailable, match=r"cannot reach the Spark master at "
                                                r"spark://127.0.0.1:\d+"):
        create_engine("spark", spark_master=f"spark://127.0.0.1:{free_port()}").start()
    assert time.monotonic() - start < 30


def test_a_running_step_outlives_its_master(spark_cluster):
    """The master only grants executors: killed mid-step, the step still ends, with its
    answers (the application keeps the executors it has)."""
    from engines.spark import SparkEngine

    master, _, procs = spark_cluster
    engine = SparkEngine(master=master, executor_memory="1g").start()
    killer = kill_soon(procs[:1])
    try:
        assert engine.map(abs, [-1.5, -2.5, 3.5, -4.5], {}, "abs") == [1.5, 2.5, 3.5, 4.5]
        assert engine.map(time.sleep, [2.0] * 4, {}, "sleep") == [None] * 4
    finally:
        killer.join()
        engine.close()


def test_a_cluster_lost_mid_step_is_one_line(spark_cluster):
    """Master and workers killed mid-step: Spark would wait for an executor forever; the
    engine gives up after --spark-lost-after, in one line with the master's URL."""
    from engines import create_engine
    from pipelines.errors import EngineLost

    master, _, procs = spark_cluster
    engine = create_engine("spark", spark_master=master, spark_executor_memory="1g",
                           spark_lost_after=5.0).start()
    killer = kill_soon(procs)
    try:
        started = time.monotonic()
        with pytest.raises(EngineLost, match=rf"lost the Spark cluster at {master} during "
                                             rf"sleep: no executor for 5 s"):
            engine.map(time.sleep, [60.0] * 4, {}, "sleep")
        assert time.monotonic() - started < 40
    finally:
        killer.join()
        engine.close()


def test_a_killed_jvm_is_one_line(tmp_path):
    """The driver's JVM killed while the CLI denoises (local Spark): one line with its
    pid, exit status 3, no output folder, no process left."""
    import psutil

    spark_runnable()
    out = tmp_path / "out"
    run = cli_denoising(["--engine", "spark"], out)
    try:
        time.sleep(1.0)
        started = psutil.Process(run.proc.pid).children(recursive=True)
        jvm = [p for p in started if p.name() == "java"]
        assert len(jvm) == 1, [p.cmdline()[:2] for p in started]
        jvm[0].kill()
    finally:
        status, after = run.finish()
    assert status == 3, after[-3000:]
    assert re.fullmatch(rf"error: Spark's JVM \(pid {jvm[0].pid}\) died during denoise "
                        rf"\(exit status -9\)\n", after), after[-3000:]
    assert list(tmp_path.iterdir()) == []
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], [p.cmdline()[:3] for p in alive]
