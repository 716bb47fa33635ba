"""Every JSON body the Myria engine sends has only keys Myria knows, and the ones it needs.

Myria's Jackson mapper leaves FAIL_ON_UNKNOWN_PROPERTIES on (MyriaJsonMapperProvider), so
a key the server does not know is a 400, and a missing @Required one a 400 too ("... is
missing required fields"): nothing else here would show either before a server does. The
table below is read from the Java encodings of uwescience/myria at SOURCE (paths under
src/edu/washington/escience/myria/); it lists only the types this engine sends: a plan
that uses another fails here until its encoding is added from the Java."""
import json
from pathlib import Path

import pytest

from engines.myria import udf
from engines.myria.engine import FUNCTIONS
from engines.myria.rest import Myria

pytestmark = pytest.mark.correctness
SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots" / "myria"
SOURCE = "uwescience/myria@f6ee17b750a120f629c8202a0d09f594a0821e9a (2017-09-25)"

# An encoding's keys: "!" marks one it needs (@Required, @JsonProperty(required = true),
# or, where marked "no default", a field whose default is unusable), ":X" the encoding
# its value is ("[X]" a list of them).
OPERATOR = "opId! opName "  # api/encoding/OperatorEncoding.java (opType: the type key)
UNARY = OPERATOR + "argChild! "  # UnaryOperatorEncoding.java
CONSUMER = OPERATOR + "argOperatorId! "  # AbstractConsumerEncoding.java
ENCODINGS = {
    # api/encoding/QueryEncoding.java (exactly one of fragments or plan: validateExtra)
    "Query": "rawQuery! logicalRa! language profilingMode ftMode fragments:[Fragment] plan",
    # api/encoding/PlanFragmentEncoding.java
    "Fragment": "operators!:[Operator] workers overrideWorkers fragmentIndex",
    # api/encoding/CreateFunctionEncoding.java
    "Function": "name! outputType! lang! isMultiValued! description binary workers",
    # api/encoding/DatasetEncoding.java
    "Dataset": "relationKey!:RelationKey schema!:Schema workers source!:DataSource delimiter "
               "escape numberOfSkippedLines quote importFromDatabase indexes overwrite "
               "distributeFunction:DistributeFunction",
    # RelationKey.java (its @JsonCreator; no default: all three name the relation)
    "RelationKey": "userName! programName! relationName!",
    # Schema.java (@JsonProperty(value = "columnTypes", required = true))
    "Schema": "columnTypes! columnNames",
    # expression/Expression.java (no default: a column needs a name and a value)
    "Expression": "outputName! javaExpression rootExpressionOperator!:ExpressionOperator",
}
# A polymorphic encoding: its type key (@JsonTypeInfo property) and the members used here.
FAMILIES = {
    "Operator": ("opType", {  # api/encoding/OperatorEncoding.java @JsonSubTypes
        "TableScan": OPERATOR + "relationKey!:RelationKey storedRelationId debroadcast",
        "Apply": UNARY + "emitExpressions!:[Expression] addCounter",
        "SymmetricHashJoin": OPERATOR + "argChild1! argChild2! argColumns1! argColumns2! "
                             "argSelect1! argSelect2! argColumnNames argSetSemanticsLeft "
                             "argSetSemanticsRight argOrder",
        "ShuffleProducer": UNARY + "distributeFunction!:DistributeFunction "
                           "argBufferStateType",  # GenericShuffleProducerEncoding.java
        "ShuffleConsumer": CONSUMER,  # GenericShuffleConsumerEncoding.java
        "BroadcastProducer": UNARY,
        "BroadcastConsumer": CONSUMER,
        "Aggregate": UNARY + "argGroupFields! aggregators!:[Aggregator]",
        "DbInsert": UNARY + "relationKey!:RelationKey argOverwriteTable indexes "
                    "distributeFunction:DistributeFunction connectionInfo"}),
    "ExpressionOperator": ("type", {  # expression/ExpressionOperator.java @JsonSubTypes
        "VARIABLE": "columnIdx!",  # VariableExpression.java (no default: -1)
        "STATE": "columnIdx!",  # StateExpression.java (no default: -1)
        "CONSTANT": "valueType! value!",  # ConstantExpression.java (its @JsonCreator)
        # PyUDFExpression.java, NAryExpression.java (no default: name "")
        "PYUDF": "name! outputType children:[ExpressionOperator]",
        # DownloadBlobExpression.java, UnaryExpression.java (no default: null)
        "DOWNLOADBLOB": "operand!:ExpressionOperator"}),
    "Aggregator": ("type", {  # operator/agg/AggregatorFactory.java @JsonSubTypes
        # UserDefinedAggregatorFactory.java (@JsonProperty(required = true) each)
        "UserDefined": "initializers!:[Expression] updaters!:[Expression] "
                       "emitters!:[Expression]"}),
    "DistributeFunction": ("type", {  # operator/network/distribute/DistributeFunction.java
        "Hash": "indexes!",  # HashDistributeFunction.java (no default: null)
        "Broadcast": ""}),  # BroadcastDistributeFunction.java
    "DataSource": ("dataType", {  # io/DataSource.java @JsonSubTypes
        "Bytes": "bytes!"}),  # io/ByteArraySource.java (required = true)
}


