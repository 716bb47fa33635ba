"""The one interface every engine implements.

An engine opens a session (`start`), runs a pipeline step (`run_step`), and closes. The
default `run_step` plans the step on the client and hands its kernel and partitions to
`map`, the single primitive a Python-running engine must provide; an engine that has to
re-express a step natively (TensorFlow, SciDB's AFL) overrides `run_step` for that step.
What an engine cannot do it lists once in `not_implemented`, with the reason; the tests
turn that into a strict expected failure, so the capability matrix stays truthful.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any, Callable, ClassVar

from pipelines.steps import Plan, RunContext, Step, StepRun

# The domain libraries whose versions go with every result.
RECORDED_PACKAGES = ("numpy", "scipy", "dipy", "nibabel", "astropy", "photutils", "reproject",
                     "astroscrappy")

Progress = Callable[[str, int, int], None]  # (step name, tasks done, tasks in the step)


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def print_progress(label: str, done: int, total: int) -> None:
    """A `Progress` that shows long work on stderr: live on a terminal, final count in a log."""
    if done == total or sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r  {label}: {done}/{total} tasks", end=end, file=sys.stderr, flush=True)


def package_versions(names=RECORDED_PACKAGES) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


class Engine:
    name: ClassVar[str]
    # step name -> why this engine cannot run it (raises NotImplementedError with it)
    not_implemented: ClassVar[dict[str, str]] = {}

    def __init__(self, workers: int | None = None):
        self.workers = workers or usable_cores()
        self.progress: Progress | None = None

    @classmethod
    def from_options(cls, workers: int | None, options: dict[str, Any]) -> "Engine":
        """Build from the suite's command-line options (--workers, --dask-scheduler, ...)."""
        return cls(workers=workers)

    # -- session ------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Open the session and warm it up; raises EngineUnavailable with the reason."""
        return self

    def close(self) -> None:
        pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def versions(self) -> dict[str, str]:
        return package_versions()

    def worker_pids(self) -> list[int]:
        """The processes on this machine that run kernels (for the fault-tolerance test);
        empty where there is none to lose: the reference runs kernels in its caller."""
        return []

    def describe(self) -> dict[str, Any]:
        """Facts recorded with every result."""
        return {"engine": self.name, "workers": self.workers, "versions": self.versions()}

    # -- work ---------------------------------------------------------------------------
    def map(self, kernel: Callable, partitions: list, shared: dict[str, Any],
            label: str) -> list:
        """kernel(partition, **shared) for every partition, results in partition order.
        `shared` holds the small values every partition needs: broadcast them once."""
        raise NotImplementedError

    def run_step(self, step: Step, state: dict[str, Any], ctx: RunContext) -> StepRun:
        if step.name in self.not_implemented:
            raise NotImplementedError(f"{self.name} does not implement {step.name}: "
                                      f"{self.not_implemented[step.name]}")
        missing = [key for key in step.inputs if key not in state]
        if missing:
            raise ValueError(f"step {step.name} needs {missing}, which no earlier step made")
        plan = step.plan(state, ctx)
        return StepRun(plan.combine(self.run_plan(step, plan)), len(plan.partitions),
                       plan.bytes_in, plan.voxels)

    def run_plan(self, step: Step, plan: Plan) -> list:
        """The kernel's results for a planned step, in partition order; an engine with a
        native shuffle runs `plan.shuffle` itself (results then in group-key order)."""
        return self.map(step.kernel, plan.partitions, plan.shared, label=step.name)

    def _report(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)
