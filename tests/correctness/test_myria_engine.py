"""The Myria engine without a Myria server (none can be installed here): the UDFs it
registers, called as a worker calls them (the pickle loaded, tuples in, BLOBs out), answer
what the reference computes; what it sends for each step (the MyriaL programs and the
JSON plans that implement them, the relations it ingests) is pinned by reviewed
snapshots; without --myria-url it is skipped with the reason. (With a server, every other
engine test runs on it unchanged.)"""
import base64
import json
import os
import pickle
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engines.myria import blob, udf
from engines.myria.engine import MyriaEngine
from engines.served import AnswerMissing
from engines.tolerances import SAME_KERNELS
from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from pipelines import astro, neuro, nifti
from pipelines.errors import EngineUnavailable
from pipelines.steps import RunContext

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = ROOT / "tests" / "snapshots" / "myria"


@pytest.fixture(scope="module")
def run():
    return reference_run(load_dataset("phantom-tiny").inputs[0])


@pytest.fixture(scope="module")
def survey():
    return reference_run(load_dataset("survey-tiny").inputs[0])


def params():
    import dataclasses

    return dataclasses.asdict(neuro.NeuroParams())


def as_worker(step, stage, args, multivalued=False):
    """The UDF as a Myria worker holds it (loaded from the registration's pickle), and a
    run key whose arguments are in the stage folder."""
    key = abs(hash((step, json.dumps(args)))) % 10 ** 9
    (stage / f"iab-{key}.json").write_text(json.dumps(args))
    body = udf.registration(step, "BLOB_TYPE", multivalued, sys.executable, str(ROOT),
                            str(stage))
    return pickle.loads(base64.urlsafe_b64decode(body["binary"])), key


def arrived(*arrays):
    """A BLOB argument as the worker hands it over: unpickled, a byte string."""
    return pickle.loads(blob.encode(*arrays), encoding="bytes")


def answer(data):
    """A BLOB result as it comes back: pickled by the worker (cPickle.dumps(str, 2) writes
    BINSTRING, as blob.pickled does; test_myria_protocol checks it with a real cPickle)."""
    assert isinstance(data, bytes)
    return blob.decode(blob.pickled(data))


def within(got, want, name):
    bound = SAME_KERNELS[name]
    return (np.abs(got - want) <= bound.bound(np.abs(want), np.abs(want).max())).all()


def test_mean_b0_and_brain_mask_udfs_are_the_reference(run, tmp_path):
    dwi, state = run.source.dwi, run.state
    ctx = RunContext(tmp_path, neuro.NeuroParams(), neuro.NeuroPartitioning(b0_per_task=2))
    plan = neuro.plan_mean_b0(run.state_before("mean_b0"), ctx)
    f, key = as_worker("mean_b0", tmp_path, {})
    sums = []
    for _, group in plan.partitions:  # a group's rows, in no particular order
        rows = [[0, key, k, arrived(nifti.read_volume(dwi, k))] for k in reversed(group)]
        sums.append(answer(f(rows))[0])
    assert np.array_equal(plan.combine(sums)["mean_b0"], state["mean_b0"])
    f, key = as_worker("brain_mask", tmp_path, {"params": params()})
    (mask,) = answer(f([[key, arrived(state["mean_b0"])]]))
    assert mask.dtype == bool and np.array_equal(mask, state["mask"])


def test_noise_sigma_and_denoise_udfs_are_the_reference(run, tmp_path):
    dwi, state = run.source.dwi, run.state
    volumes = [5, 0]  # a diffusion-weighted volume and a b0, one group, out of order
    data = {k: nifti.read_volume(dwi, k) for k in volumes}
    f, key = as_worker("noise_sigma", tmp_path, {"params": params()})
    (sigma,) = answer(f([[0, key, k, arrived(data[k])] for k in volumes]))
    assert sigma.tolist() == pytest.approx([state["sigma"][0], state["sigma"][5]], rel=1e-12)
    f, key = as_worker("denoise", tmp_path, {"params": params(),
                                             "sigma": [float(s) for s in state["sigma"]]})
    (stacked,) = answer(f([[0, key, k, arrived(data[k]), arrived(state["mask"])]
                           for k in volumes]))
    want = np.asarray(nib.load(state["denoised"]).dataobj)
    assert stacked.dtype == np.float32 and stacked.shape == (2,) + state["mask"].shape
    for got, k in zip(stacked, sorted(volumes)):
        assert within(got, want[..., k], "denoised"), SAME_KERNELS["denoised"].why