def fields(spec: str) -> dict:
    """key -> (needed, the encoding of its value or None)."""
    found = {}
    for word in spec.split():
        key, _, nested = word.partition(":")
        found[key.rstrip("!")] = (key.endswith("!"), nested or None)
    return found


def problems(value, encoding: str, where: str = "") -> list[str]:
    """What Myria would refuse in `value` read as `encoding`: unknown keys, missing ones."""
    if encoding.startswith("["):
        assert isinstance(value, list), f"{where}: not a list"
        return [p for i, v in enumerate(value) for p in problems(v, encoding[1:-1],
                                                                 f"{where}[{i}]")]
    assert isinstance(value, dict), f"{where}: not an object"
    if encoding in FAMILIES:
        type_key, members = FAMILIES[encoding]
        if value.get(type_key) not in members:
            return [f"{where}: {type_key} {value.get(type_key)!r} is not in the table"]
        known = {type_key: (True, None), **fields(members[value[type_key]])}
        encoding = value[type_key]
    else:
        known = fields(ENCODINGS[encoding])
    found = [f"{where}.{key}: unknown to {encoding}" for key in value if key not in known]
    for key, (needed, nested) in known.items():
        if key not in value:
            found += [f"{where}.{key}: {encoding} needs it"] if needed else []
        elif nested:
            found += problems(value[key], nested, f"{where}.{key}")
    return found


def sent_plans():
    """Every plan the engine sends, as the reviewed snapshots pin them (test_myria_engine
    checks they are what is sent)."""
    for path in sorted(SNAPSHOTS.glob("*.json")):
        for i, body in enumerate(json.loads(path.read_text())):
            if "fragments" in body:
                yield pytest.param(body, id=f"{path.stem}-{i}")


@pytest.mark.parametrize("plan", list(sent_plans()))
def test_every_plan_has_only_keys_myria_knows_and_those_it_needs(plan):
    assert problems(plan, "Query") == []
    assert len(plan["fragments"]) >= 1  # QueryEncoding: fragments, not plan


def test_the_function_and_dataset_bodies_too():
    for step, (output, multivalued) in FUNCTIONS.items():
        body = udf.registration(step, output, multivalued, "/usr/bin/python3",
                                "/srv/image-analytics-bench", "/srv/iab-stage")
        assert problems(body, "Function") == [], step
    client, sent = Myria("http://myria.example:8753"), []
    client.json = lambda method, path, body=None, timeout=-1.0: sent.append(body)
    for broadcast in (False, True):
        client.ingest_csv("iab_t_parts_0", [("imgId", "LONG_TYPE"), ("uri", "STRING_TYPE")],
                          [(0, "file:///s/a.blob")], broadcast=broadcast)
    assert [problems(body, "Dataset") for body in sent] == [[], []]


def test_the_check_finds_an_unknown_key_and_a_missing_one():
    plan = next(iter(sent_plans())).values[0]
    scan = json.loads(json.dumps(plan))
    scan["fragments"][0]["operators"][0]["argChild"] = 0
    del scan["fragments"][0]["operators"][0]["relationKey"]["userName"]
    assert problems(scan, "Query") == [
        ".fragments[0].operators[0].argChild: unknown to TableScan",
        ".fragments[0].operators[0].relationKey.userName: RelationKey needs it"]
    assert problems({**plan, "profiling": True}, "Query") == [".profiling: unknown to Query"]
