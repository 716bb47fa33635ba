"""Dask: futures on a `distributed` cluster, the study's Dask idiom.

By default a local cluster of single-threaded worker processes, one per core (the study
found threaded Dask workers corrupted data, and one process per core avoids the GIL);
or an existing cluster given its scheduler address. Kernels read their inputs from files
by path on the workers; the client only scatters the small shared values (once, to every
worker) and gathers the small results.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import dask
import distributed
from distributed import Client, LocalCluster, as_completed

from pipelines.errors import EngineUnavailable

from .base import RECORDED_PACKAGES, Engine, package_versions

SUITE_ROOT = Path(__file__).resolve().parents[1]


def _prepare_worker() -> str | None:
    """Run once on every worker: the suite must import there, and BLAS/OpenMP get one
    thread (the nanny already sets OMP_NUM_THREADS=1; a user's cluster may not)."""
    try:
        import dipy.denoise.nlmeans  # noqa: F401  (import cost stays out of timed steps)
        import dipy.reconst.dti  # noqa: F401
        import dipy.segment.mask  # noqa: F401
        import pipelines.neuro  # noqa: F401
        from threadpoolctl import threadpool_limits
    except ImportError as exc:
        return str(exc)
    threadpool_limits(limits=1)
    return None


class DaskEngine(Engine):
    name = "dask"

    def __init__(self, workers: int | None = None, scheduler: str | None = None,
                 connect_timeout: float = 10.0):
        super().__init__(workers)
        self.scheduler = scheduler
        self.connect_timeout = connect_timeout
        self.client: Client | None = None
        self.cluster: LocalCluster | None = None

    @classmethod
    def from_options(cls, workers, options):
        return cls(workers=workers, scheduler=options.get("dask_scheduler"))

    def start(self):
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
                self.close()
                raise EngineUnavailable(f"the Dask scheduler at {self.scheduler} has no "
                                        f"workers") from None
            self.workers = len(self.client.scheduler_info()["workers"])
        else:
            self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                        processes=True, host="127.0.0.1",
                                        dashboard_address=None,
                                        silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
        problems = {w: err for w, err in self.client.run(_prepare_worker).items() if err}
        if problems:
            worker, err = next(iter(problems.items()))
            self.close()
            raise EngineUnavailable(f"Dask worker {worker} cannot import the suite ({err}); "
                                    f"start workers with PYTHONPATH={SUITE_ROOT} and the "
                                    f"suite's packages installed")
        return self

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def versions(self):
        found = package_versions(RECORDED_PACKAGES)
        found.update(dask=dask.__version__, distributed=distributed.__version__)
        return found

    def describe(self):
        facts = super().describe()
        facts.update(threads_per_worker=1,
                     scheduler=self.scheduler or "local cluster (processes)")
        return facts

    def map(self, kernel, partitions, shared, label):
        # Shared values go to every worker once (Dask's broadcast), not once per task.
        shared_futures = {k: self.client.scatter([v], broadcast=True, hash=False)[0]
                          for k, v in shared.items()}
        # pure=False: every call really runs; nothing is served from an earlier result.
        futures = self.client.map(kernel, partitions, pure=False,
                                  key=f"{label}-{uuid.uuid4().hex[:8]}", **shared_futures)
        try:
            for done, future in enumerate(as_completed(futures), 1):
                if future.status == "error":
                    future.result()  # re-raises the kernel's own exception here
                self._report(label, done, len(futures))
            return self.client.gather(futures)
        finally:
            self.client.cancel(futures + list(shared_futures.values()))
