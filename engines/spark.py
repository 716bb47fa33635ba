"""Spark: PySpark pair RDDs, the study's Spark idiom.

A step's fragments become a pair RDD keyed by fragment id; each value is the fragment's
description (file paths, volume indices, a voxel block), and the kernel, run by
`mapValues` in Spark's Python workers, reads its input by path and returns its result as
ndarrays under the same key. The driver never loads the dataset. A step's small shared
values (the brain mask, the parameters, the sky map) are one broadcast variable. A step
that regroups records (warp: CCD -> (visit, patch); coadd: (visit, patch) -> patch) runs
its flatMap and groupByKey as a Spark shuffle (`Plan.shuffle`).

By default a `local[N,4]` session: N task slots (one per core), each task tried up to 4
times, as `spark.task.maxFailures` does on a cluster (plain `local[N]` never retries).
Or an existing cluster given its master URL (`spark://host:7077`). Needs Java 17+.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyspark  # noqa: F401  (missing: the registry says "pip install '.[spark]'")

from pipelines.errors import DiskFull, EngineLost, EngineUnavailable, WorkersKeptDying

from .base import RECORDED_PACKAGES, Engine, native, package_versions

SUITE_ROOT = Path(__file__).resolve().parents[1]
LOG_CONFIG = Path(__file__).resolve().parent / "spark-log4j2.properties"
MIN_JAVA = 17
TASK_ATTEMPTS = 4  # as spark.task.maxFailures' default on a cluster
DAEMON_MODULE = "engines.spark_daemon"
PARTITIONS_PER_CORE = 1  # the study's lesson, measured again here: see `partitions`


def java_version(java: str) -> int | None:
    """The major version `java -version` reports, or None when it cannot say."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True,
                             timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2)) if major == 1 else major  # "1.8" is Java 8


def find_java() -> str:
    """The `java` Spark will use (JAVA_HOME first, as Spark's launcher does), checked to
    be 17 or newer; EngineUnavailable with the fix otherwise."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    how = ("install a JDK or JRE 17+ (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
           " and put java on PATH or set JAVA_HOME")
    if not java or not Path(java).exists():
        raise EngineUnavailable(f"Spark needs Java {MIN_JAVA}+ and found none: {how}")
    version = java_version(java)
    if version is None or version < MIN_JAVA:
        raise EngineUnavailable(f"Spark needs Java {MIN_JAVA}+ but {java} is "
                                f"{version or 'unknown'}: {how}")
    return java


def _master_reachable(master: str, timeout: float) -> None:
    """A standalone master URL that accepts TCP connections; Spark itself would retry for
    minutes before giving up."""
    for address in master.removeprefix("spark://").split(","):
        url = urlparse(f"spark://{address}")
        try:
            socket.create_connection((url.hostname, url.port or 7077), timeout).close()
            return
        except OSError as exc:
            problem = exc.strerror or str(exc)
    raise EngineUnavailable(f"cannot reach the Spark master at {master}: {problem}")


# -- what runs in the Python workers ----------------------------------------------------

class KernelFailed:
    """A kernel's exception, carried back as the fragment's value: Spark's retries are for
    lost workers, and an error in the input fails the same way on every attempt."""

    def __init__(self, exc: BaseException):
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:  # an exception that cannot travel: keep its words
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")


_prepared = False


def _prepare() -> str | None:
    """Once per Python worker: the suite's imports and one BLAS thread (`prepare_worker`)."""
    global _prepared
    if _prepared:
        return None
    try:
        from pipelines import prepare_worker
    except ImportError as exc:
        return f"{exc} (sys.path: {sys.path[:3]}...)"
    problem = prepare_worker()
    _prepared = problem is None
    return problem


def _run_kernel(fragment, kernel, shared):
    _prepare()
    try:
        return kernel(fragment, **shared.value)
    except Exception as exc:
        return KernelFailed(exc)


def _emit_indexed(indexed_record, emit):
    """flatMap: record -> (group key, (record index, value)); the index keeps each group's
    values in record order, whatever order the shuffle delivers them in."""
    index, record = indexed_record
    return [(key, (index, value)) for key, value in emit(record)]


