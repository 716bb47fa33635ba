"""Each step compiled twice from one description: the MyriaL program (what a reviewer
reads, pinned in tests/snapshots/myria/*.myl) and the JSON plan that implements it (what
is sent, `POST /query`, pinned beside it as *.json).

Why the engine sends JSON, not MyriaL: Myria's REST server takes JSON plans only; MyriaL
is compiled by raco, in myria-web (`/execute`, `/compile`) or in myria-python (Python 2).
raco's parser knows a Python UDF's name only when the caller passes it
(`Parser.parse(query, udas=[(name, type)])`, which first empties the function table), and
myria-web calls `myrial_parser.parse(query)` with no UDFs: on master (b1c175a, 2017-07-31,
raco b96d314) and on every branch of uwescience/myria-web, so a MyriaL program that calls
a registered Python function fails there with "No such function definition". MyriaL has no
declaration for a Python function either (`def` makes a MyriaL expression function), nor
raco the DOWNLOADBLOB expression (ingest) or the Apply flatmap counter (the block id of
fit_tensor). So the plans are written here, in the operators raco's Myria backend emits
(TableScan, SymmetricHashJoin, Apply, Shuffle/Broadcast producers and consumers, Aggregate
with a UserDefined aggregator, DbInsert), and the MyriaL is the program each implements,
checked by review against raco's grammar (it has never been compiled: no raco runs here).

The keys are the study's: images (subjId, imgId, img), the mask (subjId, mask) stored on
every worker so that it joins as a broadcast, voxel blocks by block id. Work is grouped as
the step's plan groups it: a relation of the plan's parts (imgId, part), broadcast, is
joined in (selecting the images, and keying the group-by). The first argument of every
UDF is the run's key (a constant column: a UDF's arguments can only be columns), which
names the run's arguments in the stage folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .rest import relation_key

BLOB, LONG, STRING = "BLOB_TYPE", "LONG_TYPE", "STRING_TYPE"
NULL_STATE = ("MyriaL has no null; the JSON's null BLOB, like this empty one, "
              "reaches the UDF as 0")


@dataclass
class Program:
    """One step: its MyriaL text and the JSON plan that implements it."""

    myrial: str
    fragments: list = field(default_factory=list)
    _next: int = 0

    def fragment(self) -> "list":
        ops: list = []
        self.fragments.append({"operators": ops})
        return ops

    def op(self, fragment: list, op_type: str, **fields) -> int:
        """Add an operator; returns its id (the ids number the whole plan)."""
        fragment.append({"opId": self._next, "opType": op_type, **fields})
        self._next += 1
        return self._next - 1

    @property
    def plan(self) -> dict:
        """QueryEncoding: the legacy `fragments` form (as Myria's own jsonQueries use)."""
        return {"rawQuery": self.myrial, "logicalRa": "", "language": "MyriaL",
                "fragments": self.fragments}


# -- expressions (api/encoding expression JSON) --------------------------------------------

def var(i: int) -> dict:
    return {"type": "VARIABLE", "columnIdx": i}


def const(value, value_type: str) -> dict:
    return {"type": "CONSTANT", "value": str(value), "valueType": value_type}


def pyudf(name: str, children: list, output: str = BLOB) -> dict:
    return {"type": "PYUDF", "name": name, "outputType": output, "children": children}


def emit(*pairs) -> list:
    return [{"outputName": name, "rootExpressionOperator": expr} for name, expr in pairs]


def scan(program, fragment, name: str) -> int:
    return program.op(fragment, "TableScan", relationKey=relation_key(name))


def join(program, fragment, left: int, right: int, on: tuple[int, int], keep_left,
         keep_right) -> int:
    return program.op(fragment, "SymmetricHashJoin", argChild1=left, argChild2=right,
                      argColumns1=[on[0]], argColumns2=[on[1]], argSelect1=list(keep_left),
                      argSelect2=list(keep_right))


def store(program, fragment, child: int, name: str, broadcast: bool = False) -> int:
    fields = {"argChild": child, "relationKey": relation_key(name),
              "argOverwriteTable": True}
    if broadcast:
        fields["distributeFunction"] = {"type": "Broadcast"}
    return program.op(fragment, "DbInsert", **fields)


def group_by_uda(program, producer_fragment, child: int, groups: list[int], udf: str,
                 args: list[int], out: str, name: str) -> int:
    """Shuffle by the group's columns, then a Python-backed UDA per group: the updater
    gets (state, args...) for every row of the group at once; the state starts as a null
    BLOB and the UDF's answer is the group's value."""
    shuffle = program.op(producer_fragment, "ShuffleProducer", argChild=child,
                         distributeFunction={"type": "Hash", "indexes": groups})
    fragment = program.fragment()
    consumer = program.op(fragment, "ShuffleConsumer", argOperatorId=shuffle)
    uda = {"type": "UserDefined",
           "initializers": emit((out, const("null", BLOB))),
           "updaters": emit((out, pyudf(udf, [{"type": "STATE", "columnIdx": 0}]
                                        + [var(i) for i in args]))),
           "emitters": emit((out, {"type": "STATE", "columnIdx": 0}))}
    agg = program.op(fragment, "Aggregate", argChild=consumer, argGroupFields=groups,
                     aggregators=[uda])
    return store(program, fragment, agg, name)


# -- ingest (JSON only: MyriaL has no DOWNLOADBLOB) ----------------------------------------

def ingest(manifest: str, keys: list[str], blob_column: str, out: str,
           broadcast: bool = False) -> Program:
    """manifest (keys..., uri) -> out (keys..., blob): each worker reads its rows' files
    (`DOWNLOADBLOB`, which stores a null BLOB, and only logs, when it cannot). With
    `broadcast`, every worker stores all of it."""
    program = Program("-- ingest (a JSON plan: MyriaL has no DOWNLOADBLOB)\n"
                      f"-- {out}({', '.join(keys)}, {blob_column}) = for each row of "
                      f"{manifest}({', '.join(keys)}, uri): DOWNLOADBLOB(uri)"
                      + (", stored on every worker" if broadcast else "") + "\n")
    f1 = program.fragment()
    s = scan(program, f1, manifest)
    a = program.op(f1, "Apply", argChild=s, emitExpressions=emit(
        *[(k, var(i)) for i, k in enumerate(keys)],
        (blob_column, {"type": "DOWNLOADBLOB", "operand": var(len(keys))})))
    if broadcast:
        b = program.op(f1, "BroadcastProducer", argChild=a)
        f2 = program.fragment()
        c = program.op(f2, "BroadcastConsumer", argOperatorId=b)
        store(program, f2, c, out, broadcast=True)
    else:
        store(program, f1, a, out)
    return program


# -- the steps ---------------------------------------------------------------------------

def _header(step: str, why: str) -> str:
    return f"-- {step}: {why}\n"


def _uda(name: str, params: str, udf: str) -> str:
    """A MyriaL UDA whose update is the Python function over the whole group."""
    return (f"uda {name}({params}) {{\n"
            f"  [b'' as value];  -- {NULL_STATE}\n"
            f"  [{udf}(value, {params})];\n"
            f"  [value];\n}};\n")


def probe(table: str, udf: str, run: int, out: str) -> Program:
    program = Program(_header("probe", "the workers run the suite's child") + (
        f"P = scan(public:adhoc:{table});  -- (subjId)\n"
        f"T = [from P emit P.subjId, {run} as run];\n"
        f"R = [from T emit T.subjId, {udf}(T.run) as answer];\n"
        f"store(R, public:adhoc:{out});\n"))
    f = program.fragment()
    s = scan(program, f, table)
    a = program.op(f, "Apply", argChild=s, emitExpressions=emit(
        ("subjId", var(0)), ("run", const(run, LONG))))
    u = program.op(f, "Apply", argChild=a, emitExpressions=emit(
        ("subjId", var(0)), ("answer", pyudf(udf, [var(1)]))))
    store(program, f, u, out)
    return program


def grouped(step: str, why: str, series: str, parts: str, udf: str, run: int, out: str,
            mask: str | None = None) -> Program:
    """mean_b0, noise_sigma, denoise: the images of the plan's parts, grouped by part,
    each group through the step's UDA (with the mask joined in, broadcast, for denoise)."""
    with_mask = mask is not None
    args = "T.run, T.imgId, T.img" + (", T.mask" if with_mask else "")
    params = "run, imgId, img" + (", mask" if with_mask else "")
    text = _header(step, why) + (
        f"S = scan(public:adhoc:{series});  -- (subjId, imgId, img)\n"
        f"P = scan(public:adhoc:{parts});  -- (imgId, part), stored broadcast\n")
    if with_mask:
        text += f"M = scan(public:adhoc:{mask});  -- (subjId, mask), stored broadcast\n"
        text += ("T = [from S, P, M where S.imgId = P.imgId and S.subjId = M.subjId\n"
                 f"     emit S.subjId, P.part, {run} as run, S.imgId, S.img, M.mask];\n")
    else:
        text += ("T = [from S, P where S.imgId = P.imgId\n"
                 f"     emit S.subjId, P.part, {run} as run, S.imgId, S.img];\n")
    text += (_uda("Step", params, udf)
             + f"R = [from T emit T.subjId, T.part, Step({args}) as value];\n"
             f"store(R, public:adhoc:{out});\n")
    program = Program(text)
    f1 = program.fragment()
    s, p = scan(program, f1, series), scan(program, f1, parts)
    j = join(program, f1, s, p, (1, 0), (0, 1, 2), (1,))  # subjId, imgId, img, part
    columns = [("subjId", var(0)), ("part", var(3)), ("run", const(run, LONG)),
               ("imgId", var(1)), ("img", var(2))]
    if with_mask:
        m = scan(program, f1, mask)
        j = join(program, f1, j, m, (0, 0), (0, 1, 2, 3), (1,))  # ..., mask
        columns.append(("mask", var(4)))
    a = program.op(f1, "Apply", argChild=j, emitExpressions=emit(*columns))
    group_by_uda(program, f1, a, [0, 1], udf, list(range(2, len(columns))), "value", out)
    return program


def with_run(program, fragment, table: str, keys: list[str], run: int) -> int:
    """scan(table) of (keys..., img), the run's key put in: (keys..., run, img)."""
    s = scan(program, fragment, table)
    return program.op(fragment, "Apply", argChild=s, emitExpressions=emit(
        *[(k, var(i)) for i, k in enumerate(keys)], ("run", const(run, LONG)),
        ("img", var(len(keys)))))


def each(step: str, why: str, table: str, keys: list[str], udf: str, run: int, out: str,
         result: str = "value", key_args: bool = True) -> Program:
    """A UDF per tuple (keys..., img) of `table`: brain_mask, calibrate, detect."""
    given = "".join(f"T.{k}, " for k in keys) if key_args else ""
    program = Program(_header(step, why) + (
        f"V = scan(public:adhoc:{table});  -- ({', '.join(keys)}, img)\n"
        f"T = [from V emit {''.join(f'V.{k}, ' for k in keys)}{run} as run, V.img];\n"
        f"R = [from T emit {''.join(f'T.{k}, ' for k in keys)}{udf}(T.run, {given}T.img)"
        f" as {result}];\n"
        f"store(R, public:adhoc:{out});\n"))
    n = len(keys)
    f = program.fragment()
    a = with_run(program, f, table, keys, run)
    children = [var(n)] + ([var(i) for i in range(n)] if key_args else []) + [var(n + 1)]
    u = program.op(f, "Apply", argChild=a, emitExpressions=emit(
        *[(k, var(i)) for i, k in enumerate(keys)], (result, pyudf(udf, children))))
    store(program, f, u, out)
    return program


def brain_mask(volume: str, udf: str, run: int, out: str) -> Program:
    return each("brain_mask", "one task: the mean b0 volume to its mask", volume,
                ["subjId"], udf, run, out, "mask", key_args=False)


def fit_tensor(series: str, mask: str, split: str, fit: str, run: int, out: str) -> Program:
    """The study's: every volume cut into the plan's voxel blocks (a multivalued UDF; the
    flatmap counter Myria adds is the block id), grouped by (subjId, block), each block
    fitted by a UDA that gets all its volumes."""
    program = Program(_header("fit_tensor", "voxel blocks by block id, fitted per block") + (
        f"S = scan(public:adhoc:{series});  -- (subjId, imgId, img)\n"
        f"M = scan(public:adhoc:{mask});  -- (subjId, mask), stored broadcast\n"
        f"T = [from S, M where S.subjId = M.subjId\n"
        f"     emit S.subjId, S.imgId, {run} as run, S.img, M.mask];\n"
        f"-- {split} is multivalued: a row per block; the JSON Apply's addCounter numbers\n"
        f"-- them (column flatmapid, the block id), which raco does not emit\n"
        f"B = [from T emit T.subjId, T.imgId, T.run, {split}(T.run, T.imgId, T.img, T.mask)"
        f" as blk];\n"
        + _uda("Fit", "run, imgId, blk", fit) + (
            f"R = [from B emit B.subjId, B.flatmapid, Fit(B.run, B.imgId, B.blk) as value];\n"
            f"store(R, public:adhoc:{out});\n")))
    f1 = program.fragment()
    s, m = scan(program, f1, series), scan(program, f1, mask)
    j = join(program, f1, s, m, (0, 0), (0, 1, 2), (1,))  # subjId, imgId, img, mask
    a = program.op(f1, "Apply", argChild=j, emitExpressions=emit(
        ("subjId", var(0)), ("imgId", var(1)), ("run", const(run, LONG)), ("img", var(2)),
        ("mask", var(3))))
    b = program.op(f1, "Apply", argChild=a, addCounter=True, emitExpressions=emit(
        ("subjId", var(0)), ("imgId", var(1)), ("run", var(2)),
        ("blk", pyudf(split, [var(2), var(1), var(3), var(4)]))))
    # (subjId, imgId, run, blk, flatmapid)
    group_by_uda(program, f1, b, [0, 4], fit, [2, 1, 3], "value", out)
    return program


def warp(calexps: str, emit_udf: str, udf: str, run: int, out: str) -> Program:
    """The study's flatMap CCD -> (visit, patch) and group-by (visit, patch): the plan's
    emit, a multivalued LONG UDF, gives each calexp a row per patch it overlaps (the
    calexp's BLOB on each); a UDA per (visit, patch) makes the plan's partition (its make)
    and warps it."""
    program = Program(_header("warp", "calexps keyed (visit, ccd) to warps keyed "
                              "(visit, patch)") + (
        f"C = scan(public:adhoc:{calexps});  -- (visit, ccd, img): each calexp's FITS file\n"
        f"T = [from C emit C.visit, C.ccd, {run} as run, C.img];\n"
        f"-- {emit_udf} is multivalued (LONG): the plan's emit of the CCD, a row per patch\n"
        f"E = [from T emit T.visit, T.ccd, T.run, T.img, {emit_udf}(T.run, T.visit, T.ccd)"
        f" as patch];\n"
        + _uda("Warp", "run, visit, ccd, patch, img", udf) + (
            "R = [from E emit E.visit, E.patch, Warp(E.run, E.visit, E.ccd, E.patch, E.img)"
            " as value];\n"
            f"store(R, public:adhoc:{out});\n")))
    f1 = program.fragment()
    a = with_run(program, f1, calexps, ["visit", "ccd"], run)
    e = program.op(f1, "Apply", argChild=a, emitExpressions=emit(
        ("visit", var(0)), ("ccd", var(1)), ("run", var(2)), ("img", var(3)),
        ("patch", pyudf(emit_udf, [var(2), var(0), var(1)], LONG))))
    # (visit, ccd, run, img, patch)
    group_by_uda(program, f1, e, [0, 4], udf, [2, 0, 1, 4, 3], "value", out)
    return program


def coadd(warps: str, udf: str, run: int, out: str) -> Program:
    """Warps keyed (visit, patch) grouped by patch, a UDA per patch making the plan's
    partition (its emit and make) and co-adding it."""
    program = Program(_header("coadd", "warps keyed (visit, patch) to coadds keyed patch") + (
        f"W = scan(public:adhoc:{warps});  -- (visit, patch, img): each warp's FITS file\n"
        f"T = [from W emit W.visit, W.patch, {run} as run, W.img];\n"
        + _uda("Coadd", "run, visit, patch, img", udf) + (
            "R = [from T emit T.patch, Coadd(T.run, T.visit, T.patch, T.img) as value];\n"
            f"store(R, public:adhoc:{out});\n")))
    f1 = program.fragment()
    a = with_run(program, f1, warps, ["visit", "patch"], run)
    group_by_uda(program, f1, a, [1], udf, [2, 0, 1, 3], "value", out)
    return program
