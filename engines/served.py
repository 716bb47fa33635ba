"""What the engines that run on a server the user gives (SciDB, Myria) share: the
arguments their children get, the check that every part of a step was answered, and the
kernel's output files they bring back into the run folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .base import StepContractError


class AnswerMissing(StepContractError):
    """A step came back from the server without the answer for some of its parts: the
    engine's own failure (a lost server is EngineLost), never a result with a gap."""


def step_args(ctx, state: dict | None = None, **more) -> dict:
    """The JSON arguments a server-side child runs a step with: the run's parameters, the
    sky map of an astronomy run, and `more`."""
    args = {"params": dataclasses.asdict(ctx.params)}
    if state is not None and "skymap" in state:
        args["skymap"] = dataclasses.asdict(state["skymap"])
    return {**args, **more}


def every_part(got: dict, count: int, where: str, step: str) -> list:
    """`got` (part number -> answer) as a list of `count` answers, or AnswerMissing
    naming the first part the server did not answer."""
    missing = sorted(set(range(count)) - set(got))
    if missing:
        raise AnswerMissing(f"{where}: {step} returned no answer for part {missing[0]} "
                            f"({len(missing)} of {count} missing)")
    return [got[i] for i in range(count)]


def keep_file(workdir, name: str | None, data: bytes) -> str | None:
    """A kernel's output file as a server's child sent it, written where the reference
    writes it, under the run folder; a name the server sent that would leave the run
    folder (absolute, or through '..') is refused."""
    if name is None:
        return None
    root = Path(workdir).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise AnswerMissing(f"the server named an output file outside the run folder: "
                            f"{name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)
