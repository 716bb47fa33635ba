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
    # The fields of the pipeline's Params the step reads (an engine's own implementation
    # of the step must follow each of them, or refuse a run that changes one).
    params: tuple[str, ...] = ()


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


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def override(params, assignments, pipeline: str):
    """`params` (a pipeline's frozen Params) with NAME=VALUE assignments applied, each
    checked by name, by the type of the field's pinned value, and by the Params' own
    validation; returns (params, {name: value changed}). Any problem: InputError, one line."""
    import dataclasses
    import math

    from pipelines.errors import InputError

    known = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    changed = {}
    for text in assignments:
        name, sep, raw = text.partition("=")
        name, raw = name.strip().replace("-", "_"), raw.strip()
        if not sep or not name:
            raise InputError(f"--param {text!r}: expected NAME=VALUE")
        if name not in known:
            raise InputError(f"--param {name}: no such parameter of the {pipeline} pipeline; "
                             f"known: {', '.join(known)}")
        pinned = known[name]
        try:
            if isinstance(pinned, bool):
                if raw.lower() not in _TRUE | _FALSE:
                    raise ValueError("expected true or false")
                value = raw.lower() in _TRUE
            elif isinstance(pinned, int):
                value = int(raw)
            elif isinstance(pinned, float):
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError("expected a finite number")
            else:
                value = raw
        except ValueError as exc:
            what = type(pinned).__name__
            raise InputError(f"--param {name}={raw}: not a {what} "
                             f"({str(exc).splitlines()[0]})") from None
        changed[name] = value
    try:
        return dataclasses.replace(params, **changed), changed
    except ValueError as exc:
        raise InputError(f"--param: {exc}") from None


def check_range(params, **rules) -> None:
    """For a Params' __post_init__: rules name -> (test, what it must be); ValueError
    naming the first field that fails, with its value."""
    for name, (ok, must) in rules.items():
        value = getattr(params, name)
        if not ok(value):
            raise ValueError(f"{name}={value!r}: must be {must}")
