"""What each Myria UDF runs on the workers: the suite's own kernels, under Python 3.

Started by the UDF shim (engines/myria/udf.py) as `python -u -m engines.myria.udf_child
STEP STAGE` in the suite's folder; it answers one request per UDF call until its stdin
closes (the worker process ended). A request is the call's tuples (framing in udf.py); the
first argument of every call is the run's key, which names the run's arguments, a JSON
file the engine wrote in the stage folder (STAGE/iab-KEY.json). A UDA's tuples begin with
its state, which these steps do not use. Every answer is a list of BLOB byte strings
(engines/myria/blob.py); an error is answered as one line, its traceback goes to stderr
(the Myria worker's log).

The astronomy kernels read and write FITS files by path: a file travels as a BLOB of its
bytes (one uint8 record), which the child writes into a temporary folder for the unchanged
kernel; the kernel's output file comes back as the answer's bytes, with its name under the
run folder and its key (so the client keeps the kernel's own bytes).
"""
from __future__ import annotations

import base64
import importlib
import json
import platform
import struct
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

from engines.myria import blob


class Arrived(ValueError):
    """A value that is not what the step's program sends (a null BLOB: DOWNLOADBLOB
    stores null when the worker cannot read the file)."""


def _array(value, what: str) -> list[np.ndarray]:
    if not isinstance(value, bytes):
        raise Arrived(f"{what} arrived as {value!r}, not a BLOB: a null BLOB is what "
                      f"DOWNLOADBLOB stores when a worker cannot read the stage file "
                      f"(is --myria-stage a folder every worker reads at the same path?)")
    return blob.unpack(value)


def _params(args):
    from pipelines.neuro import NeuroParams

    return NeuroParams(**args["params"])


def _by_image(tuples, first: int):
    """A UDA's rows (state, run, imgId, blobs...) in image order: the reference's."""
    return sorted(tuples, key=lambda t: t[first])


# -- the steps: a call's tuples and the run's arguments -> BLOB byte strings ---------------

def probe(tuples, args):
    """The engine's start-up check: this Python and the suite import on the worker."""
    import pipelines.astro  # noqa: F401  the kernels' modules, and what they need
    import pipelines.neuro  # noqa: F401

    return [f"ok\t{platform.python_version()}".encode()]


def mean_b0(tuples, args):
    """A group of b0 volumes (state, run, imgId, img) -> their float64 sum, in image
    order, by the kernel's own summation."""
    from pipelines.neuro import sum_volumes

    return [blob.pack([sum_volumes(_array(img, f"volume {k}")[0]
                                   for _, _, k, img in _by_image(tuples, 2))])]


def brain_mask(tuples, args):
    """(run, mean_b0) -> the mask (the suite's brain_mask_kernel)."""
    from pipelines.neuro import brain_mask_kernel

    (volume,) = _array(tuples[0][1], "the mean b0 volume")
    return [blob.pack([brain_mask_kernel(volume, _params(args))])]


def noise_sigma(tuples, args):
    """A group of volumes (state, run, imgId, img) -> their float64 sigmas, image order."""
    from pipelines.neuro import sigma_of

    params = _params(args)
    sigma = [sigma_of(_array(img, f"volume {k}")[0], params.sigma_coils,
                      params.sigma_background_masking)
             for _, _, k, img in _by_image(tuples, 2)]
    return [blob.pack([np.array(sigma, dtype=np.float64)])]


def denoise(tuples, args):
    """A group of volumes with the mask joined in (state, run, imgId, img, mask) -> the
    denoised volumes (float32, stacked in image order), by the suite's nlmeans call."""
    from pipelines.neuro import denoise_volume

    params = _params(args)
    out = []
    for _, _, k, img, mask in _by_image(tuples, 2):
        (volume,), (m,) = _array(img, f"volume {k}"), _array(mask, "the mask")
        out.append(denoise_volume(volume, args["sigma"][k], m, params.patch_radius,
                                  params.block_radius, params.rician,
                                  params.nlmeans_method))
    return [blob.pack([np.stack(out)])]


def split_blocks(tuples, args):
    """(run, imgId, img, mask) -> one BLOB per voxel block of the plan, in the plan's
    order (its index is the flatmap counter Myria adds: the block id): the volume's block
    and the mask's."""
    _, k, img, mask = tuples[0]
    (volume,), (m,) = _array(img, f"volume {k}"), _array(mask, "the mask")
    out = []
    for block in args["blocks"]:
        where = tuple(slice(lo, hi) for lo, hi in block)
        out.append(blob.pack([volume[where], m[where]]))
    return out