def _make_group(key_values, make):
    key, values = key_values
    return key, make(key, [value for _, value in sorted(values, key=lambda iv: iv[0])])


def _worker_facts(_):
    """Warm-up task: each Python worker imports the suite; says where it runs."""
    return socket.gethostname(), os.getpid(), _prepare()


# -- the engine --------------------------------------------------------------------------

class SparkEngine(Engine):
    name = "spark"

    def __init__(self, workers: int | None = None, master: str | None = None,
                 driver_memory: str = "2g", executor_memory: str = "2g",
                 partitions_per_core: int = PARTITIONS_PER_CORE,
                 connect_timeout: float = 30.0, task_attempts: int = TASK_ATTEMPTS,
                 no_executors_timeout: float = 60.0):
        super().__init__(workers)
        # On a cluster, a job with no executor this long is lost: Spark would wait for one
        # forever (a master gone too cannot grant new ones).
        self.no_executors_timeout = no_executors_timeout
        self.master = master
        self.driver_memory = driver_memory
        self.executor_memory = executor_memory
        self.partitions_per_core = partitions_per_core
        self.connect_timeout = connect_timeout
        self.task_attempts = task_attempts
        self.cores = self.workers  # task slots in the cluster (an existing one may differ)
        self.java: str | None = None
        self.java_major: int | None = None
        self.session = None
        self.sc = None
        self.failed_tasks = 0  # task attempts Spark retried, over the session

    # -- session ------------------------------------------------------------------------
    def _conf(self) -> dict[str, str]:
        log = f"-Dlog4j2.configurationFile={LOG_CONFIG.as_uri()}"
        pythonpath = os.pathsep.join(p for p in (str(SUITE_ROOT),
                                                 os.environ.get("PYTHONPATH")) if p)
        conf = {
            "spark.app.name": "image-analytics-bench",
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.driver.memory": self.driver_memory,
            "spark.executor.memory": self.executor_memory,
            "spark.driver.extraJavaOptions": log,
            "spark.executor.extraJavaOptions": log,
            # One reused Python process per task slot: imports are paid once, not per task;
            # and workers forked from a daemon that imported the kernels already.
            "spark.python.worker.reuse": "true",
            "spark.python.daemon.module": DAEMON_MODULE,
            # The executor talks to its Python workers over Unix sockets, not loopback
            # TCP: there, a task's input waited ~40 ms per task for a delayed ACK (Nagle);
            # a job of two trivial tasks took 0.095 s over TCP, 0.046 s over Unix sockets.
            "spark.python.unix.domain.socket.enabled": "true",
            # The workers find the suite's modules (and run `python`, set in `start`).
            "spark.executorEnv.PYTHONPATH": pythonpath,
            "spark.task.maxFailures": str(self.task_attempts),
            # Spark's own scheduling of small tasks: no locality wait for data we read
            # from files by path (there is no HDFS block to wait for).
            "spark.locality.wait": "0s",
        }
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            conf[f"spark.executorEnv.{var}"] = "1"  # one BLAS thread per task slot
        return conf

    def start(self):
        self.java = find_java()
        self.java_major = java_version(self.java)
        # Python workers run this interpreter (the suite's venv), unless told otherwise;
        # PySpark reads it from the environment when the context starts.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        if self.master:
            if self.master.startswith("spark://"):
                _master_reachable(self.master, self.connect_timeout)
            master = self.master
        else:
            master = f"local[{self.workers},{self.task_attempts}]"
            # A local session listens on loopback only (and Spark does not warn that the
            # host name resolves to loopback).
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        from pyspark import SparkConf, SparkContext
        from pyspark.sql import SparkSession

        if SparkContext._active_spark_context is not None:
            # getOrCreate would hand back that context, with its settings, not ours.
            raise EngineUnavailable("a SparkContext is already running in this process; "
                                    "close the other Spark engine first")
        conf = SparkConf().setMaster(master).setAll(list(self._conf().items()))
        try:
            if self.log_dir is not None:
                # The JVM's own output (its banner, its warnings, its Python workers'
                # stderr) goes to a log file: the caller's stderr stays its own.
                from pyspark.java_gateway import launch_gateway

                self.log_dir.mkdir(parents=True, exist_ok=True)
                with open(self.log_dir / "spark.log", "ab") as log:
                    gateway = launch_gateway(conf, popen_kwargs={"stdout": log,
                                                                 "stderr": log})
                SparkContext(conf=conf, gateway=gateway)
            self.session = SparkSession.builder.config(conf=conf).getOrCreate()
        except Exception as exc:  # the JVM failed to start, or the master refused us
            raise EngineUnavailable(f"Spark did not start on {master}: "
                                    f"{str(exc).strip().splitlines()[0]}") from None
        self.sc = self.session.sparkContext
        self.sc.setLogLevel("ERROR")
        if self.master:
            self._wait_for_executors()
        self.cores = self.sc.defaultParallelism
        self._warm_up()
        return self

    def _wait_for_executors(self, settle: float = 2.0):
        """Until the cluster's executors have registered: the first, then no new one for
        `settle` seconds (partition counts follow the cores they bring)."""
        deadline = time.monotonic() + self.connect_timeout
        seen, since = 0, time.monotonic()
        while time.monotonic() < deadline:
            # The driver is one of the block managers listed; executors are the rest.
            executors = self.sc._jsc.sc().getExecutorMemoryStatus().size() - 1
            if executors != seen:
                seen, since = executors, time.monotonic()
            elif seen and time.monotonic() - since >= settle:
                self.workers = seen
                return
            time.sleep(0.2)
        if seen:
            self.workers = seen
            return
        self.close()
        raise EngineUnavailable(f"the Spark master at {self.master} gave this application "
                                f"no executors within {self.connect_timeout:g} s (no "
                                f"workers, or none with free cores and memory)")

    def _warm_up(self):
        """Start one Python worker per task slot and import the suite in each, outside
        every timed region; a worker that cannot import the suite is a clear error."""
        slots = self.cores
        try:
            facts = self.sc.parallelize(range(slots), slots).map(_worker_facts).collect()
        except Exception as exc:
            facts = [(None, None, _first_line(exc))]
        problems = [p for _, _, p in facts if p]
        if problems:
            self.close()
            raise EngineUnavailable(f"Spark's Python workers cannot import the suite "
                                    f"({problems[0]}); on a cluster, install the suite's "
                                    f"packages on every worker and set PYSPARK_PYTHON")

    def close(self):
        if self.session is not None:
            try:
                if self.jvm_exit() is None:
                    self.session.stop()
            except Exception:
                if self.jvm_exit(wait=5) is None:
                    raise
            if self.jvm_exit() is not None:
                self._forget_dead_session()
            self.session = None
            self.sc = None
            _stop_local_jvm()

    def _forget_dead_session(self) -> None:
        """Nothing to stop in a dead JVM: forget the session this process keeps."""
        from pyspark import SparkContext
        from pyspark.sql import SparkSession

        if getattr(self.sc, "_accumulatorServer", None):
            # its thread says the JVM's connection ended: now, not at exit
            self.sc._accumulatorServer.shutdown()
        SparkContext._active_spark_context = None
        SparkSession._instantiatedSession = SparkSession._activeSession = None

    def jvm_exit(self, wait: float = 0.0) -> int | None:
        """The driver JVM's exit status once it has died (None: alive, or not ours);
        `wait`: seconds to give a JVM whose connection just closed to be reaped (its
        sockets close a moment before its parent can see it has exited)."""
        proc = getattr(getattr(self.sc, "_gateway", None), "proc", None)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=wait) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def _failure(self, exc: BaseException, label: str, watcher) -> Exception:
        """A failed job as one line: the engine lost (its JVM, its cluster, its Python
        workers dying over and over), a full disk under Spark's scratch files, else
        Spark's own first error line."""
        from py4j.protocol import Py4JJavaError

        # an error from Java itself: the JVM lives; any other (the connection): it may not
        status = self.jvm_exit(wait=0 if isinstance(exc, Py4JJavaError) else 5)
        if status is not None:
            pid = self.sc._gateway.proc.pid
            return EngineLost(f"Spark's JVM (pid {pid}) died during {label} (exit status "
                              f"{status})")
        if watcher is not None and watcher.lost:
            return EngineLost(f"lost the Spark cluster at {self.master} during {label}: "
                              f"no executor for {self.no_executors_timeout:.0f} s")
        text = str(exc)
        if "Python worker exited unexpectedly" in text:
            tries = re.search(r"failed (\d+) times", text)
            return WorkersKeptDying(
                f"Spark's Python workers kept dying during {label}: a task's worker exited "
                f"unexpectedly on each of its "
                f"{tries.group(1) if tries else self.task_attempts} attempts")
        if "No space left on device" in text:  # Spark's own files: shuffle, spills
            return DiskFull(f"Spark's scratch space (spark.local.dir, default /tmp) during "
                            f"{label}: No space left on device")
        return RuntimeError(f"Spark failed in {label}: {_first_line(exc)}")

    def worker_pids(self):
        """Spark's Python workers: the processes the PySpark daemon forked (a local
        session's JVM is this process's child; a cluster's are elsewhere)."""
        import psutil

        gateway = getattr(self.sc, "_gateway", None) if self.sc else None
        if self.master or gateway is None or getattr(gateway, "proc", None) is None:
            return []
        daemons = [p for p in psutil.Process(gateway.proc.pid).children(recursive=True)
                   if DAEMON_MODULE in _cmdline(p)]
        return [child.pid for d in daemons for child in d.children()]

    def versions(self):
        found = package_versions(RECORDED_PACKAGES)
        for name in ("pyspark", "py4j"):
            try:
                found[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                found[name] = "not installed"
        if self.sc is not None:
            found["spark"] = self.sc.version
        if self.java:
            found["java"] = str(self.java_major)
        return found

    def describe(self):
        facts = super().describe()
        facts.update(cores=self.cores, partitions_per_core=self.partitions_per_core,
                     master=self.master or f"local[{self.workers},{self.task_attempts}]")
        return facts

    # -- work ---------------------------------------------------------------------------
    def partitions(self, fragments: int) -> int:
        """RDD partitions for a step of `fragments` fragments. The study found Spark best
        at one partition per core (its default gave one giant partition: 41.7 min against
        6.2); never more partitions than fragments."""
        return max(1, min(fragments, self.partitions_per_core * self.cores))

    def map(self, kernel, partitions, shared, label):
        n = self.partitions(len(partitions))
        # Fragments are dealt round-robin into the RDD's partitions: plans put their
        # biggest fragments first, and each partition gets a mix.
        dealt = [[(i, partitions[i]) for i in range(p, len(partitions), n)]
                 for p in range(n)]
        keyed = self._collect(
            lambda: self.sc.parallelize(dealt, n).flatMap(lambda fragments: fragments),
            kernel, shared, label)
        return [keyed[i] for i in range(len(partitions))]

    def run_step(self, step, state, ctx):
        before = self.failed_tasks
        run = super().run_step(step, state, ctx)
        run.extra["retried_tasks"] = self.failed_tasks - before  # lost workers' tasks
        return run

    @native("warp", "coadd")
    def shuffled(self, step, state, ctx, plan):
        """The study's flatMap + group-by as a Spark shuffle: records -> (key, value) ->
        groups -> the suite's kernel, every stage in the workers."""
        shuffle = plan.shuffle
        n = self.partitions(len(plan.partitions))

        def groups():
            records = self.sc.parallelize(list(enumerate(shuffle.records)), n)
            return (records.flatMap(functools.partial(_emit_indexed, emit=shuffle.emit))
                    .groupByKey(n)
                    .map(functools.partial(_make_group, make=shuffle.make)))
        keyed = self._collect(groups, step.kernel, plan.shared, step.name)
        return plan.combine([keyed[key] for key in sorted(keyed)])

    def _collect(self, pairs, kernel, shared, label) -> dict:
        """mapValues(kernel) over a pair RDD of fragments (made by `pairs()`), collected
        as {key: result}; the first kernel error is raised here as itself, Spark's own
        failures (the JVM's too, at any call) as one line (`_failure`)."""
        group = f"{label}-{uuid.uuid4().hex[:8]}"
        broadcast = watcher = None
        try:
            broadcast = self.sc.broadcast(shared)
            self.sc.setJobGroup(group, label)
            watcher = _JobWatcher(self, group, label)
            results = (pairs().mapValues(functools.partial(_run_kernel, kernel=kernel,
                                                           shared=broadcast))
                       .collect())
        except Exception as exc:
            raise self._failure(exc, label, watcher) from exc
        finally:
            if watcher is not None:
                watcher.stop()
            if self.jvm_exit() is None and broadcast is not None:
                self.failed_tasks += _failed_attempts(self.sc, group)
                broadcast.destroy()
        failures = [(k, r) for k, r in results if isinstance(r, KernelFailed)]
        if failures:
            raise min(failures, key=lambda kr: str(kr[0]))[1].exc
        return dict(results)


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # it ended meanwhile
        return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "Error" in line or "Exception" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _failed_attempts(sc, group: str) -> int:
    tracker = sc.statusTracker()
    failed = 0
    for job in tracker.getJobIdsForGroup(group):
        info = tracker.getJobInfo(job)
        for stage in (info.stageIds if info else ()):
            stage_info = tracker.getStageInfo(stage)
            failed += stage_info.numFailedTasks if stage_info else 0
    return failed


class _JobWatcher:
    """While a step's job runs: reports its finished tasks (RDD partitions) twice a second
    when someone watches, and on a cluster cancels it when no executor has been left for
    `no_executors_timeout` (`lost`). Quiet when the JVM goes away under it."""

    def __init__(self, engine: SparkEngine, group: str, label: str):
        self.engine, self.group, self.label = engine, group, label
        self.lost = False
        self.done = threading.Event()
        self.thread = None
        if engine.progress is not None or engine.master:
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()

    def _counts(self) -> tuple[int, int]:
        tracker = self.engine.sc.statusTracker()
        done = total = 0
        for job in tracker.getJobIdsForGroup(self.group):
            info = tracker.getJobInfo(job)
            for stage in (info.stageIds if info else ()):
                s = tracker.getStageInfo(stage)
                if s:
                    done, total = done + s.numCompletedTasks, total + s.numTasks
        return done, total

    def _executors(self) -> int:
        # the driver is one of the block managers listed; executors are the rest
        return self.engine.sc._jsc.sc().getExecutorMemoryStatus().size() - 1

    def _watch(self):
        last, alone_since = None, None
        try:
            while not self.done.wait(0.5):
                counts = self._counts()
                if counts != last and counts[1] and counts[0] < counts[1]:
                    self.engine._report(self.label, *counts)
                    last = counts
                if self.engine.master:
                    if self._executors():
                        alone_since = None
                        continue
                    alone_since = alone_since or time.monotonic()
                    if time.monotonic() - alone_since > self.engine.no_executors_timeout:
                        self.lost = True
                        self.engine.sc.cancelJobGroup(self.group)
                        return
        except Exception:  # the JVM went away: the job's own error says so
            return

    def stop(self):
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        if self.engine.progress is not None and self.engine.jvm_exit() is None:
            done, total = self._counts()
            if total:
                self.engine._report(self.label, total, total)


def _stop_local_jvm(timeout: float = 30):
    """Stopping a SparkSession leaves the JVM that PySpark launched running (~350 MB, kept
    for a next session), where it would count in the next engine's memory figures. Its
    gateway server exits when its stdin closes; a new session launches a fresh JVM."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    proc = getattr(gateway, "proc", None)
    if gateway is None or proc is None:  # a JVM this process did not launch: not ours
        return
    with SparkContext._lock:
        SparkContext._gateway = SparkContext._jvm = None
    gateway.shutdown()
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
