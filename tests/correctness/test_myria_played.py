"""The Myria engine's steps, both pipelines, without a Myria server (none can be installed
here): each step's own code, its JSON plan played as Myria's operators say on one worker
(TableScan, Apply with DOWNLOADBLOB and Python UDFs, multivalued ones giving a row per
value and the flatmap counter, SymmetricHashJoin (the neuroscience plans' joins of the
parts and the mask), the producers and consumers, Aggregate with a Python UDA over each
group's rows, DbInsert), its UDFs the registered pickles running the real child, as a
worker calls them (BLOBs unpickled in, pickled out), against the reference on
phantom-tiny and survey-tiny, as every engine is compared. What this plays is this file's
reading of Myria's operators, not Myria: nothing here is claimed as run against a
server."""
import base64
import pickle
import sys
from itertools import groupby, product
from pathlib import Path

import numpy as np
import pytest

from engines.myria import blob, udf
from engines.myria.engine import FUNCTIONS, MyriaEngine
from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import astro, neuro
from pipelines.steps import RunContext
from tests.checks import assert_match

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def survey():
    return reference_run(load_dataset("survey-tiny").inputs[0])


@pytest.fixture(scope="module")
def phantom():
    return reference_run(load_dataset("phantom-tiny").inputs[0])


class PlayedMyria:
    """Relations as lists of rows (BLOBs as stored: pickled byte strings) and the plans'
    operators evaluated in order."""

    def __init__(self):
        self.tables: dict[str, tuple[list, list]] = {}  # name -> (columns, rows)
        self.functions = {}

    def register(self, body):
        function = pickle.loads(base64.urlsafe_b64decode(body["binary"]))
        self.functions[body["name"]] = (function, body["isMultiValued"])

    def ingest_csv(self, name, columns, rows, broadcast=False):
        self.tables[name] = ([c for c, _ in columns], [tuple(r) for r in rows])

    def rows(self, name):
        columns, rows = self.tables[name]
        for row in rows:
            yield {c: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                   for c, v in zip(columns, row)}

    def run(self, plan):
        ops = {op["opId"]: op for f in plan["fragments"] for op in f["operators"]}
        for op in ops.values():
            if op["opType"] == "DbInsert":
                self.tables[op["relationKey"]["relationName"]] = self._eval(ops, op["argChild"])

    def _call(self, expr, row, state=None):
        """A UDF as the worker calls it: BLOB arguments unpickled (a null one as 0)."""
        function, multivalued = self.functions[expr["name"]]
        args = []
        for child in expr["children"]:
            value = state if child["type"] == "STATE" else row[child["columnIdx"]]
            args.append(0 if value is None else
                        pickle.loads(value, encoding="bytes") if isinstance(value, bytes)
                        else value)
        return function, multivalued, args

    def _value(self, expr, row) -> list:
        """An expression's values for one row (several for a multivalued UDF)."""
        kind = expr["type"]
        if kind == "VARIABLE":
            return [row[expr["columnIdx"]]]
        if kind == "CONSTANT":
            return [None if expr["value"] == "null" else int(expr["value"])]
        if kind == "DOWNLOADBLOB":
            return [Path(row[expr["operand"]["columnIdx"]].removeprefix("file://"))
                    .read_bytes()]
        function, multivalued, args = self._call(expr, row)
        out = function([args])
        return [_stored(v) for v in (out if multivalued else [out])]

    def _eval(self, ops, at) -> tuple[list, list]:
        op = ops[at]
        kind = op["opType"]
        if kind == "TableScan":
            return self.tables[op["relationKey"]["relationName"]]
        if kind.endswith("Consumer"):
            return self._eval(ops, ops[op["argOperatorId"]]["argChild"])
        if kind == "Apply":
            _, rows = self._eval(ops, op["argChild"])
            exprs = op["emitExpressions"]
            out = []
            for row in rows:
                values = [self._value(e["rootExpressionOperator"], row) for e in exprs]
                counted = [list(r) for r in product(*values)]
                out += [tuple(r) + ((n,) if op.get("addCounter") else ())
                        for n, r in enumerate(counted)]
            # the counter's column is MyriaConstants.FLATMAP_COLUMN_NAME (Apply.java)
            return ([e["outputName"] for e in exprs]
                    + (["flatmapid"] if op.get("addCounter") else []), out)
        if kind == "SymmetricHashJoin":
            (lc, left), (rc, right) = (self._eval(ops, op["argChild1"]),
                                       self._eval(ops, op["argChild2"]))
            (a,), (b,) = op["argColumns1"], op["argColumns2"]
            return ([lc[i] for i in op["argSelect1"]] + [rc[i] for i in op["argSelect2"]],
                    [tuple(x[i] for i in op["argSelect1"]) + tuple(y[i] for i in
                                                                   op["argSelect2"])
                     for x in left for y in right if x[a] == y[b]])
        if kind == "Aggregate":
            columns, rows = self._eval(ops, op["argChild"])
            keys = op["argGroupFields"]
            (uda,) = op["aggregators"]
            (update,) = uda["updaters"]
            expr = update["rootExpressionOperator"]
            out = []

            def group_key(row):
                return tuple(row[k] for k in keys)

            for key, group in groupby(sorted(rows, key=group_key), key=group_key):
                group = list(group)[::-1]  # a group's rows come in no particular order
                function = self._call(expr, group[0])[0]
                out.append(key + (_stored(function([self._call(expr, r)[2]
                                                    for r in group])),))
            return [columns[k] for k in keys] + [update["outputName"]], out
        raise AssertionError(f"operator not played here: {kind}")