def fit_tensor(tuples, args):
    """A voxel block of every volume (state, run, imgId, block) -> its FA and MD, by the
    suite's fit_block, the volumes in image order."""
    from pipelines.neuro import fit_block

    rows = _by_image(tuples, 2)
    if [row[2] for row in rows] != list(range(len(args["bvals"]))):
        raise Arrived(f"a voxel block arrived with volumes {[row[2] for row in rows][:8]}"
                      f"..., not each of the {len(args['bvals'])} once")
    parts = [_array(row[3], f"a block of volume {row[2]}") for row in rows]
    data = np.stack([p[0] for p in parts], axis=-1)
    params = _params(args)
    fa, md = fit_block(data, parts[0][1], (np.asarray(args["bvals"]),
                                           np.asarray(args["bvecs"])),
                       params.b0_threshold, params.fit_method, params.min_signal)
    return [blob.pack([fa, md])]


# -- astronomy: FITS files as BLOBs ----------------------------------------------------------

FILE = "@file"  # where the engine's copy of a plan's record held its input file's path


def patch_id(patch, skymap) -> int:
    """A patch as one LONG column (its place in the sky map's grid): the group-by key."""
    return int(patch[0]) * skymap.patches_y + int(patch[1])


def as_tuples(value):
    """JSON's lists back into the plan's tuples (keys, records)."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def _swap(value, old, new):
    if isinstance(value, tuple):
        return tuple(_swap(v, old, new) for v in value)
    return new if value == old else value


def _astro(args):
    from pipelines import astro

    return astro.AstroParams(**args["params"]), astro.SkyMap(**args["skymap"])


def _function(name: str):
    """The plan's own function, named module:qualname (its shuffle's emit and make)."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _fits(value, folder, name: str) -> str:
    """A FITS file's BLOB written into `folder` for the kernel to read."""
    path = Path(folder) / name
    path.write_bytes(_array(value, name)[0].tobytes())
    return str(path)


