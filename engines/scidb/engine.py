"""The SciDB engine: both pipelines' steps run inside a SciDB server the user runs,
through its shim HTTP service (`--scidb-url`). Nothing here starts a server, and CI has
never run this engine against one: its pieces are tested on their own (the binary format,
the shim client against shim's replies, the stream child against the reference's
kernels, the compiled AFL against reviewed snapshots).

Each step: the inputs the step needs are put into SciDB as binary (the DWI cached by file
for the session), the step's AFL runs (engines/scidb/afl.py), its results come back: as
binary from AFL and from stream() (its Feather exchange: the children's answers are
typed arrays in SciDB).
Arrays this engine makes are named `iab_<session>_<what>` and removed when it closes.
Credentials come from the environment, never from the repository: SCIDB_USER and
SCIDB_PASSWORD (SciDB's own), SHIM_USER and SHIM_PASSWORD (shim's HTTP digest).
"""
from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path

import numpy as np

from pipelines import astro, fitsio, nifti
from pipelines.errors import EngineUnavailable, InputError

from .. import voxel_block
from ..base import Engine, native
from ..served import every_part, keep_file, step_args
from ..tolerances import FLOAT32_RTOL, FLOOR, Tolerance
from . import afl, binary
from .shim import Shim, ShimError
from .stream_child import ANSWERS, encode_args

SUITE = Path(__file__).resolve().parents[2]
# bash -c takes the stream command as one argument: Linux's MAX_ARG_STRLEN
MAX_COMMAND = 128 * 1024
# the CCD planes as calibrate and warp read them
CCD_ATTRIBUTES = (("image", "float"), ("mask", "int32"), ("variance", "float"))
PAIR = (("image", "float"), ("variance", "float"))
SUMS = Tolerance(
    "the kernel's products, summed by SciDB's aggregate in its own order (float64), then "
    "cast to float32: the same 4 float32 ulps plus 1e-6 of the largest magnitude as the "
    "same kernels; the clipping decisions are the kernel's own (stream()), so the "
    "exposure counts are identical", rtol=FLOAT32_RTOL, floor=FLOOR)


def ccd_facts(path: str) -> dict:
    """What the stream child needs of a CCD file besides its pixels: its shape and its
    headers as text, without the scaling keywords (the pixels travel as the values the
    kernels read)."""
    headers = {}
    with fitsio.open_fits(path) as hdul:
        for name, hdu in (("PRIMARY", hdul[0]), ("IMAGE", hdul["IMAGE"]),
                          ("MASK", hdul["MASK"])):
            header = hdu.header.copy()
            for key in ("BZERO", "BSCALE", "BLANK"):
                header.remove(key, ignore_missing=True)
            headers[name] = header.tostring(sep="\n")
        return {"shape": list(hdul["IMAGE"].shape), "headers": headers}


