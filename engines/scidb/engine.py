"""The SciDB engine: the neuroscience steps run inside a SciDB server the user runs,
through its shim HTTP service (`--scidb-url`). Nothing here starts a server, and CI has
never run this engine against one: its pieces are tested on their own (the binary format,
the shim client against shim's replies, the stream child against the reference's
kernels, the compiled AFL against reviewed snapshots).

Each step: the inputs the step needs are put into SciDB as binary (cached by file for the
session), the step's AFL runs (engines/scidb/afl.py), its results come back as binary.
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

from pipelines import nifti
from pipelines.errors import EngineUnavailable

from ..base import Engine, native
from . import afl, binary
from .shim import Shim, ShimError
from .stream_child import encode_args

SUITE = Path(__file__).resolve().parents[2]
ASTRO = ("not compiled for SciDB yet: the astronomy steps are the next part of this "
         "engine")


class SciDBEngine(Engine):
    name = "scidb"
    not_implemented = {"calibrate": ASTRO, "warp": ASTRO, "coadd": ASTRO, "detect": ASTRO}

    def __init__(self, workers: int | None = None, url: str | None = None,
                 python: str | None = None, suite: str | None = None):
        super().__init__(workers)
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
                         os.environ.get("SHIM_PASSWORD")).open()
        try:
            self._check_server()
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
                f"paths on the server; Python >= 3.11 with the suite's packages): "
                f"{(exc.text.strip().splitlines() or [str(exc)])[0][:300]}") from None
        if not answer or answer[0][0] != "ok":
            raise EngineUnavailable(f"SciDB at {self.url}: the suite's child answered "
                                    f"{answer[:1]!r}, not 'ok'")

    def close(self) -> None:
        if self.shim is None:
            return
        for name in reversed(self.arrays):
            try:
                self.shim.execute(afl.remove(name))
            except ShimError as exc:
                if exc.session_ended:
                    break  # the server or the session is gone: it keeps the rest
            except EngineUnavailable:
                break
        self.arrays.clear()
        self.loaded.clear()
        self.shim.close()
        self.shim = None

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
        return [s for s in binary.decode_strings(self.shim.read_bytes()) if s is not None]

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
            series = afl.Series(self._array("series"), tuple(shape), volumes)
            self.shim.execute(afl.create(series))
            for k in range(volumes):
                self._upload(series, nifti.read_volume(path, k), k)
                self._report("ingest", k + 1, volumes)
            self.loaded[key] = series
        return self.loaded[key]

    def _mask(self, mask: np.ndarray, chunk=None) -> afl.Volume:
        """The mask in SciDB, chunked over x, y, z as the series it is joined to."""
        array = afl.Volume(self._array("mask"), mask.shape, "m", "bool", chunk)
        self.shim.execute(afl.create(array))
        self._upload(array, mask.astype(np.float32))
        return array

    def _stream(self, source: str, step: str, args: dict) -> list[list[str]]:
        """The stream child's answers (lines of tab-separated fields) for `source`."""
        return [line for answer in self._answers(source, step, args) for line in answer]

    def _answers(self, source: str, step: str, args: dict):
        """The stream child's answers for `source`, one at a time (an answer is a chunk's:
        a volume's denoised cells; all of them at once would not fit the client)."""
        command = (f"cd {shlex.quote(self.suite)} && {shlex.quote(self.python)} -u -m "
                   f"engines.scidb.stream_child {step} {encode_args(args)}")
        target = self._array(step)
        self.shim.execute(afl.stream(source, command, target))
        query, fmt = afl.answer_positions(target)
        self.shim.execute(query, save=fmt)
        where = binary.decode(self.shim.read_bytes(), binary.Format.parse(fmt, "ic"))
        for instance, chunk in zip(where["i"], where["c"]):
            for text in self._strings(afl.answer(target, int(instance), int(chunk))):
                yield [line.split("\t") for line in text.splitlines() if line]

    @staticmethod
    def _params(ctx) -> dict:
        import dataclasses

        return dataclasses.asdict(ctx.params)

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
        lines = self._stream(afl.with_coordinates(mean_b0.name, four_d=False), "brain_mask",
                             {"shape": list(mean_b0.shape), "params": self._params(ctx)})
        mask = np.zeros(mean_b0.shape, dtype=bool)
        if lines:
            xyz = np.array(lines, dtype=np.int64)
            mask[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = True
        return plan.combine([mask])

    @native("noise_sigma")
    def noise_sigma(self, step, state, ctx, plan):
        dwi = self._series(state["dwi"], state["shape"], state["n_volumes"])
        lines = self._stream(afl.with_coordinates(dwi.name, four_d=True), "noise_sigma",
                             {"shape": list(state["shape"]), "params": self._params(ctx)})
        sigma = {int(k): float(s) for k, s in lines}
        return plan.combine([[sigma[k] for k in group] for _, group in plan.partitions])

    @native("denoise")
    def denoise(self, step, state, ctx, plan):
        dwi = self._series(state["dwi"], state["shape"], state["n_volumes"])
        mask = self._mask(state["mask"])
        answers = self._answers(afl.with_mask(dwi, mask), "denoise",
                                {"shape": list(state["shape"]), "params": self._params(ctx),
                                 "sigma": [float(s) for s in state["sigma"]]})
        out = plan.partitions[0][1]  # the plan made the output file
        written = set()
        for answer in answers:  # a chunk's answer: one volume's cells
            if not answer:
                continue
            cells = np.array(answer, dtype=np.float64)
            for k in np.unique(cells[:, 0]).astype(np.int64):
                mine = cells[cells[:, 0] == k]
                volume = np.zeros(state["shape"], dtype=np.float32)
                xyz = mine[:, 1:4].astype(np.int64)
                volume[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = mine[:, 4]
                nifti.write_volume(out, int(k), volume)
                written.add(int(k))
            self._report(step.name, len(written), state["n_volumes"])
        missing = sorted(set(range(state["n_volumes"])) - written)
        if missing:
            raise EngineUnavailable(f"SciDB at {self.url}: denoise returned no volume "
                                    f"{missing[0]} ({len(missing)} missing)")
        return plan.combine([])

    @native("fit_tensor")
    def fit_tensor(self, step, state, ctx, plan):
        denoised = self._series(state["denoised"], state["shape"], state["n_volumes"])
        block = tuple(ctx.partitioning.block)
        blocks = self._array("blocks")
        self.shim.execute(afl.rechunk(denoised, block, blocks))
        rechunked = afl.Series(blocks, denoised.shape, denoised.volumes, block,
                               volumes_per_chunk=denoised.volumes)
        mask = self._mask(state["mask"], chunk=block)
        lines = self._stream(afl.with_mask(rechunked, mask), "fit_tensor",
                             {"params": self._params(ctx),
                              "bvals": np.asarray(state["bvals"]).tolist(),
                              "bvecs": np.asarray(state["bvecs"]).tolist()})
        fa = np.zeros(state["shape"], dtype=np.float32)
        md = np.zeros(state["shape"], dtype=np.float32)
        if lines:
            cells = np.array(lines, dtype=np.float64)
            xyz = cells[:, :3].astype(np.int64)
            fa[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = cells[:, 3]
            md[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = cells[:, 4]
        return {"fa": fa, "md": md}
