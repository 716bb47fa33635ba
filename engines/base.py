"""The one interface every engine implements.

An engine opens a session (`start`), runs a pipeline step (`run_step`), and closes.
`run_step` holds the whole contract of a step in one place: the capability check, the
input check, the plan (made on the client, cheap), the run, and the check that the step
made exactly the outputs it declares. The run itself is either the suite's kernels,
handed with the plan's partitions to `map` (the single primitive a Python-running engine
provides), or the engine's own native implementation of that step: a method marked
`@native("step")`, given the same plan, returning the step's outputs.

What an engine cannot do it lists once in `not_implemented`, with the reason; running such
a step raises `StepNotImplemented`, which the tests report as an expected failure, so the
capability matrix stays truthful. How close an engine's outputs must come to the
reference's is declared per step, with the reason, by `tolerance` (engines that run the
suite's own kernels keep `engines.tolerances.SAME_KERNELS`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import platform
import signal
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar

from pipelines.errors import EngineLost, EngineUnavailable
from pipelines.steps import Plan, RunContext, Step, StepRun

from .tolerances import SAME_KERNELS, Tolerance

# The domain libraries whose versions go with every result.
RECORDED_PACKAGES = ("numpy", "scipy", "dipy", "nibabel", "astropy", "photutils", "reproject",
                     "astroscrappy")
# Recorded with every result too, present or not (the reference's cache key holds only the
# domain libraries above: an engine's upgrade does not change the reference's answers).
ENGINE_PACKAGES = ("dask", "distributed", "pyspark", "tensorflow", "scikit-image")

# What `Engine.capability` answers, and what each word means (the report's legend).
CAPABILITIES = {
    "kernels": "runs the suite's Python kernels (pipelines/), partitioned in its own idiom",
    "native": "its own implementation of the step, in the engine's idiom",
    "compiled": "its own implementation, run only as compiled code (graphs, XLA): no "
                "Python on the data",
    "not implemented": "the engine declares it cannot run the step, and why",
}

Progress = Callable[[str, int, int], None]  # (step name, tasks done, tasks in the step)
# A native step: (engine, step, state, ctx, plan) -> the step's outputs.
NativeStep = Callable[["Engine", Step, dict, RunContext, Plan], dict]


class StepNotImplemented(NotImplementedError):
    """An engine was asked for a step it declares in `not_implemented`."""

    def __init__(self, engine: str, step: str, reason: str):
        super().__init__(f"{engine} does not implement {step}: {reason}")
        self.engine, self.step, self.reason = engine, step, reason


class StepContractError(RuntimeError):
    """An engine's step made other outputs than the step declares: an engine bug."""


def native(*steps: str, compiled: bool = False, follows: tuple[str, ...] | None = None):
    """Mark an engine method as its own implementation of the named steps; `compiled`:
    it runs only as compiled code (TensorFlow's graphs and XLA), no Python on the data;
    `follows`: the step parameters (`Step.params`) it honours, where it does not honour
    them all (None: it runs the suite's kernels inside, so it follows every one); a run
    that changes another is refused (`Engine.check_params`), never silently ignored."""
    def mark(method):
        method.native_for = steps
        method.compiled = compiled
        method.follows = follows
        return method
    return mark


@functools.cache
def _pinned(params_type):
    """A pipeline's pinned parameters (its Params with every default)."""
    return params_type()


