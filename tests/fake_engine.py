"""A fake engine that exercises the engine seam in a test run of its own
(tests/correctness/test_capabilities.py): loaded with `-p tests.fake_engine`, it registers
`--engine fake`. It is the reference with one step declared unimplemented, one native step
whose answer is off by a bound it declares, one native step that breaks the contract,
and the rest on the suite's kernels; with IAB_FAKE_LOST=STEP, it loses its (pretended)
cluster in that step. Never a stand-in for a real engine's claims."""
from __future__ import annotations

import os

import engines
from engines.base import native
from pipelines.errors import EngineLost
from engines.reference import ReferenceEngine
from engines.tolerances import SAME_KERNELS, Tolerance

# Relative error of the fake's mean b0: within the bound it declares, or, with
# IAB_FAKE_WRONG=1 (a test of what happens to a wrong answer), 10 times over it.
MEAN_B0_ERROR = 1e-4
WRONG = os.environ.get("IAB_FAKE_WRONG") == "1"
LOST_IN = os.environ.get("IAB_FAKE_LOST")  # a step where the fake's cluster goes away


class FakeEngine(ReferenceEngine):
    name = "fake"
    not_implemented = {"denoise": "a gap the fake engine declares"}

    @native("mean_b0")
    def mean_b0_off_by_a_little(self, step, state, ctx, plan):
        outputs = plan.combine(self.map(step.kernel, plan.partitions, plan.shared, step.name))
        return {"mean_b0": outputs["mean_b0"] * (1 + MEAN_B0_ERROR * (20 if WRONG else 1))}

    @native("fit_tensor")
    def fit_without_md(self, step, state, ctx, plan):
        outputs = plan.combine(self.map(step.kernel, plan.partitions, plan.shared, step.name))
        return {"fa": outputs["fa"]}  # md missing: a broken engine

    def run_step(self, step, state, ctx):
        if step.name == LOST_IN:
            raise EngineLost(f"lost the fake's cluster at fake://nowhere during {step.name}")
        return super().run_step(step, state, ctx)

    def tolerance(self, step, quantity):
        if (step, quantity) == ("mean_b0", "mean_b0"):
            return Tolerance("the fake's declared error", rtol=2 * MEAN_B0_ERROR)
        return SAME_KERNELS[quantity]


def pytest_load_initial_conftests(early_config, parser, args):
    """Loaded with -p, before the suite's conftest declares --engine: `--engine fake`.
    (Imported by a test, it registers nothing: a normal run never sees it.)"""
    engines.ENGINES["fake"] = engines.Entry("tests.fake_engine", "FakeEngine", None)
