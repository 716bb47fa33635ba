"""The Myria engine: both pipelines' steps run in a Myria cluster the user runs, through
its REST server (`--myria-url`). Nothing here starts a server, and CI has never run this
engine against one: its pieces are tested on their own (the BLOB bytes, the REST client
against the server's documented replies, the UDF under Python 2's cPickle and the child
against the reference's kernels, each step's MyriaL and JSON plan against reviewed
snapshots, the plans played as Myria's operators on one worker).

Each step: what it needs goes into Myria as BLOB tuples keyed as the study keyed them
(images (subjId, imgId); CCDs (visit, ccd), warps (visit, patch), coadds by patch, each
BLOB a FITS file's bytes), through the stage folder (`--myria-stage`, which the workers
read at the same path: DOWNLOADBLOB is the one way a BLOB gets in); the step's plan runs
(engines/myria/myrial.py); its BLOBs come back as JSON. The suite's kernels run as Python
UDFs/UDAs (engines/myria/udf.py); where a plan regroups (warp, coadd), its shuffle's own
emit and make run there too. Relations this engine makes are named
`iab_<session>_<what>_<n>` and deleted when it closes; so are its stage files. The
functions it registers stay (Myria cannot remove one), named per step and child command,
and are replaced by the next registration of the same name.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from pipelines import nifti
from pipelines.errors import EngineUnavailable

from ..base import Engine, native
from ..served import AnswerMissing, every_part, keep_file, step_args
from . import blob, myrial, udf, udf_child
from .rest import Myria, MyriaError

SUITE = Path(__file__).resolve().parents[2]
SUBJECT = 0  # one subject per run: the study's subjId key, kept for its joins
# step -> (output type, multivalued) of its UDF: BLOBs (arrays, files) in and out, but
# warp's emit, whose LONGs are patches (a group-by key)
FUNCTIONS = {**dict.fromkeys(("probe", "mean_b0", "brain_mask", "noise_sigma", "denoise",
                              "fit_tensor", "calibrate", "warp", "coadd", "detect"),
                             (myrial.BLOB, False)),
             "split_blocks": (myrial.BLOB, True), "warp_emit": (myrial.LONG, True)}


def default_stage() -> str:
    """Without --myria-stage: a folder of this machine, which only a Myria whose workers
    run on this machine can read."""
    return str(Path(tempfile.gettempdir()) / "iab-myria-stage")


class MyriaEngine(Engine):
    name = "myria"
    server_only = True

    def __init__(self, workers: int | None = None, url: str | None = None,
                 stage: str | None = None, python: str | None = None,
                 suite: str | None = None):
        super().__init__(workers)
        self.url = url or os.environ.get("MYRIA_URL")
        self.stage = str(Path(stage or default_stage()).resolve())
        # the child runs on the workers: absolute paths there
        self.python = python or "/usr/bin/python3"
        self.suite = suite or str(SUITE)
        self.rest: Myria | None = None
        self.token = uuid.uuid4().hex[:8]
        self.run_base = secrets.randbits(40)  # run keys: unique across sessions
        self.runs = 0
        self.relations: list[str] = []
        self.loaded: dict[tuple, str] = {}  # (file, mtime) -> its series relation

    # -- session ------------------------------------------------------------------------
    def start(self) -> "MyriaEngine":
        if not self.url:
            raise EngineUnavailable("no Myria server given: --myria-url http://host:8753 "
                                    "(its REST server; Myria cannot be installed here)")
        self.rest = Myria(self.url, user=os.environ.get("MYRIA_USER"),
                          password=os.environ.get("MYRIA_PASSWORD"))
        try:
            alive = self.rest.alive_workers()
            if not alive:
                raise EngineUnavailable(f"Myria at {self.url}: no worker is alive")
            self.workers = len(alive)
            Path(self._files()).mkdir(parents=True, exist_ok=True)
            for step, (output, multivalued) in FUNCTIONS.items():
                self.rest.register(udf.registration(step, output, multivalued, self.python,
                                                    self.suite, self.stage))
            self._probe()
        except MyriaError as exc:  # it answered, but not as a usable Myria does: absent
            self.close()
            raise EngineUnavailable(str(exc)) from None
        except BaseException:
            self.close()
            raise
        return self

    def _probe(self) -> None:
        """The suite's child answers on the workers (--myria-python in --myria-suite)."""
        table = self._relation("probe_in")
        self.rest.ingest_csv(table, [("subjId", myrial.LONG)], [(SUBJECT,)])
        out = self._relation("probe")
        try:
            self._query(myrial.probe(table, self._udf("probe"), self._run({}), out))
        except MyriaError as exc:
            raise EngineUnavailable(
                f"Myria at {self.url}: the workers cannot run the suite's child with "
                f"--myria-python {self.python} in --myria-suite {self.suite} (paths on the "
                f"workers; Python >= 3.11 with the suite's packages): "
                f"{str(exc).split(': ', 1)[-1]}") from None
        answers = [blob.unpickled(_bytes(row["answer"])) for row in self.rest.rows(out)]
        if not answers or not answers[0].startswith(b"ok"):
            raise EngineUnavailable(f"Myria at {self.url}: the suite's child answered "
                                    f"{answers[:1]!r}, not 'ok'")

    def close(self) -> None:
        if self.rest is not None:
            for name in reversed(self.relations):
                try:
                    self.rest.delete(name)
                except MyriaError:
                    pass  # never made (a failed query): nothing to delete
                except EngineUnavailable:
                    break  # the server is gone: it keeps the rest
            self.rest = None
        self.relations.clear()
        self.loaded.clear()
        shutil.rmtree(self._files(), ignore_errors=True)
        for n in range(self.runs):
            Path(self._args_file(self.run_base * 1000 + n)).unlink(missing_ok=True)
        self.runs = 0

    def versions(self) -> dict[str, str]:
        found = super().versions()
        if self.rest is not None:
            found["myria"] = self.rest.version()
        return found

    # -- helpers ------------------------------------------------------------------------
    def _files(self) -> str:
        """This session's BLOB files in the stage folder."""
        return str(Path(self.stage) / f"iab_{self.token}")

    def _args_file(self, key: int) -> str:
        return str(Path(self.stage) / f"iab-{key}.json")

    def _relation(self, what: str) -> str:
        name = f"iab_{self.token}_{what}_{len(self.relations)}"
        self.relations.append(name)
        return name

    def _udf(self, step: str) -> str:
        return udf.function_name(step, self.python, self.suite, self.stage)

    def _run(self, args: dict) -> int:
        """A run's key, its arguments written where the child reads them."""
        key = self.run_base * 1000 + self.runs
        self.runs += 1
        self._write(self._args_file(key), json.dumps(args).encode())
        return key

    def _write(self, path: str, data: bytes) -> None:
        """A file in the stage folder (the workers read it at the same path)."""
        Path(path).write_bytes(data)

    def _query(self, program: myrial.Program) -> None:
        self.rest.run(program.plan)

    def _ingest(self, keys: list[str], rows, arrays, what: str, column: str = "img",
                broadcast: bool = False) -> str:
        """BLOB tuples (keys..., blob) into a relation: each BLOB a stage file, a manifest
        of (keys..., uri), and the ingest plan that downloads them."""
        folder = Path(self._files())
        manifest_rows = []
        for row, array in zip(rows, arrays):
            path = folder / f"{what}_{len(self.relations)}_{'_'.join(map(str, row))}.blob"
            self._write(str(path), blob.encode(array))
            manifest_rows.append(tuple(row) + (path.as_uri(),))
        manifest = self._relation(f"{what}_manifest")
        self.rest.ingest_csv(manifest, [(k, myrial.LONG) for k in keys]
                             + [("uri", myrial.STRING)], manifest_rows)
        out = self._relation(what)
        self._query(myrial.ingest(manifest, keys, column, out, broadcast))
        return out

    def _series(self, path: str, volumes: int) -> str:
        """A 4-D NIfTI as (subjId, imgId, img) tuples, once per file and session."""
        key = (str(path), os.stat(path).st_mtime_ns)
        if key not in self.loaded:
            rows = [(SUBJECT, k) for k in range(volumes)]
            self.loaded[key] = self._ingest(["subjId", "imgId"], rows,
                                            (nifti.read_volume(path, k) for k in range(volumes)),
                                            "series")
        return self.loaded[key]

    def _mask(self, mask: np.ndarray) -> str:
        return self._ingest(["subjId"], [(SUBJECT,)], [mask], "mask", "mask", broadcast=True)

    def _parts(self, groups: list[list[int]]) -> str:
        """The plan's parts as (imgId, part), on every worker: joined in, it selects the
        step's images and keys its group-by."""
        name = self._relation("parts")
        self.rest.ingest_csv(name, [("imgId", myrial.LONG), ("part", myrial.LONG)],
                             [(k, i) for i, group in enumerate(groups) for k in group],
                             broadcast=True)
        return name

    def _by_key(self, out: str, key: str, column: str = "value"):
        """(key, arrays) of each tuple of `out`, as they stream in."""
        for row in self.rest.rows(out):
            yield int(row[key]), blob.decode(_bytes(row[column]))

    def _grouped(self, step: str, why: str, series: str, groups, args: dict,
                 mask: str | None = None) -> str:
        out = self._relation(step)
        self._query(myrial.grouped(step, why, series, self._parts(groups), self._udf(step),
                                   self._run(args), out, mask))
        return out

    def _every_part(self, got: dict, count: int, step: str) -> list:
        return every_part(got, count, f"Myria at {self.url}", step)

    # -- the steps ----------------------------------------------------------------------
    @native("mean_b0")
    def mean_b0(self, step, state, ctx, plan):
        series = self._series(state["dwi"], state["n_volumes"])
        out = self._grouped("mean_b0", "the b0 volumes summed, a partial sum per part of "
                            "the plan", series, [g for _, g in plan.partitions], {})
        sums = {part: arrays[0] for part, arrays in self._by_key(out, "part")}
        return plan.combine(self._every_part(sums, len(plan.partitions), step.name))

    @native("brain_mask")
    def brain_mask(self, step, state, ctx, plan):
        volume = self._ingest(["subjId"], [(SUBJECT,)], [state["mean_b0"]], "mean_b0")
        out = self._relation("mask_out")
        self._query(myrial.brain_mask(volume, self._udf("brain_mask"),
                                      self._run(step_args(ctx)), out))
        masks = [arrays[0] for _, arrays in self._by_key(out, "subjId", "mask")]
        return plan.combine(self._every_part(dict(enumerate(masks)), 1, step.name))

    @native("noise_sigma")
    def noise_sigma(self, step, state, ctx, plan):
        series = self._series(state["dwi"], state["n_volumes"])
        out = self._grouped("noise_sigma", "each volume's noise, a part of the plan per "
                            "group", series, [g for _, g in plan.partitions],
                            step_args(ctx))
        sigma = {part: arrays[0].tolist() for part, arrays in self._by_key(out, "part")}
        return plan.combine(self._every_part(sigma, len(plan.partitions), step.name))

    @native("denoise")
    def denoise(self, step, state, ctx, plan):
        series = self._series(state["dwi"], state["n_volumes"])
        groups = [[k for k, _ in items] for _, _, items in plan.partitions]
        out = self._grouped("denoise", "non-local means per volume, the mask joined in "
                            "(broadcast), a part of the plan per group", series, groups,
                            step_args(ctx, sigma=[float(s) for s in state["sigma"]]),
                            mask=self._mask(state["mask"]))
        target = plan.partitions[0][1]  # the plan made the output file
        written = set()
        for part, arrays in self._by_key(out, "part"):
            for k, volume in zip(groups[part], arrays[0]):
                nifti.write_volume(target, k, volume)
                written.add(k)
            self._report(step.name, len(written), state["n_volumes"])
        self._every_part(dict.fromkeys(written), state["n_volumes"], step.name)
        return plan.combine([])

    @native("fit_tensor")
    def fit_tensor(self, step, state, ctx, plan):
        series = self._series(state["denoised"], state["n_volumes"])
        mask = self._mask(state["mask"])
        blocks = plan.partitions
        out = self._relation("fit_tensor")
        self._query(myrial.fit_tensor(
            series, mask, self._udf("split_blocks"), self._udf("fit_tensor"),
            self._run(step_args(ctx, bvals=np.asarray(state["bvals"]).tolist(),
                                bvecs=np.asarray(state["bvecs"]).tolist(),
                                blocks=[[[s.start, s.stop] for s in b] for b in blocks])),
            out))
        fits = {i: (blocks[i], fa, md) for i, (fa, md) in self._by_key(out, "flatmapid")}
        return plan.combine(self._every_part(fits, len(blocks), step.name))

    # -- astronomy ----------------------------------------------------------------------
    def _fits_files(self, keys: list[str], rows, paths, what: str) -> str:
        """FITS files as BLOB tuples (keys..., img), each the file's bytes, keyed as the
        study keyed them."""
        return self._ingest(keys, rows, (np.frombuffer(Path(p).read_bytes(), np.uint8)
                                         for p in paths), what)

    def _each(self, step: str, why: str, table: str, keys: list[str], args: dict) -> str:
        out = self._relation(step)
        self._query(myrial.each(step, why, table, keys, self._udf(step), self._run(args),
                                out))
        return out

    def _answers(self, out: str, keys: list, step: str, ctx) -> list:
        """The child's answers (facts, its output file kept under the run folder, arrays)
        in the order of the plan's `keys`, every one answered."""
        index = {key: i for i, key in enumerate(keys)}
        got = {}
        for row in self.rest.rows(out):
            meta, data, *arrays = blob.decode(_bytes(row["value"]))
            meta = json.loads(meta.tobytes())
            key = udf_child.as_tuples(meta["key"])
            if key not in index:
                raise AnswerMissing(f"Myria at {self.url}: {step} answered {key!r}, which "
                                    f"is none of the plan's parts")
            got[index[key]] = (
                meta["facts"], keep_file(ctx.workdir, meta["name"], data.tobytes()), arrays)
        return self._every_part(got, len(keys), step)

    def _shuffle_args(self, shuffle, files: dict) -> dict:
        """The plan's shuffle for the child: its emit and make by name, its records by the
        key of the tuple that holds each one's file (`files`: path -> key), the path
        marked where the child puts its copy."""
        records = []
        for record in shuffle.records:
            found = [files[v] for v in _leaves(record) if isinstance(v, str) and v in files]
            records.append([list(found[0]), _marked(record, files)])
        return {"emit": _name(shuffle.emit), "make": _name(shuffle.make), "records": records}

    @native("calibrate")
    def calibrate(self, step, state, ctx, plan):
        ccds = plan.partitions
        table = self._fits_files(["visit", "ccd"], [c.key for c in ccds],
                                 [c.path for c in ccds], "raw")
        out = self._each("calibrate", "a UDF per CCD: its raw file to its calexp, facts "
                         "and saturated stars", table, ["visit", "ccd"], step_args(
                             ctx, state, ccds=[[*c.key, c.path, list(c.shape)] for c in ccds]))
        results = []
        for ccd, (facts, path, arrays) in zip(ccds, self._answers(
                out, [c.key for c in ccds], step.name, ctx)):
            if arrays:
                facts["saturated"] = arrays[0]
            results.append((ccd.key, path, facts))
        return plan.combine(results)

    @native("warp")
    def warp(self, step, state, ctx, plan):
        calexps = state["calexps"]
        table = self._fits_files(["visit", "ccd"], list(calexps), list(calexps.values()),
                                 "calexps")
        out = self._relation("warp")
        args = step_args(ctx, state, **self._shuffle_args(
            plan.shuffle, {path: key for key, path in calexps.items()}))
        self._query(myrial.warp(table, self._udf("warp_emit"), self._udf("warp"),
                                self._run(args), out))
        keys = [(visit, patch) for visit, patch, _ in plan.partitions]
        return plan.combine([(*key, path) for key, (_, path, _)
                             in zip(keys, self._answers(out, keys, step.name, ctx))])

    @native("coadd")
    def coadd(self, step, state, ctx, plan):
        skymap = state["skymap"]
        keys = {path: (visit, udf_child.patch_id(patch, skymap))
                for (visit, patch), path in state["warps"].items()}
        table = self._fits_files(["visit", "patch"], list(keys.values()), list(keys),
                                 "warps")
        out = self._relation("coadd")
        args = step_args(ctx, state, strip_rows=ctx.partitioning.coadd_strip_rows,
                         **self._shuffle_args(plan.shuffle, keys))
        self._query(myrial.coadd(table, self._udf("coadd"), self._run(args), out))
        patches = [patch for patch, _ in plan.partitions]
        return plan.combine([(patch, path) for patch, (_, path, _)
                             in zip(patches, self._answers(out, patches, step.name, ctx))])

    @native("detect")
    def detect(self, step, state, ctx, plan):
        import base64

        patches = [patch for patch, _ in plan.partitions]
        table = self._fits_files(["patch"], [(udf_child.patch_id(p, state["skymap"]),)
                                             for p in patches],
                                 [path for _, path in plan.partitions], "coadds")
        out = self._each("detect", "a UDF per coadd patch: its sources", table, ["patch"],
                         step_args(ctx, state, saturated=base64.b64encode(
                             state["saturated"].tobytes()).decode()))
        return plan.combine([(patch, arrays[0]) for patch, (_, _, arrays)
                             in zip(patches, self._answers(out, patches, step.name, ctx))])


def _leaves(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _marked(value, files: dict):
    """A record as JSON, its file's path replaced by udf_child.FILE."""
    if isinstance(value, (tuple, list)):
        return [_marked(v, files) for v in value]
    return udf_child.FILE if isinstance(value, str) and value in files else value


def _name(function) -> str:
    return f"{function.__module__}:{function.__qualname__}"


def _bytes(text: str) -> bytes:
    """A BLOB of Myria's JSON: standard base64."""
    import base64

    return base64.b64decode(text)