def test_split_and_fit_udfs_are_the_reference(run, tmp_path):
    state = run.state
    denoised = np.asarray(nib.load(state["denoised"]).dataobj)
    ctx = RunContext(tmp_path, neuro.NeuroParams(), neuro.NeuroPartitioning(block=(8, 8, 8)))
    blocks = neuro.plan_fit_tensor(run.state_before("fit_tensor"), ctx).partitions[:2]
    args = {"params": params(), "bvals": np.asarray(state["bvals"]).tolist(),
            "bvecs": np.asarray(state["bvecs"]).tolist(),
            "blocks": [[[s.start, s.stop] for s in b] for b in blocks]}
    split, key = as_worker("split_blocks", tmp_path, args, multivalued=True)
    fit, _ = as_worker("fit_tensor", tmp_path, args)
    per_block = [[] for _ in blocks]
    for k in range(denoised.shape[3]):
        pieces = split([[key, k, arrived(denoised[..., k].astype(np.float32)),
                         arrived(state["mask"])]])
        assert len(pieces) == len(blocks)  # the flatmap counter: the block id
        for block_id, piece in enumerate(pieces):
            per_block[block_id].append([0, key, k, piece])  # the BLOB, stored and sent on
    for block, rows in zip(blocks, per_block):
        fa, md = answer(fit(rows[::-1]))
        assert within(fa, state["fa"][block], "fa") and within(md, state["md"][block], "md")


# -- what the engine sends: snapshots ---------------------------------------------------

class RecordingRest:
    """Records what the engine sends and answers as the server does, with no data: the
    programs and plans themselves are what is pinned (no result is claimed)."""

    def __init__(self):
        self.sent = []

    def ingest_csv(self, name, columns, rows, broadcast=False):
        self.sent.append(("csv", name, columns, [list(r) for r in rows], broadcast))

    def run(self, plan):
        self.sent.append(("plan", plan))

    def rows(self, name):
        return iter(())


def sent_for(pipeline, step_name, run, tmp_path):
    engine = MyriaEngine(url="http://myria.example:8753", stage="/srv/iab-stage",
                         python="/usr/bin/python3", suite="/srv/image-analytics-bench")
    engine.rest, engine.token, engine.run_base = RecordingRest(), "snap", 1
    written = []
    engine._write = lambda path, data: written.append((path, len(data)))
    step = pipeline.STEP_BY_NAME[step_name]
    state = run.state_before(step_name)
    ctx = RunContext(tmp_path, pipeline.Params(), pipeline.Partitioning())
    with pytest.raises(AnswerMissing):
        # no data came back: no part, no mask; what was sent is what is pinned
        engine.native_steps[step_name](engine, step, state, ctx, step.plan(state, ctx))
    myrial_text, plans = [], []
    for entry in engine.rest.sent:
        if entry[0] == "plan":
            myrial_text.append(entry[1]["rawQuery"])
            plans.append(entry[1])
        else:
            _, name, columns, rows, broadcast = entry
            shown = rows if len(rows) <= 4 else rows[:3] + [["...", f"{len(rows)} rows"]]
            plans.append({"POST /dataset": name, "columns": columns, "rows": shown,
                          "broadcast": broadcast})
    files = f"-- stage files written: {len(written)}\n"
    return files + "\n".join(myrial_text), json.dumps(plans, indent=1) + "\n"


STEPS = [(neuro, s.name) for s in neuro.STEPS] + [(astro, s.name) for s in astro.STEPS]


def run_of(pipeline, request):
    return request.getfixturevalue("run" if pipeline is neuro else "survey")