@contextlib.contextmanager
def children_ignore_ctrl_c():
    """Processes started inside ignore SIGINT (Python keeps an inherited SIG_IGN, and so
    does the JVM): a Ctrl-C at the terminal reaches the whole process group, and only the
    driver should act on it (it closes the engine, which ends its processes) rather than
    every worker printing its own traceback. Off the main thread: nothing to change."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def print_progress(label: str, done: int, total: int, stream=None) -> None:
    """A `Progress` that shows long work on stderr (or `stream`): live on a terminal, final
    count in a log."""
    stream = stream or sys.stderr
    if done == total or stream.isatty():
        end = "\n" if done == total else ""
        print(f"\r  {label}: {done}/{total} tasks", end=end, file=stream, flush=True)


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
    # step name -> why this engine cannot run it (running it raises StepNotImplemented)
    not_implemented: ClassVar[dict[str, str]] = {}
    # step name -> the engine's native implementation (collected from @native methods)
    native_steps: ClassVar[dict[str, NativeStep]] = {}
    # True: it runs only on a server the user gives (SciDB, Myria), so where none was
    # given its queries are compiled and pinned by tests, never run (the matrix says so)
    server_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        found = dict(cls.native_steps)
        for attr in vars(cls).values():
            for step in getattr(attr, "native_for", ()):
                found[step] = attr
        cls.native_steps = found

    def __init__(self, workers: int | None = None):
        self.workers = workers or usable_cores()
        self.progress: Progress | None = None
        # Where the engine's own processes (a JVM, say) write their logs, set before
        # `start`: a file in this folder, named by the engine. None: this process's stderr.
        self.log_dir: Path | None = None

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
        return {"engine": self.name, "workers": self.workers,
                "versions": {**package_versions(ENGINE_PACKAGES), **self.versions()}}

    @classmethod
    def capability(cls, step: str) -> str:
        """How this engine runs `step` (the capability matrix's words, CAPABILITIES)."""
        if step in cls.not_implemented:
            return f"not implemented: {cls.not_implemented[step]}"
        own = cls.native_steps.get(step)
        if own is None:
            return "kernels"
        return "compiled" if getattr(own, "compiled", False) else "native"

    @classmethod
    def check_implements(cls, steps) -> None:
        """Raise StepNotImplemented for the first of `steps` this engine cannot run: a
        whole pipeline is refused before any work, not after minutes of it."""
        for step in steps:
            if step.name in cls.not_implemented:
                raise StepNotImplemented(cls.name, step.name, cls.not_implemented[step.name])

    @classmethod
    def check_params(cls, steps, params) -> None:
        """Raise StepNotImplemented for the first of `steps` whose own implementation here
        does not follow a parameter that `params` changes from the pinned ones."""
        pinned = _pinned(type(params))
        if params == pinned:  # every benchmark run: nothing to check
            return
        changed = {f.name for f in dataclasses.fields(params)
                   if getattr(params, f.name) != getattr(pinned, f.name)}
        for step in steps:
            follows = getattr(cls.native_steps.get(step.name), "follows", None)
            if follows is None:
                continue
            ignored = sorted((changed & set(step.params)) - set(follows))
            if ignored:
                raise StepNotImplemented(cls.name, step.name, (
                    "its own implementation follows the pinned "
                    + ", ".join(f"{n}={getattr(pinned, n)!r}" for n in ignored)
                    + " only; use an engine that runs the suite's kernels"))

    def tolerance(self, step: str, quantity: str) -> Tolerance:
        """How far this engine's `quantity` (an output of `step`, or a named part of one,
        such as 'catalog.centroid') may lie from the reference's, and why."""
        return SAME_KERNELS[quantity]

    # -- work ---------------------------------------------------------------------------
    def prepare(self, step: Step, state: dict[str, Any], ctx: RunContext) -> None:
        """Get ready to run `step` on this input, outside any timed region: an engine
        that compiles for each input's shapes (TensorFlow's XLA) compiles here. A run
        without it pays that once, as a user's first run does."""

    def map(self, kernel: Callable, partitions: list, shared: dict[str, Any],
            label: str) -> list:
        """kernel(partition, **shared) for every partition, results in partition order.
        `shared` holds the small values every partition needs: broadcast them once."""
        raise NotImplementedError(f"{self.name} runs no Python kernels and has no native "
                                  f"{label}")

    def run_step(self, step: Step, state: dict[str, Any], ctx: RunContext) -> StepRun:
        self.check_implements([step])
        self.check_params([step], ctx.params)
        missing = [key for key in step.inputs if key not in state]
        if missing:
            raise ValueError(f"step {step.name} needs {missing}, which no earlier step made")
        plan = step.plan(state, ctx)
        own = self.native_steps.get(step.name)
        try:
            if own is not None:
                outputs = own(self, step, state, ctx, plan)
            else:
                outputs = plan.combine(self.map(step.kernel, plan.partitions, plan.shared,
                                                label=step.name))
        except EngineUnavailable as exc:
            # it started, then could not go on (its server gone mid-step): lost, not absent
            raise EngineLost(f"{exc} (during {step.name})") from exc
        if set(outputs) != set(step.outputs):
            raise StepContractError(f"{self.name}'s {step.name} made {sorted(outputs)}; "
                                    f"the step declares {sorted(step.outputs)}")
        return StepRun(outputs, len(plan.partitions), plan.bytes_in, plan.voxels)

    def _report(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)