def _stored(value):
    """A UDF's answer as Myria stores it: a BLOB pickled (protocol 2), a LONG as is."""
    return blob.pickled(value) if isinstance(value, bytes) else value


def played_engine(tmp_path) -> MyriaEngine:
    engine = MyriaEngine(url="http://myria.example:8753", stage=str(tmp_path / "stage"),
                         python=sys.executable, suite=str(ROOT))
    engine.rest, engine.token = PlayedMyria(), "test"
    Path(engine._files()).mkdir(parents=True)
    for step, (output, multivalued) in FUNCTIONS.items():
        engine.rest.register(udf.registration(step, output, multivalued, engine.python,
                                              engine.suite, engine.stage))
    return engine


# phantom-tiny (12 volumes, b0s 0 and 6) cut so that every group-by has several groups
# and groups of several rows: a b0 per mean_b0 part, 5 volumes per noise_sigma and
# denoise part, 8 voxel blocks
PARTITIONING = {"neuro": neuro.NeuroPartitioning(volumes_per_task=5, b0_per_task=1),
                "astro": astro.AstroPartitioning()}
STEPS = [("neuro", s.name) for s in neuro.STEPS] + [("astro", s.name) for s in astro.STEPS]


@pytest.mark.parametrize("pipeline, step", STEPS)
def test_each_step_played_as_myria_is_the_reference(pipeline, step, request, tmp_path):
    module = {"neuro": neuro, "astro": astro}[pipeline]
    reference = request.getfixturevalue("phantom" if pipeline == "neuro" else "survey")
    ctx = RunContext(tmp_path / "run", module.Params(), PARTITIONING[pipeline])
    plan = module.STEP_BY_NAME[step].plan(reference.state_before(step), ctx)
    assert len(plan.partitions) > 1 or step in ("brain_mask", "detect")  # regrouped
    engine = played_engine(tmp_path)
    try:
        outputs = engine.run_step(module.STEP_BY_NAME[step], reference.state_before(step),
                                  ctx).outputs
    finally:
        engine.rest.functions.clear()  # the children end with their functions
    assert_match(engine, pipeline, outputs, reference.state,
                 keys=list(module.STEP_BY_NAME[step].outputs))
    if step == "calibrate":
        assert len(outputs["saturated"]) and outputs["calexps"]  # something was compared
    if step == "detect":
        assert len(outputs["catalog"]) > 0
    for key in ("calexps", "warps", "coadds"):  # the kernels' own files, byte for byte
        for k, path in outputs.get(key, {}).items():
            assert Path(path).read_bytes() == Path(reference.state[key][k]).read_bytes(), k


def test_warp_regroups_as_the_plan_does(survey):
    """survey-tiny has CCDs overlapping several patches and (visit, patch) groups of
    several CCDs: the flatMap and the group-by are both exercised."""
    plan = astro.WARP.plan(survey.state_before("warp"), RunContext(
        Path("."), astro.AstroParams(), astro.AstroPartitioning()))
    assert max(len(c.patches) for c in survey.state["ccds"]) > 1
    assert max(len(calexps) for _, _, calexps in plan.partitions) > 1
    assert len(np.unique([v for v, _, _ in plan.partitions])) > 1
