"""The program SciDB's `stream()` runs on each instance for a step SciDB has no operator
for: it reads the instance's chunks, runs the suite's own kernel on each, answers each.

The TSV exchange of the stream plugin (Paradigm4/stream 19.11, src/TSVInterface.cpp):
SciDB sends a message per chunk, "N\\n" then N lines of tab-separated attribute values
(nulls as \\N), and waits for exactly one answer in the same framing ("0\\n": nothing
for now); after the last chunk it sends "0\\n" and reads one final answer. Only
attributes travel, so the compiled query `apply()`s the coordinates the kernel needs.
Values are printed with max_digits10 digits: text carries a float exactly.

Run as `python -u -m engines.scidb.stream_child STEP ARGS` (ARGS: zlib-compressed JSON in
base64url, so the command survives AFL's quoting and stays short: bash -c takes the whole
command as one argument, at most 128 KiB on Linux). The neuroscience steps answer lines of
tab-separated numbers; the astronomy steps run the kernels as they are, on FITS files the
child writes from its chunk's cells in a temporary folder, and answer one JSON line: the
kernel's output file (base64) and its small facts, so the client keeps the kernel's bytes.
"""
from __future__ import annotations

import base64
import json
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np


def encode_args(args: dict) -> str:
    return base64.urlsafe_b64encode(zlib.compress(json.dumps(args).encode(), 9)).decode()


def decode_args(text: str) -> dict:
    return json.loads(zlib.decompress(base64.urlsafe_b64decode(text.encode())))


def _table(lines: list[str], columns: int) -> np.ndarray:
    return np.array([line.split("\t") for line in lines], dtype=np.float64).reshape(-1,
                                                                                     columns)


def _fmt(value) -> str:
    return repr(float(value))  # shortest exact repr


def _params(args):
    from pipelines.neuro import NeuroParams

    return NeuroParams(**args["params"])


# -- the steps: chunk lines in, answer lines out ----------------------------------------