@pytest.mark.parametrize("pipeline, step", STEPS)
def test_compiled_programs_are_the_reviewed_snapshots(pipeline, step, request, tmp_path):
    """IAB_UPDATE_SNAPSHOTS=1 rewrites them; a change is then reviewed in the diff."""
    for got, path in zip(sent_for(pipeline, step, run_of(pipeline, request), tmp_path),
                         (SNAPSHOTS / f"{step}.myl", SNAPSHOTS / f"{step}.json")):
        if os.environ.get("IAB_UPDATE_SNAPSHOTS"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(got)
        assert path.exists(), f"no snapshot {path}: IAB_UPDATE_SNAPSHOTS=1 makes it"
        assert got == path.read_text()


@pytest.mark.parametrize("pipeline, step", STEPS)
def test_every_plan_operator_is_wired_to_one_that_exists(pipeline, step, request, tmp_path):
    """Each child and consumer id of a plan names an operator of it, each fragment ends
    in a DbInsert or a producer, and every PYUDF is one the engine registers."""
    from engines.myria.engine import FUNCTIONS

    names = {udf.function_name(s, "/usr/bin/python3", "/srv/image-analytics-bench",
                               "/srv/iab-stage") for s in FUNCTIONS}
    for plan in json.loads(sent_for(pipeline, step, run_of(pipeline, request), tmp_path)[1]):
        if "fragments" not in plan:
            continue
        ops = {op["opId"]: op for f in plan["fragments"] for op in f["operators"]}
        for op in ops.values():
            for ref in ("argChild", "argChild1", "argChild2", "argOperatorId"):
                assert op.get(ref, 0) in ops
            text = json.dumps(op)
            for name in {w.split('"')[0] for w in text.split('"name": "')[1:]}:
                assert name in names, name
        for fragment in plan["fragments"]:
            assert fragment["operators"][-1]["opType"] in (
                "DbInsert", "ShuffleProducer", "BroadcastProducer")


def test_close_deletes_every_relation_it_can(tmp_path):
    from engines.myria.rest import MyriaError

    class Deleting:
        def __init__(self):
            self.deleted = []

        def delete(self, name):
            self.deleted.append(name)
            if name == "never_made":
                raise MyriaError("http://m", "DELETE", 404, "Dataset was not found")

    engine = MyriaEngine(url="http://myria.example:8753", stage=str(tmp_path))
    engine.rest = rest = Deleting()
    engine.relations = ["a", "never_made", "b"]
    key = engine._run({})
    Path(engine._files()).mkdir()
    engine.close()
    assert rest.deleted == ["b", "never_made", "a"] and engine.relations == []
    assert not Path(engine._args_file(key)).exists() and not Path(engine._files()).exists()


def test_without_a_server_the_engine_says_how_to_give_one():
    with pytest.raises(EngineUnavailable, match=r"^no Myria server given: --myria-url "):
        MyriaEngine().start()
    assert all(MyriaEngine.capability(s.name) == "native"
               for s in neuro.STEPS + astro.STEPS)


def test_an_unreachable_server_is_one_line(tmp_path):
    with pytest.raises(EngineUnavailable, match=r"^Myria at http://127.0.0.1:9: "
                                                r"unreachable or connection lost"):
        MyriaEngine(url="http://127.0.0.1:9", stage=str(tmp_path)).start()


def test_an_answer_naming_a_file_outside_the_run_folder_is_refused(tmp_path):
    """The child names its output file; a name that leaves the run folder is not written
    (engines.served.keep_file)."""
    meta = json.dumps({"key": [0], "name": "../escaped.fits", "facts": {}}).encode()
    value = blob.encode(np.frombuffer(meta, np.uint8), np.frombuffer(b"SIMPLE", np.uint8))

    class Answering:
        def rows(self, name):
            yield {"value": base64.b64encode(value).decode()}

    engine = MyriaEngine(url="http://myria.example:8753", stage=str(tmp_path))
    engine.rest = Answering()
    ctx = RunContext(tmp_path / "run", astro.AstroParams(), astro.AstroPartitioning())
    with pytest.raises(AnswerMissing, match="outside the run folder: '../escaped.fits'"):
        engine._answers("out", [(0,)], "coadd", ctx)
    assert not (tmp_path / "escaped.fits").exists()
