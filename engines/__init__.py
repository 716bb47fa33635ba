"""How it is computed: one module per engine behind `engines.base.Engine`.

Engines are imported lazily, so a missing optional package makes only that engine
unavailable, with the reason and the install command. Each engine's own command-line
options are declared here, once: pytest (`conftest.py`) and the CLI (`python -m
pipelines`) both build theirs from this table, and an option exists even where its
engine's package is not installed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from pipelines.errors import EngineUnavailable


@dataclass(frozen=True)
class Option:
    """One engine option: `--flag VALUE` on the command line, `keyword=` to the engine."""

    flag: str
    keyword: str
    help: str
    metavar: str | None = None
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, add_argument) -> None:
        """Declare it through an argparse `add_argument` or pytest's `addoption`."""
        add_argument(self.flag, metavar=self.metavar, type=self.type, choices=self.choices,
                     help=self.help, default=None)


def voxel_block(value) -> tuple[int, int, int]:
    """'16,16,16' (or '16' for a cube, or a tuple) -> (16, 16, 16); anything else is
    refused in one line (argparse prints an ArgumentTypeError's message as it is)."""
    import argparse

    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        block = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        block = ()
    if len(block) == 1:
        block *= 3
    if len(block) != 3 or min(block) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a voxel block: X,Y,Z positive integers "
                         f"(or one, for a cube), e.g. 16,16,16")
    return block


@dataclass(frozen=True)
class Entry:
    module: str
    cls: str
    extra: str | None  # the pyproject extra that installs it
    options: tuple[Option, ...] = ()


ENGINES = {
    "reference": Entry("engines.reference", "ReferenceEngine", None),
    "dask": Entry("engines.dask", "DaskEngine", "dask", (
        Option("--dask-scheduler", "scheduler", "run Dask on this existing cluster instead "
               "of a local one", metavar="ADDRESS"),
        Option("--dask-lost-after", "no_workers_timeout", "a step's cluster with no worker "
               "this long is lost (default 60; more for a cluster that scales up slowly)",
               metavar="SECONDS", type=float),
    )),
    "spark": Entry("engines.spark", "SparkEngine", "spark", (
        Option("--spark-master", "master", "run Spark on this cluster (spark://host:7077) "
               "instead of local[N] (N = --workers)", metavar="URL"),
        Option("--spark-driver-memory", "driver_memory", "Spark driver JVM heap, e.g. 4g "
               "(default 2g)", metavar="SIZE"),
        Option("--spark-executor-memory", "executor_memory", "Spark executor JVM heap on a "
               "cluster, e.g. 4g (default 2g)", metavar="SIZE"),
        Option("--spark-partitions-per-core", "partitions_per_core", "RDD partitions per "
               "Spark core for a step (default 1, the study's best)", metavar="N", type=int),
        Option("--spark-lost-after", "no_executors_timeout", "a job on a cluster with no "
               "executor this long is lost (default 60)", metavar="SECONDS", type=float),
    )),
    "scidb": Entry("engines.scidb", "SciDBEngine", "scidb", (
        Option("--scidb-url", "url", "run the SciDB engine on this server's shim service "
               "(http://host:8080; credentials from SCIDB_USER/SCIDB_PASSWORD and "
               "SHIM_USER/SHIM_PASSWORD); without it the engine is skipped", metavar="URL"),
        Option("--scidb-python", "python", "the Python on the SciDB server that runs the "
               "suite's kernels in stream() (default /usr/bin/python3)", metavar="PATH"),
        Option("--scidb-suite", "suite", "this repository's path on the SciDB server "
               "(default: the same path as here)", metavar="PATH"),
        Option("--scidb-chunk", "chunk", "voxel block of each chunk of the stored DWI "
               "series (default: a whole volume, the study's unit)", metavar="X,Y,Z",
               type=voxel_block),
        Option("--scidb-fit-block", "fit_block", "voxel block of each chunk the tensor fit "
               "streams, every volume of it (default: 16,16,16, the partitioning's)",
               metavar="X,Y,Z", type=voxel_block),
    )),
    "myria": Entry("engines.myria", "MyriaEngine", None, (
        Option("--myria-url", "url", "run the Myria engine on this cluster's REST server "
               "(http://host:8753); without it the engine is skipped", metavar="URL"),
        Option("--myria-stage", "stage", "a folder this machine writes and every Myria "
               "worker reads at the same path (the arrays go in from there; default: a "
               "folder in this machine's temp dir, for a Myria on this machine only)",
               metavar="DIR"),
        Option("--myria-python", "python", "the Python 3 on the Myria workers that runs "
               "the suite's kernels for the UDFs (default /usr/bin/python3)",
               metavar="PATH"),
        Option("--myria-suite", "suite", "this repository's path on the Myria workers "
               "(default: the same path as here)", metavar="PATH"),
    )),
    "tensorflow": Entry("engines.tf", "TensorFlowEngine", "tensorflow", (
        Option("--tf-precision", "precision", "floating point of TensorFlow's heavy steps "
               "(default float64, which matches the reference to its own bounds; float32 "
               "is faster, within the bounds stated in engines/tf)",
               choices=("float64", "float32")),
    )),
}


def engine_options() -> list[Option]:
    """Every engine's options, in table order."""
    return [opt for entry in ENGINES.values() for opt in entry.options]


def engine_class(name: str):
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    entry = ENGINES[name]
    try:
        return getattr(importlib.import_module(entry.module), entry.cls)
    except ImportError as exc:
        hint = f" (pip install '.[{entry.extra}]')" if entry.extra else ""
        raise EngineUnavailable(f"{name}: {exc.name or exc} is not installed{hint}") from None


def create_engine(name: str, workers: int | None = None, **options):
    """An engine built from the suite's options (`Option.dest` -> value, None for not
    given; each engine takes its own); call `.start()` (or use `with`) to open it."""
    own = {opt.keyword: options[opt.dest] for opt in ENGINES[name].options
           if options.get(opt.dest) is not None} if name in ENGINES else {}
    return engine_class(name)(workers=workers, **own)
