"""The SciDB engine without a SciDB server (none can be installed here): the program its
stream() runs, fed the Feather messages the stream plugin sends and its answers read as
the plugin reads them (Paradigm4/stream 19.11 src/FeatherInterface.cpp), run by the
engine's own step code with the arguments it passes, answers what the reference computes;
the AFL it sends for each step is pinned by a reviewed snapshot; without --scidb-url it is
skipped with the reason. (With a server, every other engine test runs on it unchanged.)"""
import dataclasses
import os
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engines.scidb import afl, binary
from engines.scidb.engine import SciDBEngine
from engines.scidb.stream_child import ANSWERS, encode_args
from engines.served import AnswerMissing
from fixtures.datasets import load_dataset
from fixtures.reference import reference_run
from tests import neuro_checks
from tests.astro_checks import assert_outputs_match
from pipelines import astro, neuro
from pipelines.errors import EngineUnavailable, InputError
from pipelines.steps import RunContext

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = ROOT / "tests" / "snapshots" / "scidb"


@pytest.fixture(scope="module")
def run():
    return reference_run(load_dataset("phantom-tiny").inputs[0])


def sends(*columns) -> dict[str, np.ndarray]:
    """A chunk's attributes as the compiled query hands them to stream(): coordinates
    int64, values cast to double (afl.SENT_AS), named as attributes are."""
    return {f"a{i}": np.asarray(c, dtype=np.float64 if np.asarray(c).dtype.kind == "f"
                                else np.int64) for i, c in enumerate(columns)}


def as_scidb_sends(cells: np.ndarray, float_columns) -> dict[str, np.ndarray]:
    return sends(*(cells[:, i] if i in float_columns else cells[:, i].astype(np.int64)
                   for i in range(cells.shape[1])))


def joined(chunks: list[dict]) -> dict[str, np.ndarray]:
    """One chunk of several chunks' cells."""
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def feather_v1(table) -> bytes:
    import pyarrow as pa
    from pyarrow import feather

    sink = pa.BufferOutputStream()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        feather.write_feather(table, sink, version=1)
    return sink.getvalue().to_pybytes()


def plugin_sends(chunks: list[dict]) -> bytes:
    """What writeFeather and writeFinalFeather write: per non-empty chunk its uint64
    byte count (x86: little-endian) and a Feather V1 table, a column per attribute (one
    Arrow chunk each); at the end a count of 0."""
    import pyarrow as pa

    out = b""
    for chunk in chunks:
        data = feather_v1(pa.table(chunk))
        out += struct.pack("<Q", len(data)) + data
    return out + struct.pack("<Q", 0)


def plugin_reads(out: bytes, answer) -> list[dict | None]:
    """The child's answers as readFeather reads them: a count, 0 for no data; else a
    Feather V1 table of exactly the declared columns, each read as its declared Arrow
    type (the plugin does not check: a wrong one is garbage), and nothing after the
    last answer. Returns each answer's columns (None: no data)."""
    import pyarrow as pa
    from pyarrow import feather

    arrow = {"int64": pa.int64(), "double": pa.float64(), "binary": pa.binary(),
             "string": pa.string()}
    answers, at = [], 0
    while at < len(out):
        size = struct.unpack("<Q", out[at:at + 8])[0]
        data, at = out[at + 8:at + 8 + size], at + 8 + size
        assert len(data) == size, "an answer cut short"
        if not size:
            answers.append(None)
            continue
        assert data[:4] == data[-4:] == b"FEA1", "not Feather V1: Arrow 0.16 reads V1 only"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            table = feather.read_table(pa.BufferReader(data))
        assert table.schema.names == [n for n, _ in answer]
        assert table.schema.types == [arrow[t] for _, t in answer]
        assert all(c.num_chunks == 1 for c in table.columns)
        answers.append({n: np.array(c.to_pylist(), dtype=object) if t in ("binary", "string")
                        else c.to_numpy() for (n, t), c in zip(answer, table.columns)})
    return answers


