"""The engine registry: an engine whose package is missing, or whose name is wrong, is
refused with one line that says how to fix it (the fixtures turn that into a skip)."""
import pytest

import engines
from engines import create_engine, engine_class
from pipelines.errors import EngineUnavailable

pytestmark = pytest.mark.correctness


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "ghost",
                        engines.Entry("engines.ghost_engine_module", "GhostEngine", "ghost"))
    with pytest.raises(EngineUnavailable,
                       match=r"ghost: engines.ghost_engine_module is not installed "
                             r"\(pip install '.\[ghost\]'\)"):
        engine_class("ghost")


def test_unknown_engine():
    with pytest.raises(EngineUnavailable, match="unknown engine 'nope'; known: reference"):
        create_engine("nope")


@pytest.mark.parametrize("name", list(engines.ENGINES))
def test_every_engine_describes_itself(name):
    try:
        cls = engine_class(name)
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    facts = cls(workers=2).describe()
    assert facts["engine"] == name and facts["workers"] >= 1
    assert {"python", "numpy", "dipy"} <= set(facts["versions"])
