"""Each pipeline's way of comparing outputs with the reference, by pipeline name. Both
modules offer assert_outputs_match(outputs, reference_state, keys=None) and ALL_OUTPUTS."""
from tests import astro_checks, neuro_checks

CHECKS = {"neuro": neuro_checks, "astro": astro_checks}