def exchange(step: str, args: dict, chunks: list[dict]) -> dict[str, np.ndarray]:
    """The stream child as SciDB runs it: a Feather message per chunk, the end marker;
    one answer each, the last with no data. Returns the answers' columns, joined, as
    the engine reads them back (ANSWERS)."""
    proc = subprocess.run([sys.executable, "-u", "-m", "engines.scidb.stream_child", step,
                           encode_args(args)], input=plugin_sends(chunks), cwd=ROOT,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:].decode(errors="replace")
    answers = plugin_reads(proc.stdout, ANSWERS[step])
    assert len(answers) == len(chunks) + 1 and answers[-1] is None  # one per message
    found = [a for a in answers if a is not None]
    empty = {n: np.array([], dtype=object if t == "binary" else t) for n, t in ANSWERS[step]}
    return joined(found) if found else empty


def volume_cells(volume: np.ndarray, k: int | None = None) -> np.ndarray:
    xyz = np.indices(volume.shape).reshape(3, -1).T
    values = volume.reshape(-1)[:, None]
    if k is None:
        return np.hstack([xyz, values])
    return np.hstack([np.full((len(xyz), 1), k), xyz, values])


def neuro_step(run, step_name, tmp_path, chunks) -> dict:
    """The engine's own neuroscience step on phantom-tiny with the real child, fed
    `chunks(args)`: the arguments it passes are the ones the child runs with."""
    return run_with_child(recording_engine(), neuro, step_name, run.state_before(step_name),
                          RunContext(tmp_path, neuro.NeuroParams(),
                                     neuro.NeuroPartitioning()), chunks)


def test_child_brain_mask_is_the_reference(run, tmp_path):
    mean_b0 = run.state["mean_b0"]
    outputs = neuro_step(run, "brain_mask", tmp_path,
                         lambda args: [as_scidb_sends(volume_cells(mean_b0), {3})])
    assert np.array_equal(outputs["mask"], run.state["mask"])


def test_child_noise_sigma_and_denoise_are_the_reference(run, tmp_path):
    """A volume per chunk, as the series is stored."""
    dwi = run.source.dwi
    volumes = [neuro.nifti.read_volume(dwi, k) for k in range(len(run.state["sigma"]))]
    outputs = neuro_step(run, "noise_sigma", tmp_path, lambda args: [
        as_scidb_sends(volume_cells(v, k), {4}) for k, v in enumerate(volumes)])
    assert outputs["sigma"] == pytest.approx(run.state["sigma"], rel=1e-12)
    mask = run.state["mask"].astype(np.float32).reshape(-1, 1)
    outputs = neuro_step(run, "denoise", tmp_path, lambda args: [
        as_scidb_sends(np.hstack([volume_cells(v, k), mask]), {4})
        for k, v in enumerate(volumes)])
    neuro_checks.assert_outputs_match(outputs, run.state, ["denoised"])


def test_child_fit_tensor_is_the_reference(run, tmp_path):
    """One chunk of every volume's 8x8x8 block at (8, 8, 8): the voxels it answers."""
    denoised = np.asarray(nib.load(run.state["denoised"]).dataobj)
    mask = run.state["mask"]
    block = (slice(8, 16), slice(8, 16), slice(8, 16))
    cells = []
    for k in range(denoised.shape[3]):
        part = volume_cells(denoised[block + (k,)], k)
        part[:, 1:4] += 8  # the block's own coordinates
        cells.append(np.hstack([part, mask[block].reshape(-1, 1)]))
    outputs = neuro_step(run, "fit_tensor", tmp_path,
                         lambda args: [as_scidb_sends(np.vstack(cells), {4})])
    for name in ("fa", "md"):
        neuro_checks.assert_outputs_match({name: outputs[name][block]},
                                          {name: run.state[name][block]}, [name])
    assert run.state["mask"][block].any()


def test_child_probe_says_its_python_and_pyarrow():
    import platform

    import pyarrow

    got = exchange("probe", {}, [sends(np.array([0]))])
    assert got["python"].tolist() == [platform.python_version().encode()]
    assert got["pyarrow"].tolist() == [pyarrow.__version__.encode()]


