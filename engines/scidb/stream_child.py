"""The program SciDB's `stream()` runs on each instance for a step SciDB has no operator
for: it reads the instance's chunks, runs the suite's own kernel on each, answers each.

The Feather exchange of the stream plugin (Paradigm4/stream 19.11 @434a278, built on
Arrow 0.16; src/FeatherInterface.cpp): for each non-empty chunk SciDB writes a uint64
byte count (native order: little-endian on x86) and a Feather V1 table, one column per
attribute, named by it; only int64, double, string and binary attributes can travel
(writeFeather, l.219-353), so the compiled query casts floats to double, and only
attributes travel, so it `apply()`s the coordinates the kernel needs. SciDB then reads
exactly one answer in the same framing (readFeather, l.363-539): a count of 0 is no data;
otherwise a Feather V1 table with the columns the query's `types:` declares, as many
(l.392: checked) and of exactly those Arrow types (l.423-518: not checked, read as
declared), one chunk each (l.408). The end is a count of 0 (writeFinalFeather, l.355),
answered once more. Every non-empty answer becomes one `chunk_no` of the result
<names: types>[instance_id, chunk_no, value_no] (l.97-123, l.538). So nothing travels as
text: each step answers the typed columns of ANSWERS.

Run as `python -u -m engines.scidb.stream_child STEP ARGS` (ARGS: zlib-compressed JSON in
base64url, so the command survives AFL's quoting and stays short: bash -c takes the whole
command as one argument, at most 128 KiB on Linux). Needs pyarrow (the `scidb` extra) on
the server. The astronomy steps run the kernels as they are, on FITS files the child
writes from its chunk's cells in a temporary folder, and answer the kernel's output file
as bytes, so the client keeps the kernel's bytes.
"""
from __future__ import annotations

import base64
import json
import struct
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np


def encode_args(args: dict) -> str:
    return base64.urlsafe_b64encode(zlib.compress(json.dumps(args).encode(), 9)).decode()


def decode_args(text: str) -> dict:
    return json.loads(zlib.decompress(base64.urlsafe_b64decode(text.encode())))


# each step's answer: its columns (name, `types:` of stream()), in order
ANSWERS = {
    "brain_mask": (("x", "int64"), ("y", "int64"), ("z", "int64")),
    "noise_sigma": (("vol", "int64"), ("sigma", "double")),
    "denoise": (("vol", "int64"), ("x", "int64"), ("y", "int64"), ("z", "int64"),
                ("v", "double")),
    "fit_tensor": (("x", "int64"), ("y", "int64"), ("z", "int64"), ("fa", "double"),
                   ("md", "double")),
    "calibrate": (("c", "int64"), ("name", "binary"), ("file", "binary"),
                  ("saturated", "binary"), ("reason", "binary"),
                  ("cosmic_ray_pixels", "int64"), ("background_median", "double")),
    "warp": (("part", "int64"), ("name", "binary"), ("file", "binary")),
    "coadd_clip": (("p", "int64"), ("weights", "binary"), ("dropped", "binary")),
    "detect": (("p", "int64"), ("rows", "binary")),
    "probe": (("python", "binary"), ("pyarrow", "binary")),
}
# `types:` name -> (pyarrow type, numpy type its values are made of; None: Python objects)
ARROW = {"int64": ("int64", "<i8"), "double": ("float64", "<f8"),
         "binary": ("binary", None), "string": ("string", None)}


def _params(args):
    from pipelines.neuro import NeuroParams

    return NeuroParams(**args["params"])


# -- the steps: a chunk's cells in, answer columns out ----------------------------------

