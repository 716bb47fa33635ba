"""What is computed: the study's pipelines as ordered steps, each with pinned parameters,
a partitioning and a per-partition kernel in plain NumPy/dipy/astropy. See `steps.py`.

Each pipeline module offers the same names: STEPS, STEP_BY_NAME, Params, Partitioning,
run_pipeline(engine, state, ctx).
"""
from __future__ import annotations

import importlib

from . import astro, neuro

PIPELINES = {"neuro": neuro, "astro": astro}

# What a worker process imports before its first timed task, so that import time never
# lands in a measurement. Kernels import these lazily (a client need not have them all).
KERNEL_MODULES = ("pipelines.neuro", "dipy.core.gradients", "dipy.segment.mask",
                  "dipy.denoise.noise_estimate", "dipy.denoise.nlmeans", "dipy.reconst.dti",
                  "pipelines.astro", "astropy.io.fits", "astropy.wcs", "astropy.stats",
                  "astroscrappy", "photutils.background", "photutils.segmentation",
                  "reproject", "scipy.ndimage")


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
