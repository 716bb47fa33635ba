"""How it is computed: one module per engine behind `engines.base.Engine`.

Engines are imported lazily, so a missing optional package makes only that engine
unavailable, with the reason and the install command.
"""
from __future__ import annotations

import importlib

from pipelines.errors import EngineUnavailable

# name -> (module, class, the pyproject extra that installs it)
ENGINES = {
    "reference": ("engines.reference", "ReferenceEngine", None),
    "dask": ("engines.dask", "DaskEngine", "dask"),
    "spark": ("engines.spark", "SparkEngine", "spark"),
}


def engine_class(name: str):
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    module, cls, extra = ENGINES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        hint = f" (pip install '.[{extra}]')" if extra else ""
        raise EngineUnavailable(f"{name}: {exc.name or exc} is not installed{hint}") from None


def create_engine(name: str, workers: int | None = None, **options):
    """An engine built from the suite's options; call `.start()` (or use `with`) to open it."""
    return engine_class(name).from_options(workers, options)