def brain_mask(cells, args):
    """One chunk, the whole mean b0 volume: cells (x, y, z, mean_b0) -> mask voxels."""
    from pipelines.neuro import brain_mask_kernel

    volume = np.zeros(args["shape"], dtype=np.float32)
    xyz = cells[:, :3].astype(np.int64)
    volume[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = cells[:, 3]
    mask = brain_mask_kernel(volume, _params(args))
    return dict(zip("xyz", np.nonzero(mask)))


def noise_sigma(cells, args):
    """One chunk per volume: cells (vol, x, y, z, v) -> (vol, sigma)."""
    from pipelines.neuro import sigma_of

    params = _params(args)
    vols = np.unique(cells[:, 0]).astype(np.int64)
    return {"vol": vols, "sigma": [
        sigma_of(_volume(cells[cells[:, 0] == k], args["shape"]), params.sigma_coils,
                 params.sigma_background_masking) for k in vols]}


def denoise(cells, args):
    """One chunk per volume, the mask joined in: cells (vol, x, y, z, v, m) -> the
    denoised volume's cells (vol, x, y, z, v), by the suite's own nlmeans call."""
    from pipelines.neuro import denoise_volume

    params = _params(args)
    answer = []
    for k in np.unique(cells[:, 0]).astype(np.int64):
        mine = cells[cells[:, 0] == k]
        volume = _volume(mine, args["shape"])
        mask = _volume(mine[:, [0, 1, 2, 3, 5]], args["shape"]).astype(bool)
        den = denoise_volume(volume, args["sigma"][k], mask, params.patch_radius,
                             params.block_radius, params.rician, params.nlmeans_method)
        x, y, z = mine[:, 1:4].astype(np.int64).T
        answer.append((np.full(len(x), k), x, y, z, den[x, y, z]))
    return dict(zip(("vol", "x", "y", "z", "v"),
                    (np.concatenate(c) for c in zip(*answer)))) if answer else {}


def fit_tensor(cells, args):
    """One chunk per voxel block, every volume, the mask joined in: cells
    (vol, x, y, z, v, m) -> (x, y, z, fa, md) of the block's voxels."""
    from pipelines.neuro import fit_block

    xyz = cells[:, 1:4].astype(np.int64)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0) + 1
    n_vol = len(args["bvals"])
    data = np.zeros(tuple(hi - lo) + (n_vol,), dtype=np.float32)
    mask = np.zeros(tuple(hi - lo), dtype=bool)
    local = xyz - lo
    data[local[:, 0], local[:, 1], local[:, 2], cells[:, 0].astype(np.int64)] = cells[:, 4]
    mask[local[:, 0], local[:, 1], local[:, 2]] = cells[:, 5] != 0
    params = _params(args)
    fa, md = fit_block(data, mask, (np.asarray(args["bvals"]), np.asarray(args["bvecs"])),
                       params.b0_threshold, params.fit_method, params.min_signal)
    x, y, z = np.indices(mask.shape).reshape(3, -1)
    return {"x": x + lo[0], "y": y + lo[1], "z": z + lo[2], "fa": fa[x, y, z],
            "md": md[x, y, z]}


def _volume(cells, shape) -> np.ndarray:
    """(vol, x, y, z, v) cells of one volume as a float32 volume (zero where absent)."""
    volume = np.zeros(shape, dtype=np.float32)
    xyz = cells[:, 1:4].astype(np.int64)
    volume[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = cells[:, 4]
    return volume


# -- astronomy: the kernels on FITS files made from the chunk's cells ---------------------

def _astro(args):
    from pipelines import astro

    return astro.AstroParams(**args["params"]), astro.SkyMap(**args["skymap"])


def _planes(cells, shape, types) -> dict:
    """Cells (y, x, value per plane) as planes of `shape`, NaN (0 for integers) where a
    cell is absent; `types`: plane name -> numpy type, in the cells' column order."""
    yx = cells[:, :2].astype(np.int64)
    out = {}
    for column, (name, dtype) in enumerate(types.items(), 2):
        plane = np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype=dtype)
        plane[yx[:, 0], yx[:, 1]] = cells[:, column]
        out[name] = plane
    return out


def _write_fits(path, headers: dict, planes: dict) -> str:
    """A FITS file of `planes` with the headers the client sent (text, one card a line)."""
    from astropy.io import fits

    from pipelines import fitsio

    def header(name):
        return fits.Header.fromstring(headers[name], sep="\n") if name in headers else None

    fitsio.write_planes(Path(path), header("PRIMARY"),
                        {name: (plane, header(name)) for name, plane in planes.items()})
    return str(path)