def brain_mask(lines, args):
    """One chunk, the whole mean b0 volume: cells (x, y, z, mean_b0) -> mask voxels."""
    from pipelines.neuro import brain_mask_kernel

    cells = _table(lines, 4)
    volume = np.zeros(args["shape"], dtype=np.float32)
    xyz = cells[:, :3].astype(np.int64)
    volume[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = cells[:, 3]
    mask = brain_mask_kernel(volume, _params(args))
    return ["\t".join(map(str, v)) for v in np.argwhere(mask)]


def noise_sigma(lines, args):
    """One chunk per volume: cells (vol, x, y, z, v) -> "vol\\tsigma"."""
    from pipelines.neuro import sigma_of

    cells = _table(lines, 5)
    params = _params(args)
    answer = []
    for k in np.unique(cells[:, 0]).astype(np.int64):
        volume = _volume(cells[cells[:, 0] == k], args["shape"])
        sigma = sigma_of(volume, params.sigma_coils, params.sigma_background_masking)
        answer.append(f"{k}\t{_fmt(sigma)}")
    return answer


def denoise(lines, args):
    """One chunk per volume, the mask joined in: cells (vol, x, y, z, v, m) -> the
    denoised volume's cells (vol, x, y, z, v), by the suite's own nlmeans call."""
    from pipelines.neuro import denoise_volume

    cells = _table(lines, 6)
    params = _params(args)
    answer = []
    for k in np.unique(cells[:, 0]).astype(np.int64):
        mine = cells[cells[:, 0] == k]
        volume = _volume(mine, args["shape"])
        mask = _volume(mine[:, [0, 1, 2, 3, 5]], args["shape"]).astype(bool)
        den = denoise_volume(volume, args["sigma"][k], mask, params.patch_radius,
                             params.block_radius, params.rician, params.nlmeans_method)
        answer += [f"{k}\t{x}\t{y}\t{z}\t{_fmt(den[x, y, z])}"
                   for x, y, z in mine[:, 1:4].astype(np.int64)]
    return answer


def fit_tensor(lines, args):
    """One chunk per voxel block, every volume, the mask joined in: cells
    (vol, x, y, z, v, m) -> (x, y, z, fa, md) of the block's voxels."""
    from pipelines.neuro import fit_block

    cells = _table(lines, 6)
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
    return [f"{x + lo[0]}\t{y + lo[1]}\t{z + lo[2]}\t{_fmt(fa[x, y, z])}\t{_fmt(md[x, y, z])}"
            for x, y, z in np.argwhere(np.ones(mask.shape, dtype=bool))]


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
    and its bytes (base64), or nothing when the kernel made none."""
    if path is None:
        return {"name": None, "file": None}
    return {"name": str(Path(path).relative_to(folder)),
            "file": base64.b64encode(Path(path).read_bytes()).decode()}


def calibrate(lines, args):
    """One chunk per CCD: cells (c, y, x, image, mask, variance) -> the calexp file, its
    facts and saturated stars (SATURATED_DTYPE bytes), as the kernel made them."""
    from pipelines import astro

    cells = _table(lines, 6)
    c = int(cells[0, 0])
    ccd = args["ccds"][c]
    params, _ = _astro(args)
    with tempfile.TemporaryDirectory() as folder:
        path = _ccd_file(folder, cells[:, 1:], ccd, c)
        source = astro.CcdInput(path, ccd["visit"], ccd["ccd"], tuple(ccd["shape"]),
                                np.zeros((4, 2)))
        _, out, facts = astro.calibrate_kernel(source, folder, params)
        if "saturated" in facts:
            facts["saturated"] = base64.b64encode(facts["saturated"].tobytes()).decode()
        return [json.dumps({"c": c, "input": path, "facts": facts, **_output(out, folder)})]


def warp(lines, args):
    """One chunk per (visit, patch): cells (part, c, y, x, image, mask, variance) of each
    calexp it takes -> the warp file the kernel made, if any."""
    from pipelines import astro

    cells = _table(lines, 7)
    j = int(cells[0, 0])
    part = args["parts"][j]
    params, skymap = _astro(args)
    with tempfile.TemporaryDirectory() as folder:
        paths = tuple(_ccd_file(folder, cells[cells[:, 1] == c][:, 2:], args["ccds"][c], c)
                      for c in part["ccds"])  # in the plan's order: the first one wins
        _, _, out = astro.warp_kernel((part["visit"], tuple(part["patch"]), paths), skymap,
                                      folder, params)
        return [json.dumps({"part": j, **_output(out, folder)})]


def coadd_clip(lines, args):
    """One chunk per patch: cells (p, n, y, x, image, variance) of its warps (a visit
    each n) -> each visit's weight and the cells present that the coadd does not keep
    (the clipping about the median, which AFL cannot express; AFL does the sums)."""
    from pipelines import astro

    cells = _table(lines, 6)
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
    return [json.dumps({"p": p, "weights": [float(w) for w in weights],
                        "dropped": dropped.tolist()})]


def detect(lines, args):
    """One chunk per patch: cells (p, y, x, image, variance) of its coadd -> the
    kernel's catalog rows (CATALOG_DTYPE bytes)."""
    from pipelines import astro

    cells = _table(lines, 5)
    p = int(cells[0, 0])
    params, skymap = _astro(args)
    saturated = np.frombuffer(base64.b64decode(args["saturated"]),
                              dtype=astro.SATURATED_DTYPE)
    with tempfile.TemporaryDirectory() as folder:
        path = _write_fits(Path(folder) / "coadd.fits", {}, _planes(
            cells[:, 1:], skymap.patch_shape, {"IMAGE": np.float32, "VARIANCE": np.float32}))
        _, rows = astro.detect_kernel((tuple(args["patches"][p]), path), skymap, params,
                                      saturated)
        return [json.dumps({"p": p, "rows": base64.b64encode(rows.tobytes()).decode()})]


def probe(lines, args):
    """The engine's start-up check: this Python and the suite import on the server."""
    import platform

    import pipelines.astro  # noqa: F401  the kernels' modules, and what they need
    import pipelines.neuro  # noqa: F401

    return [f"ok\t{platform.python_version()}"]


STEPS = {"brain_mask": brain_mask, "noise_sigma": noise_sigma, "denoise": denoise,
         "fit_tensor": fit_tensor, "calibrate": calibrate, "warp": warp,
         "coadd_clip": coadd_clip, "detect": detect, "probe": probe}


def serve(step, args, stdin, stdout) -> None:
    """The exchange: one answer per message, one final (empty) answer to the end."""
    def answer(lines):
        stdout.write(f"{len(lines)}\n" + "".join(line + "\n" for line in lines))  # one write
        stdout.flush()

    while True:
        header = stdin.readline()
        if not header:  # SciDB went away: nothing to answer
            return
        count = int(header)
        if count == 0:
            answer([])
            return
        answer(step([stdin.readline().rstrip("\n") for _ in range(count)], args))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve(STEPS[argv[0]], decode_args(argv[1]), sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
