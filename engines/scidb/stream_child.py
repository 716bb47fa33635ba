"""The program SciDB's `stream()` runs on each instance for a step SciDB has no operator
for: it reads the instance's chunks, runs the suite's own kernel on each, answers each.

The TSV exchange of the stream plugin (Paradigm4/stream 19.11, src/TSVInterface.cpp):
SciDB sends a message per chunk, "N\\n" then N lines of tab-separated attribute values
(nulls as \\N), and waits for exactly one answer in the same framing ("0\\n": nothing
for now); after the last chunk it sends "0\\n" and reads one final answer. Only
attributes travel, so the compiled query `apply()`s the coordinates the kernel needs.
Values are printed with max_digits10 digits: text carries a float exactly.

Run as `python -u -m engines.scidb.stream_child STEP ARGS` (ARGS: base64url JSON, so the
command survives AFL's quoting); every step answers lines of tab-separated numbers.
"""
from __future__ import annotations

import base64
import json
import sys

import numpy as np


def encode_args(args: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(args).encode()).decode()


def decode_args(text: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(text.encode()))


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


def probe(lines, args):
    """The engine's start-up check: this Python and the suite import on the server."""
    import platform

    import pipelines.neuro  # noqa: F401  the kernels' module, and what it needs

    return [f"ok\t{platform.python_version()}"]


STEPS = {"brain_mask": brain_mask, "noise_sigma": noise_sigma, "denoise": denoise,
         "fit_tensor": fit_tensor, "probe": probe}


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