CCD_PLANES = {"IMAGE": np.float32, "MASK": np.int32, "VARIANCE": np.float32}


def _ccd_file(folder, cells, ccd, c: int) -> str:
    """CCD `c`'s file (raw or calibrated) from cells (y, x, image, mask, variance)."""
    return _write_fits(Path(folder) / f"in_{c}.fits", ccd["headers"],
                       _planes(cells, ccd["shape"], CCD_PLANES))


def _output(path, folder) -> dict:
    """The kernel's output file as the answer carries it: its name under the run folder
    and its bytes, or nulls when the kernel made none."""
    if path is None:
        return {"name": [None], "file": [None]}
    return {"name": [str(Path(path).relative_to(folder)).encode()],
            "file": [Path(path).read_bytes()]}


def calibrate(cells, args):
    """One chunk per CCD: cells (c, y, x, image, mask, variance) -> the calexp file and
    the kernel's facts: its saturated stars (SATURATED_DTYPE bytes) and numbers, or the
    reason it made no file (naming the client's file, not the child's copy)."""
    from pipelines import astro

    c = int(cells[0, 0])
    ccd = args["ccds"][c]
    params, _ = _astro(args)
    with tempfile.TemporaryDirectory() as folder:
        path = _ccd_file(folder, cells[:, 1:], ccd, c)
        source = astro.CcdInput(path, ccd["visit"], ccd["ccd"], tuple(ccd["shape"]),
                                np.zeros((4, 2)))
        _, out, facts = astro.calibrate_kernel(source, folder, params)
        reason = facts.get("reason")
        return {"c": [c], **_output(out, folder),
                "saturated": [facts["saturated"].tobytes() if "saturated" in facts else None],
                "reason": [reason.replace(path, ccd["path"]).encode() if reason else None],
                "cosmic_ray_pixels": [facts.get("cosmic_ray_pixels", 0)],
                "background_median": [facts.get("background_median", np.nan)]}


def warp(cells, args):
    """One chunk per (visit, patch): cells (part, c, y, x, image, mask, variance) of each
    calexp it takes -> the warp file the kernel made, if any."""
    from pipelines import astro

    j = int(cells[0, 0])
    part = args["parts"][j]
    params, skymap = _astro(args)
    with tempfile.TemporaryDirectory() as folder:
        paths = tuple(_ccd_file(folder, cells[cells[:, 1] == c][:, 2:], args["ccds"][c], c)
                      for c in part["ccds"])  # in the plan's order: the first one wins
        _, _, out = astro.warp_kernel((part["visit"], tuple(part["patch"]), paths), skymap,
                                      folder, params)
        return {"part": [j], **_output(out, folder)}


def coadd_clip(cells, args):
    """One chunk per patch: cells (p, n, y, x, image, variance) of its warps (a visit
    each n) -> each visit's weight (float64 bytes) and the cells present that the coadd
    does not keep (int64 (n, y, x) bytes): the clipping about the median, which AFL
    cannot express; AFL does the sums."""
    from pipelines import astro

    p = int(cells[0, 0])
    params, skymap = _astro(args)
    shape = (args["visits"][p], *skymap.patch_shape)
    nyx = cells[:, 1:4].astype(np.int64)
    image = np.full(shape, np.nan)
    variance = np.full(shape, np.nan)
    image[nyx[:, 0], nyx[:, 1], nyx[:, 2]] = cells[:, 4]
    variance[nyx[:, 0], nyx[:, 1], nyx[:, 2]] = cells[:, 5]
    # the kernel weighs the float32 plane as read from its file
    weights = [astro.visit_weight(v.astype(np.float32), params) for v in variance]
    present = np.zeros(shape, dtype=bool)
    present[nyx[:, 0], nyx[:, 1], nyx[:, 2]] = True
    dropped = np.argwhere(present & ~astro.kept_values(image, variance, params))
    return {"p": [p], "weights": [np.asarray(weights, dtype="<f8").tobytes()],
            "dropped": [dropped.astype("<i8").tobytes()]}