def test_child_answers_no_rows_with_no_data_and_ends_at_eof():
    """No voxels in a mask: a count of 0 (readFeather: no data), not a table; SciDB gone
    (its pipe closed without the end marker): the child ends, answering nothing."""
    from engines.scidb.stream_child import answer_message

    empty = {"x": [], "y": [], "z": []}
    assert answer_message(empty, ANSWERS["brain_mask"]) == bytes(8)
    proc = subprocess.run([sys.executable, "-m", "engines.scidb.stream_child", "probe",
                           encode_args({})], input=b"", cwd=ROOT, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == b"", proc.stderr[-2000:]


# -- what the engine sends: snapshots ---------------------------------------------------

class RecordingShim:
    """Records what the engine sends and answers as shim does: `replies`, in turn, then
    no data: the queries themselves are what is pinned (no result is claimed)."""

    timeout = 60.0

    def __init__(self, replies=()):
        self.sent, self.replies = [], list(replies)

    def execute(self, query, save=None, retry=True, timeout=None):
        self.sent.append(query + (f"  -- save {save}" if save else ""))
        return "1"

    def upload(self, data):
        self.sent.append(f"-- upload {len(data)} bytes")
        return "/tmp/shim_input_buf_0"

    def read_bytes(self):
        return self.replies.pop(0) if self.replies else b""


def saved_answers(rows) -> list[bytes]:
    """What SciDB saves of a stream's answers, all in one chunk: where it is (instance 0,
    chunk 0), then its rows, each value nullable as stream() makes it (0xFF first): an
    int64, or a binary value's uint32 byte count and bytes."""
    where = binary.encode({"i": [0], "c": [0]}, binary.Format.parse("(int64, int64)", "ic"))
    cells = b"".join(b"\xff" + (struct.pack("<I", len(v)) + v if isinstance(v, bytes)
                                else struct.pack("<q", v)) for row in rows for v in row)
    return [where, cells]


def coadd_answers(state, ctx) -> list[bytes]:
    """The child's clipping answer for every patch (weight 1 each visit, the first
    visit's pixel (0, 0) dropped): what the co-add sends next depends on it."""
    plan = astro.COADD.plan(state, ctx)
    return saved_answers([(p, np.ones(len(warps)).tobytes(), np.zeros(3, "<i8").tobytes())
                          for p, (_, warps) in enumerate(plan.partitions)])


def sent_for(pipeline, step_name, run, tmp_path, **options) -> list[str]:
    engine = SciDBEngine(url="http://scidb.example:8080", python="/usr/bin/python3",
                         suite="/srv/image-analytics-bench", **options)
    step = pipeline.STEP_BY_NAME[step_name]
    state = run.state_before(step_name)
    ctx = RunContext(tmp_path, pipeline.Params(), pipeline.Partitioning())
    engine.shim = RecordingShim(coadd_answers(state, ctx) if step_name == "coadd" else ())
    engine.token = "snap"
    try:
        engine.native_steps[step_name](engine, step, state, ctx, step.plan(state, ctx))
    except (InputError, AnswerMissing):  # no data came back: an empty mask, no sigma,
        pass  # no denoised volume, no CCD's answer; the queries are what is pinned
    # the stream command's arguments are data (sigma, gradients): not pinned
    return [re.sub(r"(engines\.scidb\.stream_child \w+) [\w=-]+", r"\1 <args>", line)
            for line in engine.shim.sent]


@pytest.mark.parametrize("pipeline, step", [(neuro, s.name) for s in neuro.STEPS]
                         + [(astro, s.name) for s in astro.STEPS])
def test_compiled_afl_is_the_reviewed_snapshot(pipeline, step, request, tmp_path):
    """IAB_UPDATE_SNAPSHOTS=1 rewrites them; a change is then reviewed in the diff."""
    run = request.getfixturevalue("run" if pipeline is neuro else "survey")
    got = "\n".join(sent_for(pipeline, step, run, tmp_path)) + "\n"
    path = SNAPSHOTS / f"{step}.afl"
    if os.environ.get("IAB_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"no snapshot {path}: IAB_UPDATE_SNAPSHOTS=1 makes it"
    assert got == path.read_text()


def test_chunk_sizes_are_options_recorded_and_followed(run, tmp_path):
    """At the defaults the snapshots hold (a volume per chunk, the partitioning's fit
    block); given, the series is stored in those blocks, the whole-volume steps read it
    rechunked to volumes, and the fit streams its own blocks."""
    options = {"chunk": (8, 8, 8), "fit_block": "12,14,12"}
    sent = "\n".join(sent_for(neuro, "noise_sigma", run, tmp_path, **options))
    assert "<v:float not null>[vol=0:11:0:1; x=0:23:0:8; y=0:27:0:8; z=0:23:0:8]" in sent
    assert "store(repart(iab_snap_series_0, <v:float not null>[vol=0:11:0:1; x=0:23:0:24; " \
           "y=0:27:0:28; z=0:23:0:24]), iab_snap_blocks_1)" in sent
    sent = "\n".join(sent_for(neuro, "fit_tensor", run, tmp_path, **options))
    assert "[vol=0:11:0:12; x=0:23:0:12; y=0:27:0:14; z=0:23:0:12]" in sent
    facts = SciDBEngine(**options).describe()
    assert facts["chunk"] == [8, 8, 8] and facts["fit_block"] == [12, 14, 12]
    assert SciDBEngine().describe()["chunk"] == "a volume"


@pytest.mark.parametrize("text", ["0,1", "8,8", "a,b,c", "8,8,-1", ""])
def test_a_bad_voxel_block_is_refused_in_one_line(text):
    proc = subprocess.run([sys.executable, "-m", "pipelines", "neuro", "--dataset",
                           "phantom-tiny", "--engine", "scidb", "--scidb-fit-block", text,
                           "--out", "unused"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"argument --scidb-fit-block: {text!r} is not a voxel block: X,Y,Z positive "
        f"integers (or one, for a cube), e.g. 16,16,16")


def test_close_removes_every_array_it_can():
    """An array a failed query never made is refused by SciDB (406): the others are
    still removed (a lost server: test_scidb_protocol's close tests)."""
    from engines.scidb.shim import ShimError

    class Refusing(RecordingShim):
        def execute(self, query, save=None, retry=True, timeout=None):
            super().execute(query, save)
            if "never_made" in query:
                raise ShimError("http://scidb.example:8080", "execute_query", 406,
                                "Array 'never_made' does not exist.")
            return "1"

        def close(self):
            self.sent.append("-- release")

    engine = SciDBEngine(url="http://scidb.example:8080")
    engine.shim = shim = Refusing()
    engine.arrays = ["a", "never_made", "b"]
    engine.close()
    assert shim.sent == ["remove(b)", "remove(never_made)", "remove(a)", "-- release"]
    assert engine.shim is None and engine.arrays == []


def test_afl_literals_and_schemas():
    assert afl.quote("it's a \\ path") == "'it\\'s a \\\\ path'"
    assert afl.dims("xy", (10, 20), (10, 5)) == "[x=0:9:0:10; y=0:19:0:5]"
    series = afl.Series("d", (2, 3, 4), 5)
    assert series.schema == "<v:float not null>[vol=0:4:0:1; x=0:1:0:2; y=0:2:0:3; z=0:3:0:4]"
    fmt = binary.Format.parse(afl.fetch_volume("a", "v")[1])
    assert fmt.dtype.itemsize == 3 * 8 + 9
    # a stream's answers (the snapshots' shim returns none, so none is read there)
    assert afl.stream("s", "cmd", "t", [("python", "binary")]) == \
        "store(stream(s, 'cmd', format:'feather', types:'binary', names:'python'), t)"
    assert afl.answer("t", 1, 2, [("p", "int64"), ("rows", "binary")]) == (
        "project(between(t, 1, 2, null, 1, 2, null), p, rows)", "(int64 null, binary null)")


def test_the_engine_reads_each_answer_back_as_binary():
    """A stream's answers as SciDB saves them: where they are (instance, chunk), then each
    one's typed columns, nullable as stream() makes them (a 0xFF byte before a value)."""
    where = binary.encode({"i": [0, 1], "c": [0, 0]},
                          binary.Format.parse("(int64, int64)", "ic"))
    engine = SciDBEngine(url="http://scidb.example:8080")
    engine.shim = RecordingShim([where, saved_answers([(1, b"\x00\x01")])[1],
                                 saved_answers([(0, b"")])[1]])
    engine.token = "t"
    found = engine._stream("coadds", "detect", {})
    assert found["p"].tolist() == [1, 0] and found["rows"].tolist() == [b"\x00\x01", b""]
    assert engine.shim.sent[-1] == "project(between(iab_t_detect_0, 1, 0, null, 1, 0, " \
        "null), p, rows)  -- save (int64 null, binary null)"


def test_without_a_server_the_engine_says_how_to_give_one():
    with pytest.raises(EngineUnavailable, match=r"no SciDB server given: --scidb-url "):
        SciDBEngine().start()
    assert all(SciDBEngine.capability(s.name) == "native"
               for s in neuro.STEPS + astro.STEPS)


# -- astronomy: the child's steps, run through the engine's own step code ----------------

@pytest.fixture(scope="module")
def survey():
    return reference_run(load_dataset("survey-tiny").inputs[0])


def plane_cells(path, names, *lead) -> dict[str, np.ndarray]:
    """Every pixel of a file's planes `names`, after the chunk's leading coordinates."""
    from pipelines import fitsio

    with fitsio.open_fits(path) as hdul:
        planes = [fitsio.read_plane(hdul, n, path=path) for n in names]
    y, x = np.indices(planes[0].shape).reshape(2, -1)
    return sends(*[np.full(y.size, k) for k in lead], y, x, *[p.ravel() for p in planes])


def run_with_child(engine, pipeline, step_name, state, ctx, chunks):
    """The engine's own step, with SciDB's part played by `chunks(args)` (the messages
    its stream() would send, given the arguments the engine passes: one chunk per CCD,
    part, patch or volume) and the real child."""
    def answers(source, step, args):
        yield exchange(step, args, chunks(args))

    engine._answers = answers
    return engine.run_step(pipeline.STEP_BY_NAME[step_name], state, ctx).outputs


def recording_engine():
    engine = SciDBEngine(url="http://scidb.example:8080")
    engine.shim, engine.token = RecordingShim(), "test"
    return engine


def test_child_calibrate_is_the_reference(survey, tmp_path):
    state = survey.state_before("calibrate")
    ccds = list(state["ccds"])
    outputs = run_with_child(
        recording_engine(), astro, "calibrate", state,
        RunContext(tmp_path, astro.AstroParams(), astro.AstroPartitioning()),
        lambda args: [plane_cells(c.path, ("IMAGE", "MASK", "VARIANCE"), k)
                      for k, c in enumerate(ccds)])
    assert_outputs_match(outputs, survey.state, list(astro.CALIBRATE.outputs))
    assert len(outputs["saturated"]) and outputs["calexps"]  # something was compared


def test_child_warp_is_the_reference(survey, tmp_path):
    state = survey.state_before("warp")

    def chunks(args):
        paths = sorted(state["calexps"].values())
        return [joined([plane_cells(paths[c], ("IMAGE", "MASK", "VARIANCE"), j, c)
                        for c in part["ccds"]]) for j, part in enumerate(args["parts"])]

    outputs = run_with_child(recording_engine(), astro, "warp", state, RunContext(
        tmp_path, astro.AstroParams(), astro.AstroPartitioning()), chunks)
    assert_outputs_match(outputs, survey.state, ["warps"])


def test_child_detect_is_the_reference(survey, tmp_path):
    state = survey.state_before("detect")
    patches = sorted(state["coadds"].items())
    outputs = run_with_child(recording_engine(), astro, "detect", state, RunContext(
        tmp_path, astro.AstroParams(), astro.AstroPartitioning()),
        lambda args: [plane_cells(path, ("IMAGE", "VARIANCE"), p)
                      for p, (_, path) in enumerate(patches)])
    assert_outputs_match(outputs, survey.state, ["catalog"])
    assert len(outputs["catalog"]) > 0


def assert_coadd_as_scidb_forms_it(partitions, skymap, want_paths) -> int:
    """The child's weights and dropped cells (`coadd_clip`, fed the warps' cells with
    data), then the sums `afl.coadd_sums` asks SciDB for, formed here in another order
    (visits reversed), as SciDB's aggregate may: the counts must be the reference's, the
    planes within the engine's declared bound. Returns how many cells were dropped."""
    from pipelines import fitsio

    chunks, planes = [], []
    for p, (_, warps) in enumerate(partitions):
        cells, stack = [], []
        for n, (_, path) in enumerate(warps):
            with fitsio.open_fits(path) as hdul:
                image, variance = (fitsio.read_plane(hdul, k, path=path)
                                   for k in ("IMAGE", "VARIANCE"))
            y, x = np.nonzero(np.isfinite(image) | np.isfinite(variance))
            cells.append(sends(np.full(len(y), p), np.full(len(y), n), y, x, image[y, x],
                               variance[y, x]))
            stack.append((image.astype(np.float64), variance.astype(np.float64)))
        chunks.append(joined(cells))
        planes.append(stack)
    args = {"params": dataclasses.asdict(astro.AstroParams()),
            "skymap": dataclasses.asdict(skymap), "visits": [len(w) for _, w in partitions]}
    found = exchange("coadd_clip", args, chunks)
    answers = {int(p): {"weights": np.frombuffer(w, "<f8"),
                        "dropped": np.frombuffer(d, "<i8").reshape(-1, 3)}
               for p, w, d in zip(found["p"], found["weights"], found["dropped"])}
    tol = SciDBEngine().tolerance("coadd", "coadds")
    for p, (patch, warps) in enumerate(partitions):
        image = np.stack([i for i, _ in planes[p]])[::-1]
        variance = np.stack([v for _, v in planes[p]])[::-1]
        kept = np.isfinite(image) | np.isfinite(variance)
        for n, y, x in answers[p]["dropped"]:
            kept[len(warps) - 1 - n, y, x] = False
        w = np.where(kept, np.array(answers[p]["weights"])[::-1, None, None], 0.0)
        total = w.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (np.where(kept, image, 0.0) * w).sum(axis=0) / total
            var = (np.where(kept, variance, 0.0) * w * w).sum(axis=0) / (total * total)
        count = kept.sum(axis=0)
        with fitsio.open_fits(want_paths[patch]) as hdul:
            assert np.array_equal(count, hdul["EXPCOUNT"].data), patch
            for got, name in ((mean, "IMAGE"), (var, "VARIANCE")):
                want = hdul[name].data.astype(np.float64)
                got = np.where(count > 0, got.astype(np.float32), np.nan)
                assert np.array_equal(np.isnan(got), np.isnan(want)), (patch, name)
                good = ~np.isnan(want)
                bound = tol.bound(np.abs(want[good]), np.abs(want[good]).max())
                assert (np.abs(got[good] - want[good]) <= bound).all(), (patch, name)
    return sum(len(a["dropped"]) for a in answers.values())


def test_coadd_clip_in_the_child_and_sums_as_afl_forms_them_are_the_reference(survey):
    """survey-tiny's 3 visits: no value can lie 3 sigma from the others (at most
    sqrt(2) sigma), so only the cells without data are left out."""
    state = survey.state_before("coadd")
    plan = astro.COADD.plan(state, RunContext(Path("."), astro.AstroParams(),
                                              astro.AstroPartitioning()))
    assert assert_coadd_as_scidb_forms_it(plan.partitions, state["skymap"],
                                          survey.state["coadds"]) == 0


def test_coadd_clipping_of_many_visits_as_scidb_forms_it(tmp_path):
    """Twelve visits with outliers and gaps, so that the clipping drops cells: against
    the reference's own coadd kernel."""
    from pipelines import fitsio

    skymap = astro.SkyMap(154.1, -4.9, 0.333, 8, 2, 1, 1)
    rng = np.random.default_rng(13)
    warps = []
    for n in range(12):
        image = rng.normal(10.0, 1.0, (12, 12)).astype(np.float32)
        variance = rng.uniform(0.8, 1.2, (12, 12)).astype(np.float32)
        image[rng.random((12, 12)) < 0.1] += 40.0
        image[n % 12, :4] = variance[n % 12, :4] = np.nan
        warps.append((100 + n, str(fitsio.write_planes(tmp_path / f"w{n}.fits", None, {
            "IMAGE": (image, None), "VARIANCE": (variance, None)}))))
    part = ((0, 0), tuple(warps))
    patch, path = astro.coadd_kernel(part, skymap, str(tmp_path), astro.AstroParams(), 5)
    assert assert_coadd_as_scidb_forms_it([part], skymap, {patch: path}) > 0
