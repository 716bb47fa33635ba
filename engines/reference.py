"""The serial reference: every kernel, one after another, in this process, on one thread.
Its outputs define the truth that every other engine is checked against."""
from __future__ import annotations

from threadpoolctl import threadpool_limits

from pipelines import prepare_worker
from pipelines.errors import EngineUnavailable

from .base import Engine


class ReferenceEngine(Engine):
    name = "reference"

    def __init__(self, workers: int | None = None):
        super().__init__(workers=1)  # serial by definition, whatever --workers says

    def start(self):
        problem = prepare_worker()  # imports the kernels now, not in a timed step
        if problem:
            raise EngineUnavailable(f"reference: {problem}")
        return self

    def map(self, kernel, partitions, shared, label):
        results = []
        # One BLAS/OpenMP thread, so the reference is truly serial and its times honest.
        with threadpool_limits(limits=1):
            for done, part in enumerate(partitions, 1):
                results.append(kernel(part, **shared))
                self._report(label, done, len(partitions))
        return results