def detect(cells, args):
    """One chunk per patch: cells (p, y, x, image, variance) of its coadd -> the
    kernel's catalog rows (CATALOG_DTYPE bytes)."""
    from pipelines import astro

    p = int(cells[0, 0])
    params, skymap = _astro(args)
    saturated = np.frombuffer(base64.b64decode(args["saturated"]),
                              dtype=astro.SATURATED_DTYPE)
    with tempfile.TemporaryDirectory() as folder:
        path = _write_fits(Path(folder) / "coadd.fits", {}, _planes(
            cells[:, 1:], skymap.patch_shape, {"IMAGE": np.float32, "VARIANCE": np.float32}))
        _, rows = astro.detect_kernel((tuple(args["patches"][p]), path), skymap, params,
                                      saturated)
        return {"p": [p], "rows": [rows.tobytes()]}


def probe(cells, args):
    """The engine's start-up check: this Python, pyarrow and the suite import on the
    server."""
    import platform

    import pyarrow

    import pipelines.astro  # noqa: F401  the kernels' modules, and what they need
    import pipelines.neuro  # noqa: F401

    return {"python": [platform.python_version().encode()],
            "pyarrow": [pyarrow.__version__.encode()]}


STEPS = {"brain_mask": brain_mask, "noise_sigma": noise_sigma, "denoise": denoise,
         "fit_tensor": fit_tensor, "calibrate": calibrate, "warp": warp,
         "coadd_clip": coadd_clip, "detect": detect, "probe": probe}


# -- the exchange ---------------------------------------------------------------------------

def read_message(stdin):
    """One message from SciDB: its cells as columns (pyarrow Table), None at the end (a
    count of 0); EOFError when SciDB went away."""
    import pyarrow as pa
    from pyarrow import feather

    head = stdin.read(8)
    if len(head) < 8:
        raise EOFError
    size = struct.unpack("<Q", head)[0]
    if not size:
        return None
    with warnings.catch_warnings():  # V1, the plugin's; pyarrow 25 deprecates it
        warnings.simplefilter("ignore", DeprecationWarning)
        return feather.read_table(pa.BufferReader(stdin.read(size)))


def answer_message(columns: dict, answer) -> bytes:
    """An answer as SciDB reads it: the count, then a Feather V1 table of the columns
    `answer` ((name, type) of ANSWERS) declares, in their Arrow types; no rows: a count
    of 0 (readFeather reads nothing more)."""
    import pyarrow as pa
    from pyarrow import feather

    if not columns or not len(columns[answer[0][0]]):
        return struct.pack("<Q", 0)
    arrays = {}
    for name, kind in answer:
        arrow, numpy = ARROW[kind]
        values = np.asarray(columns[name], dtype=numpy) if numpy else list(columns[name])
        arrays[name] = pa.array(values, type=getattr(pa, arrow)())
    table = pa.table(arrays)
    sink = pa.BufferOutputStream()
    with warnings.catch_warnings():  # the plugin (Arrow 0.16) reads V1 only
        warnings.simplefilter("ignore", DeprecationWarning)
        feather.write_feather(table, sink, version=1)
    data = sink.getvalue().to_pybytes()
    return struct.pack("<Q", len(data)) + data


def cells_of(table) -> np.ndarray:
    """A message's columns as one float64 table (coordinates and values alike: exact for
    int64 coordinates and for float32 values sent as double)."""
    return np.column_stack([c.to_numpy(zero_copy_only=False).astype(np.float64)
                            for c in table.columns])


def serve(step: str, args, stdin, stdout) -> None:
    """The exchange: one answer per message, one final (empty) answer to the end."""
    while True:
        try:
            table = read_message(stdin)
        except EOFError:  # SciDB went away: nothing to answer
            return
        columns = {} if table is None else STEPS[step](cells_of(table), args)
        stdout.write(answer_message(columns, ANSWERS[step]))  # one write, then flush
        stdout.flush()
        if table is None:
            return


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve(argv[0], decode_args(argv[1]), sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
