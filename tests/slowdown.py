"""A test-only switch that makes one engine slower, for the gate's own tests
(tests/correctness/test_gate.py): loaded with `-p tests.slowdown`, IAB_SLOWDOWN=dask:2 makes
the dask engine run every step twice (its real work, done twice, so the time it reports is
truly about 2x). Never loaded by a normal run."""
from __future__ import annotations

import functools
import os

import engines


def _slowed(run_step, times: int):
    @functools.wraps(run_step)
    def run_step_again(*args, **kwargs):
        for _ in range(times - 1):
            run_step(*args, **kwargs)
        return run_step(*args, **kwargs)
    return run_step_again


def pytest_load_initial_conftests(early_config, parser, args):
    """Before the suite's conftest imports create_engine: wrap it."""
    name, _, times = os.environ.get("IAB_SLOWDOWN", "").partition(":")
    if not name:
        return
    create = engines.create_engine

    @functools.wraps(create)
    def create_slowed(engine_name, *a, **kw):
        engine = create(engine_name, *a, **kw)
        if engine_name == name:
            engine.run_step = _slowed(engine.run_step, int(times or 2))
        return engine

    engines.create_engine = create_slowed
