"""What is computed: the study's pipelines as ordered steps, each with pinned parameters,
a partitioning and a per-partition kernel in plain NumPy/dipy. See `steps.py`."""
from __future__ import annotations

import importlib

# What a worker process imports before its first timed task, so that import time never
# lands in a measurement. Kernels import these lazily (a client need not have them all).
KERNEL_MODULES = ("pipelines.neuro", "dipy.core.gradients", "dipy.segment.mask",
                  "dipy.denoise.noise_estimate", "dipy.denoise.nlmeans", "dipy.reconst.dti")


def prepare_worker() -> str | None:
    """Make this process a ready engine worker: kernels imported, one BLAS/OpenMP thread
    (the engine supplies parallelism, one worker per core). Returns a problem, or None."""
    try:
        for module in KERNEL_MODULES:
            importlib.import_module(module)
        from threadpoolctl import threadpool_limits
    except ImportError as exc:
        return str(exc)
    threadpool_limits(limits=1)
    return None
