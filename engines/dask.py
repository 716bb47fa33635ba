"""Dask: futures on a `distributed` cluster, the study's Dask idiom.

By default a local cluster of single-threaded worker processes, one per core (the study
found threaded Dask workers corrupted data, and one process per core avoids the GIL);
or an existing cluster given its scheduler address. Kernels read their inputs from files
by path on the workers; the client only scatters the small shared values (once, to every
worker) and gathers the small results.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import dask
import distributed
from distributed import Client, KilledWorker, LocalCluster
from concurrent.futures import CancelledError

from pipelines.errors import EngineLost, EngineUnavailable, WorkersKeptDying

from .base import RECORDED_PACKAGES, Engine, children_ignore_ctrl_c, package_versions

SUITE_ROOT = Path(__file__).resolve().parents[1]

# Settings of the local cluster, each measured on phantom-small's DTI fit (2 workers):
LOCAL_CLUSTER_CONFIG = {
    # The nanny sets MALLOC_TRIM_THRESHOLD_=65536 in workers to return memory to the OS
    # sooner; it also turns off glibc's adaptive mmap threshold, so every large numpy
    # temporary is mmapped and page-faulted afresh: the fit ran 9% slower. Workers get the
    # same allocator behaviour as the reference instead.
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    # The statistical profiler samples every worker thread each 10 ms, holding the GIL:
    # no use to a benchmark, and it costs the workers CPU.
    "distributed.worker.profile.enabled": False,
}


def _prepare_worker() -> str | None:
    """Run once on every worker: the suite must import there (the nanny already sets
    OMP_NUM_THREADS=1; a user's cluster may not, so threads are pinned here too)."""
    try:
        from pipelines import prepare_worker
    except ImportError as exc:
        return str(exc)
    return prepare_worker()


class DaskEngine(Engine):
    name = "dask"

    def __init__(self, workers: int | None = None, scheduler: str | None = None,
                 connect_timeout: float = 10.0, tasks_per_worker: int = 4,
                 no_workers_timeout: float = 60.0):
        super().__init__(workers)
        # A step whose cluster has had no worker this long is lost (the scheduler itself
        # would wait for one forever); a worker's nanny restarts it in seconds.
        self.no_workers_timeout = no_workers_timeout
        self.log_handler: logging.Handler | None = None
        self.tasks_per_worker = tasks_per_worker
        self.threads = self.workers  # task slots in the cluster (an existing one may differ)
        self.scheduler = scheduler
        self.connect_timeout = connect_timeout
        self.client: Client | None = None
        self.cluster: LocalCluster | None = None

    def start(self):
        try:
            self._start()
        except BaseException:
            self.close()  # what was started, and the log handler
            raise
        return self

    def _start(self):
        self._log_to_file()
        if self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout=f"{self.connect_timeout}s")
            except (OSError, TimeoutError) as exc:
                raise EngineUnavailable(f"cannot reach the Dask scheduler at "
                                        f"{self.scheduler}: {str(exc).splitlines()[0]}"
                                        ) from None
            try:
                self.client.wait_for_workers(1, timeout=self.connect_timeout)
            except TimeoutError:
                raise EngineUnavailable(f"the Dask scheduler at {self.scheduler} has no "
                                        f"workers") from None
            found = self.client.scheduler_info()["workers"].values()
            self.workers = len(found)
            self.threads = sum(w.get("nthreads", 1) for w in found)
        else:
            with dask.config.set(LOCAL_CLUSTER_CONFIG), children_ignore_ctrl_c():
                self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                            processes=True, host="127.0.0.1",
                                            dashboard_address=None,  # no dashboard
                                            # its small HTTP server (health, info pages):
                                            # loopback only, any free port
                                            scheduler_kwargs={
                                                "dashboard_address": "127.0.0.1:0"},
                                            silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
            self.threads = self.workers
            if self.log_handler is not None:  # our workers' log lines too (not a user's)
                self.client.register_plugin(_LogToFile(self.log_handler.baseFilename))
        problems = {w: err for w, err in self.client.run(_prepare_worker).items() if err}
        if problems:
            worker, err = next(iter(problems.items()))
            raise EngineUnavailable(f"Dask worker {worker} cannot import the suite ({err}); "
                                    f"start workers with PYTHONPATH={SUITE_ROOT} and the "
                                    f"suite's packages installed")

    def close(self):
        try:
            if self.client is not None:
                client, self.client = self.client, None
                client.close()
        finally:
            try:
                if self.cluster is not None:
                    cluster, self.cluster = self.cluster, None
                    cluster.close()
            finally:
                if self.log_handler is not None:
                    logger = logging.getLogger("distributed")
                    logger.handlers[:], logger.propagate = self.logged_before
                    self.log_handler.close()
                    self.log_handler = None

    def _log_to_file(self) -> None:
        """With a log folder (the CLI's output), distributed's own log lines (a lost
        connection's retries, a removed worker) go to dask.log there, as Spark's JVM logs
        to spark.log: its handlers were made for this process's stderr at import."""
        if self.log_dir is None:
            return
        logger = logging.getLogger("distributed")
        self.logged_before = list(logger.handlers), logger.propagate
        self.log_handler = logging.FileHandler(Path(self.log_dir) / "dask.log")
        self.log_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.handlers[:] = [self.log_handler]
        logger.propagate = False

    @property
    def address(self) -> str:
        return self.scheduler or (self.cluster.scheduler_address if self.cluster else "?")

    def _lost(self, exc: BaseException, label: str) -> EngineLost | None:
        """The cluster's own failures, as one line with its address (None: not one)."""
        connection_gone = self.client is None or self.client.status != "running"
        if isinstance(exc, CancelledError):  # distributed's Future(s)CancelledError
            if "scheduler-connection-lost" in str(exc) or connection_gone:
                return EngineLost(f"lost the Dask scheduler at {self.address} during "
                                  f"{label}: its connection closed")
            # the scheduler cancels tasks whose inputs (scattered values) died with the
            # last workers holding them ("already forgotten")
            return EngineLost(f"the Dask cluster at {self.address} lost {label}'s tasks: "
                              f"the workers holding their inputs went away")
        if isinstance(exc, KilledWorker):
            return WorkersKeptDying(
                f"Dask workers kept dying during {label}: a task was running on each of "
                f"{exc.allowed_failures + 1} workers that died (KilledWorker), at "
                f"{self.address}")
        if isinstance(exc, OSError) and connection_gone:  # a scatter, say, mid-loss
            return EngineLost(f"lost the Dask scheduler at {self.address} during {label}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'connection lost'}")
        return None

    def worker_pids(self):
        if self.cluster is None:
            return []  # an existing cluster's workers may be on other machines
        return list(self.client.run(os.getpid).values())

    def versions(self):
        found = package_versions(RECORDED_PACKAGES)
        found.update(dask=dask.__version__, distributed=distributed.__version__)
        return found

    def describe(self):
        facts = super().describe()
        facts.update(threads=self.threads, tasks_per_worker=self.tasks_per_worker,
                     scheduler=self.scheduler or "local cluster (processes)")
        return facts

    def map(self, kernel, partitions, shared, label):
        futures = []
        try:
            outputs, tasks = self._run(kernel, partitions, shared, label, futures)
        except BaseException as exc:
            lost = self._lost(exc, label)
            try:
                if futures and self.client is not None:
                    self.client.cancel(futures)  # a failed step leaves nothing running
            except Exception:
                if lost is None:
                    raise
            if lost is not None:
                raise lost from exc
            raise
        results = [None] * len(partitions)
        for task, task_outputs in zip(tasks, outputs):
            for i, out in zip(task, task_outputs):
                results[i] = out
        return results

    def _run(self, kernel, partitions, shared, label, futures: list):
        """The step's tasks, submitted (into `futures`, for `map` to cancel) and waited
        for: (their outputs, the fragments of each)."""
        # Shared values go to every worker once (Dask's broadcast), in one round trip.
        names = list(shared)
        shared_futures = dict(zip(names, self.client.scatter(
            [shared[n] for n in names], broadcast=True, hash=False))) if names else {}
        # Fragments are dealt round-robin into a few tasks per worker thread: each Dask task
        # costs ~2 ms of scheduler and worker CPU here (measured: 32 empty tasks 60 ms,
        # 8 tasks 15 ms on 2 workers), which the cores doing the work pay for.
        # Dealing keeps a mix of big and small fragments in every task (plans put their
        # biggest fragments first).
        n_tasks = min(len(partitions), self.tasks_per_worker * self.threads)
        tasks = [list(range(i, len(partitions), n_tasks)) for i in range(n_tasks)]
        # pure=False: every call really runs; nothing is served from an earlier result.
        futures += self.client.map(_run_fragments, [[partitions[i] for i in t] for t in tasks],
                                   kernel=kernel, pure=False,
                                   key=f"{label}-{uuid.uuid4().hex[:8]}", **shared_futures)
        self._wait(futures, label)
        return self.client.gather(futures), tasks

    def _wait(self, futures, label) -> None:
        """Until every task has finished (the first error raised at once): the client
        wakes at each completion and every few seconds, and raises EngineLost when the
        cluster has had no worker for too long."""
        pending, alone_since = futures, None
        while pending:
            try:
                done, pending = distributed.wait(pending, timeout=5.0,
                                                 return_when="FIRST_COMPLETED")
            except TimeoutError:
                if self.client.scheduler_info().get("workers"):
                    alone_since = None
                    continue
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > self.no_workers_timeout:
                    raise EngineLost(f"the Dask cluster at {self.address} has had no "
                                     f"worker for {self.no_workers_timeout:.0f} s during "
                                     f"{label}") from None
                continue
            for future in futures:  # in submission order: the same error each time
                if future in done and future.status != "finished":
                    future.result()  # re-raises the kernel's (or the cluster's) error here
            self._report(label, len(futures) - len(pending), len(futures))


class _LogToFile(distributed.WorkerPlugin):
    """In each worker of the local cluster (one restarted after a death too): what it
    prints and logs (a task's failure, a kernel's warning) goes to the engine's log file,
    not to the terminal whose stderr it inherited from the CLI."""

    def __init__(self, path: str):
        self.path = path

    def setup(self, worker):
        log = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        for fd in (1, 2):
            os.dup2(log, fd)
        os.close(log)
        handler = logging.FileHandler(self.path)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s worker {worker.name} %(name)s %(levelname)s: %(message)s"))
        logging.getLogger("distributed").handlers[:] = [handler]


def _run_fragments(fragments, kernel, **shared):
    return [kernel(fragment, **shared) for fragment in fragments]
