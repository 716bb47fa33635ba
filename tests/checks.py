"""Each pipeline's way of comparing outputs with the reference, by pipeline name. Both
modules offer assert_outputs_match(outputs, reference_state, keys=None, tolerance=...) and
ALL_OUTPUTS; `assert_match` runs the right one with the engine's own bounds."""
from __future__ import annotations

from pipelines import PIPELINES
from tests import astro_checks, neuro_checks

CHECKS = {"neuro": neuro_checks, "astro": astro_checks}


def tolerances_of(engine, pipeline: str):
    """quantity ('fa', 'catalog.centroid') -> the engine's bound for it, looked up under
    the step that makes it."""
    producer = {out: s.name for s in PIPELINES[pipeline].STEPS for out in s.outputs}
    return lambda quantity: engine.tolerance(producer[quantity.split(".")[0]], quantity)


def assert_match(engine, pipeline: str, outputs: dict, reference_state: dict,
                 keys=None) -> None:
    """`outputs` of `engine` against the reference's; `keys` (default: what came back)
    must all be there."""
    for key in keys or ():
        assert key in outputs, f"{engine.name} returned no {key!r}"
    CHECKS[pipeline].assert_outputs_match(outputs, reference_state, keys,
                                          tolerance=tolerances_of(engine, pipeline))
