"""What each Myria UDF runs on the workers: the suite's own kernels, under Python 3.

Started by the UDF shim (engines/myria/udf.py) as `python -u -m engines.myria.udf_child
STEP STAGE` in the suite's folder; it answers one request per UDF call until its stdin
closes (the worker process ended). A request is the call's tuples (framing in udf.py); the
first argument of every call is the run's key, which names the run's arguments, a JSON
file the engine wrote in the stage folder (STAGE/iab-KEY.json). A UDA's tuples begin with
its state, which these steps do not use. Every answer is a list of BLOB byte strings
(engines/myria/blob.py); an error is answered as one line, its traceback goes to stderr
(the Myria worker's log).
"""
from __future__ import annotations

import json
import platform
import struct
import sys
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
    import pipelines.neuro  # noqa: F401  the kernels' module, and what it needs

    return [f"ok\t{platform.python_version()}".encode()]


def mean_b0(tuples, args):
    """A group of b0 volumes (state, run, imgId, img) -> their float64 sum, summed in
    image order as pipelines.neuro.mean_b0_kernel sums them."""
    rows = _by_image(tuples, 2)
    total = _array(rows[0][3], f"volume {rows[0][2]}")[0].astype(np.float64)
    for row in rows[1:]:
        total += _array(row[3], f"volume {row[2]}")[0]
    return [blob.pack([total])]


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


STEPS = {"probe": probe, "mean_b0": mean_b0, "brain_mask": brain_mask,
         "noise_sigma": noise_sigma, "denoise": denoise, "split_blocks": split_blocks,
         "fit_tensor": fit_tensor}


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


UDAS = ("mean_b0", "noise_sigma", "denoise", "fit_tensor")  # their tuples begin with state


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve(argv[0], argv[1], sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