class SciDBEngine(Engine):
    name = "scidb"
    server_only = True

    def __init__(self, workers: int | None = None, url: str | None = None,
                 python: str | None = None, suite: str | None = None,
                 chunk: tuple[int, int, int] | None = None,
                 fit_block: tuple[int, int, int] | None = None):
        super().__init__(workers)
        # the voxel block of a chunk of the stored series (None: a whole volume, the
        # study's unit) and of the fit's chunks (None: the run's partitioning's block)
        self.chunk = voxel_block(chunk) if chunk is not None else None
        self.fit_block = voxel_block(fit_block) if fit_block is not None else None
        self.url = url or os.environ.get("SCIDB_URL")
        # the stream child runs on the server, with an empty environment: absolute paths
        self.python = python or "/usr/bin/python3"
        self.suite = suite or str(SUITE)
        self.shim: Shim | None = None
        self.token = uuid.uuid4().hex[:8]
        self.arrays: list[str] = []
        self.loaded: dict[tuple, object] = {}  # (file, mtime, what) -> its array

    # -- session ------------------------------------------------------------------------
    def start(self) -> "SciDBEngine":
        if not self.url:
            raise EngineUnavailable("no SciDB server given: --scidb-url http://host:8080 "
                                    "(its shim service; SciDB cannot be installed here)")
        self.shim = Shim(self.url, os.environ.get("SCIDB_USER"),
                         os.environ.get("SCIDB_PASSWORD"), os.environ.get("SHIM_USER"),
                         os.environ.get("SHIM_PASSWORD"))
        try:
            self.shim.open()
            self._check_server()
        except ShimError as exc:  # refused (401), full (503), a probe failed: unusable
            self.close()
            raise EngineUnavailable(str(exc)) from None
        except BaseException:
            self.close()
            raise
        return self

    def _check_server(self) -> None:
        """What the steps need, asked before any data moves: the stream plugin, and the
        suite's child running under --scidb-python in --scidb-suite on the server."""
        if "stream" not in self._strings("project(list('operators'), name)"):
            raise EngineUnavailable(f"SciDB at {self.url} has no stream() operator (the "
                                    f"Paradigm4 stream plugin runs the suite's kernels)")
        self.shim.execute("aggregate(list('instances'), count(*))", save="(uint64)")
        counted = binary.decode(self.shim.read_bytes(), binary.Format.parse("(uint64)"))
        self.workers = int(counted["a0"][0])  # SciDB's instances run the stream children
        try:
            answer = self._stream("build(<x:int64 not null>[i=0:0:0:1], i)", "probe", {})
        except ShimError as exc:
            raise EngineUnavailable(
                f"SciDB at {self.url}: stream() cannot run the suite's child with "
                f"--scidb-python {self.python} in --scidb-suite {self.suite} (both are "
                f"paths on the server; Python >= 3.11 with the suite's packages and "
                f"pyarrow): {exc.headline or exc}"
            ) from None
        if not len(answer["python"]):
            raise EngineUnavailable(f"SciDB at {self.url}: the suite's child answered "
                                    f"nothing to its probe")

    def close(self) -> None:
        """Remove this session's arrays and release it; never raises (it runs after any
        failure). A session a failed query ended is opened again, once, by the first
        remove; an array SciDB refuses to remove (406: a failed query never made it) is
        skipped; anything else (the server gone) ends the cleanup at once, since every
        remove would wait for the server in turn."""
        if self.shim is None:
            return
        shim, self.shim = self.shim, None
        try:
            for name in reversed(self.arrays):
                try:
                    shim.execute(afl.remove(name), timeout=shim.timeout)
                except ShimError as exc:
                    if exc.status != 406:
                        raise
        except Exception:
            pass  # SciDB keeps the rest: `iab_<session>_...`, to remove by hand
        finally:
            self.arrays.clear()
            self.loaded.clear()
            shim.close()

    def describe(self):
        facts = super().describe()
        facts.update(url=self.url, chunk=list(self.chunk) if self.chunk else "a volume",
                     fit_block=list(self.fit_block) if self.fit_block
                     else "the partitioning's block")
        return facts

    def versions(self) -> dict[str, str]:
        found = super().versions()
        if self.shim is not None:
            found["scidb"] = self.shim.version()
        return found

    # -- helpers ------------------------------------------------------------------------
    def _array(self, what: str) -> str:
        """A name for an array this session makes (removed on close; removing one that
        a failed query never made is refused by SciDB, and skipped)."""
        name = f"iab_{self.token}_{what}_{len(self.arrays)}"
        self.arrays.append(name)
        return name

    def _strings(self, query: str) -> list[str]:
        self.shim.execute(query, save="(string null)")
        cells = binary.decode(self.shim.read_bytes(), binary.Format.parse("(string null)"))
        return [s for s in cells["a0"] if s is not None]

    def _volume_cells(self, array: str, attribute: str, shape) -> np.ndarray:
        text, fmt = afl.fetch_volume(array, attribute)
        self.shim.execute(text, save=fmt)
        cells = binary.decode(self.shim.read_bytes(), binary.Format.parse(
            fmt, ["x", "y", "z", "value"]))
        volume = np.zeros(shape, dtype=np.float64)
        volume[cells["x"], cells["y"], cells["z"]] = cells["value"]
        return volume

    def _upload(self, array, data: np.ndarray, volume: int | None = None) -> None:
        path = self.shim.upload(np.ascontiguousarray(data, dtype="<f4").tobytes())
        # not retried in a new session: that one would not hold the upload
        self.shim.execute(afl.load_volume(array, path, volume), retry=False)

    def _series(self, path: str, shape, volumes: int) -> afl.Series:
        """A 4-D NIfTI in SciDB (one upload and insert per volume), once per file."""
        key = (str(path), os.stat(path).st_mtime_ns, "series")
        if key not in self.loaded:
            series = afl.Series(self._array("series"), tuple(shape), volumes,
                                self.chunk)
            self.shim.execute(afl.create(series))
            for k in range(volumes):
                self._upload(series, nifti.read_volume(path, k), k)
                self._report("ingest", k + 1, volumes)
            self.loaded[key] = series
        return self.loaded[key]

    def _rechunked(self, series: afl.Series, block, volumes_per_chunk: int) -> afl.Series:
        target = afl.rechunk(series, block, self._array("blocks"), volumes_per_chunk)
        self.shim.execute(afl.store_rechunked(series, target))
        return target

    def _mask(self, mask: np.ndarray, chunk=None) -> afl.Volume:
        """The mask in SciDB, chunked over x, y, z as the series it is joined to."""
        array = afl.Volume(self._array("mask"), mask.shape, "m", "bool", chunk)
        self.shim.execute(afl.create(array))
        self._upload(array, mask.astype(np.float32))
        return array

    def _stream(self, source: str, step: str, args: dict) -> dict[str, np.ndarray]:
        """The stream child's answers for `source`, as one set of columns (ANSWERS)."""
        answers = list(self._answers(source, step, args))
        return {name: np.concatenate([a[name] for a in answers]) if answers
                else np.array([], dtype=binary.TYPES.get(kind, object))
                for name, kind in ANSWERS[step]}

    def _answers(self, source: str, step: str, args: dict):
        """The stream child's answers for `source`, one at a time, each as its columns
        (an answer is a chunk's: a volume's denoised cells; all of them at once would
        not fit the client)."""
        command = (f"cd {shlex.quote(self.suite)} && {shlex.quote(self.python)} -u -m "
                   f"engines.scidb.stream_child {step} {encode_args(args)}")
        if len(command.encode()) >= MAX_COMMAND:  # an input too big for it, not the server
            raise InputError(f"SciDB: the {step} stream() command is {len(command) // 1024} "
                             f"KiB, over Linux's 128 KiB for one argument (too many CCDs or "
                             f"patches for one step)")
        target = self._array(step)
        self.shim.execute(afl.stream(source, command, target, ANSWERS[step]))
        query, fmt = afl.answer_positions(target)
        self.shim.execute(query, save=fmt)
        where = binary.decode(self.shim.read_bytes(), binary.Format.parse(fmt, "ic"))
        for instance, chunk in zip(where["i"], where["c"]):
            query, fmt = afl.answer(target, int(instance), int(chunk), ANSWERS[step])
            self.shim.execute(query, save=fmt)
            yield binary.decode(self.shim.read_bytes(), binary.Format.parse(
                fmt, [n for n, _ in ANSWERS[step]]))

    # -- the steps ----------------------------------------------------------------------
    @native("mean_b0")
    def mean_b0(self, step, state, ctx, plan):
        dwi = self._series(state["dwi"], state["shape"], state["n_volumes"])
        target = self._array("mean_b0")
        self.shim.execute(afl.mean_b0(dwi, state["b0_index"], target))
        mean = self._volume_cells(target, "mean_b0", state["shape"])
        return {"mean_b0": mean.astype(np.float32)}

    @native("brain_mask")
    def brain_mask(self, step, state, ctx, plan):
        mean_b0 = afl.Volume(self._array("mean_b0_in"), state["mean_b0"].shape, "mean_b0")
        self.shim.execute(afl.create(mean_b0))
        self._upload(mean_b0, state["mean_b0"])
        voxels = self._stream(afl.with_coordinates(mean_b0.name, four_d=False),
                              "brain_mask",
                              step_args(ctx, shape=list(mean_b0.shape)))
        mask = np.zeros(mean_b0.shape, dtype=bool)
        mask[voxels["x"], voxels["y"], voxels["z"]] = True
        return plan.combine([mask])

    @native("noise_sigma")
    def noise_sigma(self, step, state, ctx, plan):
        dwi = self._series(state["dwi"], state["shape"], state["n_volumes"])
        if self.chunk is not None:  # the estimate is a whole volume's
            dwi = self._rechunked(dwi, dwi.shape, 1)
        found = self._stream(afl.with_coordinates(dwi.name, four_d=True), "noise_sigma",
                             step_args(ctx, shape=list(state["shape"])))
        sigma = every_part({int(k): float(s) for k, s in zip(found["vol"], found["sigma"])},
                           state["n_volumes"], f"SciDB at {self.url}", "noise_sigma")
        return plan.combine([[sigma[k] for k in group] for _, group in plan.partitions])

    @native("denoise")
    def denoise(self, step, state, ctx, plan):
        dwi = self._series(state["dwi"], state["shape"], state["n_volumes"])
        if self.chunk is not None:  # the kernel denoises a whole volume per chunk
            dwi = self._rechunked(dwi, dwi.shape, 1)
        mask = self._mask(state["mask"])
        answers = self._answers(afl.with_mask(dwi, mask), "denoise",
                                step_args(ctx, shape=list(state["shape"]),
                                          sigma=[float(s) for s in state["sigma"]]))
        out = plan.partitions[0][1]  # the plan made the output file
        written = set()
        for cells in answers:  # a chunk's answer: one volume's cells
            for k in np.unique(cells["vol"]):
                mine = cells["vol"] == k
                volume = np.zeros(state["shape"], dtype=np.float32)
                volume[cells["x"][mine], cells["y"][mine], cells["z"][mine]] = \
                    cells["v"][mine]
                nifti.write_volume(out, int(k), volume)
                written.add(int(k))
            self._report(step.name, len(written), state["n_volumes"])
        every_part(dict.fromkeys(written), state["n_volumes"], f"SciDB at {self.url}",
                   "denoise")
        return plan.combine([])

    @native("fit_tensor")
    def fit_tensor(self, step, state, ctx, plan):
        denoised = self._series(state["denoised"], state["shape"], state["n_volumes"])
        block = self.fit_block or tuple(ctx.partitioning.block)
        rechunked = self._rechunked(denoised, block, denoised.volumes)
        mask = self._mask(state["mask"], chunk=block)
        cells = self._stream(afl.with_mask(rechunked, mask), "fit_tensor",
                             step_args(ctx, bvals=np.asarray(state["bvals"]).tolist(),
                                       bvecs=np.asarray(state["bvecs"]).tolist()))
        fa = np.zeros(state["shape"], dtype=np.float32)
        md = np.zeros(state["shape"], dtype=np.float32)
        fa[cells["x"], cells["y"], cells["z"]] = cells["fa"]
        md[cells["x"], cells["y"], cells["z"]] = cells["md"]
        return {"fa": fa, "md": md}

    # -- astronomy ----------------------------------------------------------------------
    def tolerance(self, step, quantity):
        return SUMS if quantity == "coadds" else super().tolerance(step, quantity)

    def _stack(self, what: str, attrs, members: int, shape, key: str = "ccd") -> afl.Cells:
        """An empty stack of planes, one member (`key`) per chunk."""
        rows, cols = shape
        cells = afl.Cells(self._array(what), attrs,
                          ((key, members, 1), ("y", rows, rows), ("x", cols, cols)))
        self.shim.execute(afl.create(cells))
        return cells

    def _upload_plane(self, target: afl.Cells, planes: list[np.ndarray], member: dict):
        """One member's planes, interleaved per pixel in the attributes' types."""
        fmt = binary.Format.parse("(" + ", ".join(t for _, t in target.attributes) + ")",
                                  target.names)
        data = binary.encode({n: p.ravel() for n, p in zip(target.names, planes)}, fmt)
        path = self.shim.upload(data)
        self.shim.execute(afl.load_plane(target, path, planes[0].shape, member), retry=False)

    def _upload_cells(self, target: afl.Cells, columns: dict[str, np.ndarray]) -> None:
        """Cells (coordinates, then attributes) into a sparse array; none: nothing sent."""
        names = [d for d, _, _ in target.dims] + list(target.names)
        fmt = binary.Format.parse("(" + ", ".join(
            ["int64"] * len(target.dims) + [t for _, t in target.attributes]) + ")", names)
        count = len(columns[names[0]])
        if count:
            path = self.shim.upload(binary.encode(columns, fmt))
            self.shim.execute(afl.load_cells(target, path, count), retry=False)

    def _ccds(self, what: str, paths: list[str]) -> tuple[afl.Cells, list[dict]]:
        """CCD files (raw or calibrated) in SciDB, one CCD per chunk, in binary; and what
        the stream child needs of each besides its pixels (`ccd_facts`)."""
        facts = [ccd_facts(path) for path in paths]
        stack = self._stack(what, CCD_ATTRIBUTES, len(paths),
                            np.max([f["shape"] for f in facts], axis=0).tolist())
        for c, path in enumerate(paths):
            with fitsio.open_fits(path) as hdul:
                planes = [fitsio.read_plane(hdul, p, path=path) for p in fitsio.PLANES]
            self._upload_plane(stack, planes, {"ccd": c})
            self._report(f"ingest {what}", c + 1, len(paths))
        return stack, facts

    def _rows(self, source: str, step: str, args: dict, key: str, count: int) -> list[dict]:
        """The child's answers, a row (column name -> value) for each of the `count`
        chunks (numbered by the column `key`), in chunk order (AnswerMissing if not)."""
        found = self._stream(source, step, args)
        rows = [dict(zip(found, values)) for values in zip(*found.values())]
        return every_part({int(r[key]): r for r in rows}, count, f"SciDB at {self.url}",
                          step)

    @staticmethod
    def _keep_file(answer: dict, ctx) -> str | None:
        """The kernel's output file as the child sent it (its name as bytes)."""
        name = answer["name"]
        return keep_file(ctx.workdir, None if name is None else name.decode(),
                         answer["file"])

    @native("calibrate")
    def calibrate(self, step, state, ctx, plan):
        ccds = plan.partitions
        stack, facts = self._ccds("raw", [c.path for c in ccds])
        for fact, ccd in zip(facts, ccds):  # the plan's own keys, its reasons' file
            (fact["visit"], fact["ccd"]), fact["path"] = ccd.key, ccd.path
        answers = self._rows(afl.stream_cells(stack), "calibrate",
                             step_args(ctx, state, ccds=facts), "c", len(ccds))
        results = []
        for a in answers:  # the kernel's facts: a reason, or what it found
            info = {"reason": a["reason"].decode()} if a["reason"] is not None else {
                "cosmic_ray_pixels": int(a["cosmic_ray_pixels"]),
                "background_median": float(a["background_median"]),
                "saturated": np.frombuffer(a["saturated"], astro.SATURATED_DTYPE).copy()}
            results.append((ccds[a["c"]].key, self._keep_file(a, ctx), info))
        results.sort(key=lambda r: r[0])
        return plan.combine(results)

    @native("warp")
    def warp(self, step, state, ctx, plan):
        paths = sorted({p for _, _, calexps in plan.partitions for p in calexps})
        index = {p: c for c, p in enumerate(paths)}
        ccds, facts = self._ccds("calexps", paths)
        parts = [{"visit": visit, "patch": list(patch), "ccds": [index[p] for p in calexps]}
                 for visit, patch, calexps in plan.partitions]
        # the assignment <part>[ccd; k]: the k-th part CCD c goes to
        pairs = [(c, j) for j, part in enumerate(parts) for c in part["ccds"]]
        taken: dict[int, int] = {}
        ks = []
        for c, _ in pairs:
            ks.append(taken.get(c, 0))
            taken[c] = ks[-1] + 1
        assignment = afl.Cells(self._array("assignment"), (("part", "int64"),),
                               (("ccd", len(paths), 1), ("k", max(ks) + 1, max(ks) + 1)))
        self.shim.execute(afl.create(assignment))
        self._upload_cells(assignment, {"ccd": np.array([c for c, _ in pairs]),
                                        "k": np.array(ks), "part": np.array([j for _, j
                                                                             in pairs])})
        rows, cols = (d[1] for d in ccds.dims[1:])
        grouped = afl.Cells(self._array("by_part"), CCD_ATTRIBUTES,
                            (("part", len(parts), 1), ("ccd", len(paths), len(paths)),
                             ("y", rows, rows), ("x", cols, cols)))
        self.shim.execute(afl.shuffle(ccds, assignment, grouped))
        answers = self._rows(afl.stream_cells(grouped), "warp",
                             step_args(ctx, state, parts=parts, ccds=facts), "part",
                             len(parts))
        return plan.combine([(parts[a["part"]]["visit"], tuple(parts[a["part"]]["patch"]),
                              self._keep_file(a, ctx)) for a in answers])

    @native("coadd")
    def coadd(self, step, state, ctx, plan):
        """The clipping about the median over visits and the visits' weights (clipped
        means) in stream() with the kernel's own functions: AFL has no median; the
        weighted sums, the mean, its variance and the count in AFL."""
        skymap = state["skymap"]
        height, width = skymap.patch_shape
        visits = max(len(warps) for _, warps in plan.partitions)
        shape = (("patch", len(plan.partitions), 1), ("n", visits, visits),
                 ("y", height, height), ("x", width, width))
        warps = afl.Cells(self._array("warps"), PAIR, shape)
        dropped = afl.Cells(self._array("dropped"), (("r", "int64"),), shape)
        weights = afl.Cells(self._array("weights"), (("w", "double"),), shape[:2])
        for array in (warps, dropped, weights):
            self.shim.execute(afl.create(array))
        for p, (_, patch_warps) in enumerate(plan.partitions):
            for n, (_, path) in enumerate(patch_warps):  # only the cells with data
                with fitsio.open_fits(path) as hdul:
                    image, variance = (fitsio.read_plane(hdul, name, path=path)
                                       for name in ("IMAGE", "VARIANCE"))
                y, x = np.nonzero(np.isfinite(image) | np.isfinite(variance))
                self._upload_cells(warps, {"patch": np.full(len(y), p), "n": np.full(
                    len(y), n), "y": y, "x": x, "image": image[y, x],
                    "variance": variance[y, x]})
        answers = self._stream(
            afl.stream_cells(warps), "coadd_clip",
            step_args(ctx, state, visits=[len(w) for _, w in plan.partitions]))
        found = every_part(
            {int(p): {"weights": np.frombuffer(w, "<f8").tolist(),
                      "dropped": np.frombuffer(d, "<i8").reshape(-1, 3)}
             for p, w, d in zip(answers["p"], answers["weights"], answers["dropped"])},
            len(plan.partitions), f"SciDB at {self.url}", "coadd's clipping")
        cells = np.array([(p, *c) for p, a in enumerate(found) for c in a["dropped"]],
                         dtype=np.int64).reshape(-1, 4)
        self._upload_cells(dropped, {"patch": cells[:, 0], "n": cells[:, 1],
                                     "y": cells[:, 2], "x": cells[:, 3],
                                     "r": np.ones(len(cells), dtype=np.int64)})
        pn = [(p, n, w) for p, a in enumerate(found) for n, w in enumerate(a["weights"])]
        self._upload_cells(weights, {"patch": np.array([p for p, _, _ in pn]),
                                     "n": np.array([n for _, n, _ in pn]),
                                     "w": np.array([w for _, _, w in pn])})
        query, fmt = afl.coadd_sums(warps, weights, dropped)
        self.shim.execute(query, save=fmt)
        sums = binary.decode(self.shim.read_bytes(), binary.Format.parse(
            fmt, ["p", "y", "x", "mean", "var", "kept"]))
        results = []
        for p, (patch, patch_warps) in enumerate(plan.partitions):
            mine = sums["p"] == p
            y, x = sums["y"][mine], sums["x"][mine]
            coadd = np.full((height, width), np.nan, dtype=np.float32)
            coadd_var = np.full((height, width), np.nan, dtype=np.float32)
            count = np.zeros((height, width), dtype=np.int16)
            coadd[y, x], coadd_var[y, x] = sums["mean"][mine], sums["var"][mine]
            count[y, x] = sums["kept"][mine]
            results.append((patch, astro.write_coadd(
                patch, [v for v, _ in patch_warps], found[p]["weights"], coadd, coadd_var,
                count, skymap, str(ctx.workdir), ctx.params)))
        return plan.combine(results)

    @native("detect")
    def detect(self, step, state, ctx, plan):
        import base64

        skymap = state["skymap"]
        coadds = self._stack("coadds", PAIR, len(plan.partitions), skymap.patch_shape,
                             key="patch")
        for p, (_, path) in enumerate(plan.partitions):
            with fitsio.open_fits(path) as hdul:
                self._upload_plane(coadds, [fitsio.read_plane(hdul, name, path=path)
                                            for name in ("IMAGE", "VARIANCE")], {"patch": p})
        answers = self._rows(
            afl.stream_cells(coadds), "detect",
            step_args(ctx, state, patches=[list(patch) for patch, _ in plan.partitions],
                      saturated=base64.b64encode(state["saturated"].tobytes()).decode()),
            "p", len(plan.partitions))
        return plan.combine([(tuple(plan.partitions[a["p"]][0]), np.frombuffer(
            a["rows"], dtype=astro.CATALOG_DTYPE).copy()) for a in answers])