def _text(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _answer(key, path, folder, facts=None, *arrays) -> list[bytes]:
    """An astronomy answer: (JSON of the key, the output file's name under the run folder
    and the kernel's facts; the file's bytes, empty if it made none; its arrays)."""
    name = None if path is None else str(Path(path).relative_to(folder))
    meta = json.dumps({"key": key, "name": name, "facts": facts or {}}).encode()
    data = b"" if path is None else Path(path).read_bytes()
    return [blob.pack([_text(meta), _text(data), *arrays])]


def calibrate(tuples, args):
    """(run, visit, ccd, raw file) -> its calexp file, facts and saturated stars, by the
    suite's calibrate_kernel (a reason names the CCD's own path, not the copy's)."""
    from pipelines import astro

    _, visit, ccd, img = tuples[0]
    params, _ = _astro(args)
    original, shape = {(v, c): (p, s) for v, c, p, s in args["ccds"]}[(visit, ccd)]
    with tempfile.TemporaryDirectory() as folder:
        path = _fits(img, folder, "raw.fits")
        key, out, facts = astro.calibrate_kernel(
            astro.CcdInput(path, visit, ccd, tuple(shape), np.zeros((4, 2))), folder, params)
        stars = [facts.pop("saturated")] if "saturated" in facts else []
        if "reason" in facts:
            facts["reason"] = facts["reason"].replace(path, original)
        return _answer(key, out, folder, facts, *stars)


def _records(args) -> dict:
    """The plan's shuffle records, by the key of the tuple that holds each one's file:
    key -> (record index, record)."""
    return {as_tuples(k): (i, as_tuples(r)) for i, (k, r) in enumerate(args["records"])}


def _regrouped(tuples, args, folder, patch_of):
    """A group's rows (state, run, record key..., patch, file) as the plan's shuffle makes
    the group's partition: each row's record (its file this child's copy) through the
    plan's emit; the values emitted under this group's key, in record order, through the
    plan's make. `patch_of`: the patch of an emitted key."""
    emit, make = _function(args["emit"]), _function(args["make"])
    records, width = _records(args), len(args["records"][0][0])
    _, skymap = _astro(args)
    found, key = [], None
    for row in tuples:
        index, record = records[tuple(row[2:2 + width])]
        path = _fits(row[-1], folder, f"in_{index}.fits")
        for emitted, value in emit(_swap(record, FILE, path)):
            if patch_id(patch_of(emitted), skymap) == row[-2]:
                key = emitted
                found.append((index, value))
    return make(key, [value for _, value in sorted(found, key=lambda f: f[0])])


def warp_emit(tuples, args):
    """(run, visit, ccd) -> the patch of each (visit, patch) the plan's emit makes of the
    CCD's record: a LONG each, so the query has a row per patch (the study's flatMap)."""
    _, visit, ccd = tuples[0]
    _, skymap = _astro(args)
    _, record = _records(args)[(visit, ccd)]
    return [struct.pack(">q", patch_id(key[1], skymap))
            for key, _ in _function(args["emit"])(record)]


def warp(tuples, args):
    """A (visit, patch) group's calexps (state, run, visit, ccd, patch, file) -> its warp
    file, by the suite's warp_kernel on the partition the plan's make makes."""
    from pipelines import astro

    params, skymap = _astro(args)
    with tempfile.TemporaryDirectory() as folder:
        part = _regrouped(tuples, args, folder, lambda key: key[1])
        visit, patch, out = astro.warp_kernel(part, skymap, folder, params)
        return _answer((visit, patch), out, folder)


def coadd(tuples, args):
    """A patch's warps (state, run, visit, patch, file) -> its coadd file, by the suite's
    coadd_kernel on the partition the plan's make makes."""
    from pipelines import astro

    params, skymap = _astro(args)
    with tempfile.TemporaryDirectory() as folder:
        part = _regrouped(tuples, args, folder, lambda key: key)
        patch, out = astro.coadd_kernel(part, skymap, folder, params, args["strip_rows"])
        return _answer(patch, out, folder)


def detect(tuples, args):
    """(run, patch, coadd file) -> the patch's catalog rows (CATALOG_DTYPE), by the
    suite's detect_kernel with the calibration's saturated stars."""
    from pipelines import astro

    _, n, img = tuples[0]
    params, skymap = _astro(args)
    saturated = np.frombuffer(base64.b64decode(args["saturated"]),
                              dtype=astro.SATURATED_DTYPE)
    with tempfile.TemporaryDirectory() as folder:
        patch, rows = astro.detect_kernel(
            (divmod(int(n), skymap.patches_y), _fits(img, folder, "coadd.fits")), skymap,
            params, saturated)
        return _answer(patch, None, folder, None, rows)


STEPS = {"probe": probe, "mean_b0": mean_b0, "brain_mask": brain_mask,
         "noise_sigma": noise_sigma, "denoise": denoise, "split_blocks": split_blocks,
         "fit_tensor": fit_tensor, "calibrate": calibrate, "warp_emit": warp_emit,
         "warp": warp, "coadd": coadd, "detect": detect}


# -- the exchange ------------------------------------------------------------------------

def read_request(stream):
    """One call's tuples, or None at the end of input."""
    kind = stream.read(1)
    if not kind:
        return None
    if kind != b"R":
        raise ValueError(f"not a request: {kind!r}")
    tuples = []
    for _ in range(_int(stream, ">i")):
        values = []
        for _ in range(_int(stream, ">i")):
            tag = _exact(stream, 1)
            if tag == b"L":
                values.append(_int(stream, ">q"))
            elif tag == b"D":
                values.append(struct.unpack(">d", _exact(stream, 8))[0])
            elif tag == b"B":
                values.append(_exact(stream, _int(stream, ">I")))
            else:
                raise ValueError(f"not a value tag: {tag!r}")
        tuples.append(values)
    return tuples


def write_answer(stream, results: list[bytes]) -> None:
    stream.write(b"O" + struct.pack(">i", len(results)) + b"".join(
        struct.pack(">I", len(r)) + r for r in results))
    stream.flush()


def write_error(stream, text: str) -> None:
    data = text.encode()
    stream.write(b"E" + struct.pack(">I", len(data)) + data)
    stream.flush()


def _exact(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the request ended early")
    return data


def _int(stream, fmt: str) -> int:
    return struct.unpack(fmt, _exact(stream, struct.calcsize(fmt)))[0]


def serve(step: str, stage: str, stdin, stdout, stderr) -> None:
    runs: dict[int, dict] = {}
    while True:
        tuples = read_request(stdin)
        if tuples is None:
            return
        try:
            key = tuples[0][1 if step in UDAS else 0]
            if key not in runs:
                runs[key] = json.loads((Path(stage) / f"iab-{key}.json").read_text())
            write_answer(stdout, STEPS[step](tuples, runs[key]))
        except Exception as exc:  # answered, so the query ends in ERROR with this line
            traceback.print_exc(file=stderr)
            stderr.flush()
            first = (str(exc).strip().splitlines() or [""])[0]
            write_error(stdout, f"{step}: {type(exc).__name__}: {first}"[:2000])


# their tuples begin with state
UDAS = ("mean_b0", "noise_sigma", "denoise", "fit_tensor", "warp", "coadd")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve(argv[0], argv[1], sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
