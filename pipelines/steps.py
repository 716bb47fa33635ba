"""The one abstraction every pipeline is written in, and every engine executes.

A `Step` is planned on the client (cheap, metadata only) into a `Plan`: a list of
partitions, the small values every partition needs (`shared`, which engines broadcast),
and a `combine` that turns the per-partition results into the step's outputs. The
per-partition `kernel` is a plain module-level function, so engines that run Python
(reference, Dask, Spark, Myria) ship it as it is; an engine that cannot (TensorFlow), or
that has a better way for a step (Spark's shuffle), gives its own implementation of that
step, fed the same plan (`engines.base.native`).

Large arrays move between steps as files in the run directory (NIfTI here), read and
written by the workers themselves; only small values (a mask, one sigma per volume, the
FA/MD maps) travel through the client.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class RunContext:
    """Where a run writes its large intermediate files, and how it partitions work."""

    workdir: Path
    params: Any  # the pipeline's pinned parameters (a frozen dataclass)
    partitioning: Any  # the pipeline's partitioning (a frozen dataclass)


@dataclass(frozen=True)
class Shuffle:
    """How a step regroups records by key: the study's flatMap and group-by (CCD ->
    (visit, patch) to warp; (visit, patch) -> patch to co-add). `emit(record)` gives
    (key, value) pairs; each group becomes the partition `make(key, values)`, its values
    in record order. `groups()` does it on the client, for the plan's `partitions`; an
    engine with a native shuffle (Spark's groupByKey) runs it in its workers instead.
    Either way the step's `combine` sees the same partitions' results."""

    records: list
    emit: Callable[[Any], list]
    make: Callable[[Any, list], Any]

    def groups(self) -> list:
        """The partitions, groups with the most values first (then by key), so that no
        worker is left finishing a big group alone."""
        grouped: dict[Any, list] = {}
        for record in self.records:
            for key, value in self.emit(record):
                grouped.setdefault(key, []).append(value)
        order = sorted(grouped, key=lambda k: (-len(grouped[k]), k))
        return [self.make(key, grouped[key]) for key in order]


@dataclass
class Plan:
    partitions: list
    shared: dict[str, Any]
    combine: Callable[[list], dict[str, Any]]
    bytes_in: int = 0  # bytes the step reads, for throughput figures
    voxels: int = 0  # image elements the step processes (voxels x volumes; pixels)
    shuffle: Shuffle | None = None  # how `partitions` were grouped, for a native shuffle


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[str, ...]  # state keys the step reads
    outputs: tuple[str, ...]  # state keys the step produces
    plan: Callable[[dict, RunContext], Plan]
    kernel: Callable[..., Any]  # kernel(partition, **shared) -> result, runs on workers


@dataclass
class StepRun:
    """What an engine returns for one step: its outputs and the shape of the work done."""

    outputs: dict[str, Any]
    partitions: int
    bytes_in: int
    voxels: int
    extra: dict[str, Any] = field(default_factory=dict)


def run_steps(steps, engine, state: dict, ctx: RunContext,
              on_step: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Run `steps` in order on `engine`, each fed the outputs of the ones before it;
    `on_step(name, seconds)` hears of each step as it ends."""
    state = dict(state)
    for step in steps:
        start = time.perf_counter()
        state.update(engine.run_step(step, state, ctx).outputs)
        if on_step:
            on_step(step.name, time.perf_counter() - start)
    return state
