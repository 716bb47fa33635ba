"""The SciDB engine's exchange with stream(), measured on one step's messages: the stream
plugin's TSV format (what the engine spoke before, and the study's SciDB cost) against
its Feather V1 format (what engines/scidb/stream_child.py speaks), for denoise: a
volume's cells in (vol, x, y, z, v, m), its denoised cells out (vol, x, y, z, v).

    .venv/bin/pip install 'pyarrow>=14'   # the scidb extra
    .venv/bin/python tools/scidb_feather_vs_tsv.py [dataset] [volume]

Prints the bytes of one message each way and the median of 7 runs of each side's
encoding and decoding, all in Python here: on a server SciDB's side is the plugin's C++
(TSVInterface.cpp, FeatherInterface.cpp), so only the child's side (decode the message,
encode the answer) is what the suite runs. The TSV codec is the child's before Feather:
floats as SciDB prints them (max_digits10) and as the child printed them (repr).
"""
from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = 7


def tsv_encode(columns, float_format) -> bytes:
    names = list(columns)
    fmts = [float_format if columns[n].dtype.kind == "f" else "{}" for n in names]
    lines = ["\t".join(f.format(v) for f, v in zip(fmts, row))
             for row in zip(*(columns[n].tolist() for n in names))]
    return (f"{len(lines)}\n" + "".join(line + "\n" for line in lines)).encode()


def tsv_decode(data: bytes) -> np.ndarray:
    text = io.StringIO(data.decode())
    count = int(text.readline())
    return np.array([text.readline().rstrip("\n").split("\t") for _ in range(count)],
                    dtype=np.float64)


def feather_encode(columns) -> bytes:
    from engines.scidb.stream_child import answer_message

    return answer_message(columns, [(n, "double" if c.dtype.kind == "f" else "int64")
                                    for n, c in columns.items()])


def feather_decode(data: bytes) -> np.ndarray:
    from engines.scidb.stream_child import cells_of, read_message

    return cells_of(read_message(io.BytesIO(data)))


def timed(fn, *args) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(dataset="phantom-small", volume="1"):
    import nibabel as nib

    from fixtures.datasets import load_dataset
    from fixtures.reference import reference_run
    from pipelines import nifti

    run = reference_run(load_dataset(dataset).inputs[0])
    k = int(volume)
    data = nifti.read_volume(run.source.dwi, k)
    den = np.asarray(nib.load(run.state["denoised"]).dataobj)[..., k]
    x, y, z = np.indices(data.shape).reshape(3, -1)
    sent = {"k": np.full(x.size, k), "xi": x, "yi": y, "zi": z,
            "v64": data.ravel().astype(np.float64),
            "mi": run.state["mask"].ravel().astype(np.int64)}
    answer = {"vol": sent["k"], "x": x, "y": y, "z": z, "v": den.ravel().astype(np.float64)}
    print(f"{dataset}, denoise, volume {k} {data.shape}: {x.size} cells; median of {RUNS}")
    print(f"{'':22}{'bytes':>12}{'encode s':>10}{'decode s':>10}  (Python, here)")
    for what, columns, digits in (("message, SciDB->child", sent, "{:.9g}"),
                                  ("answer, child->SciDB", answer, "{!r}")):
        for name, enc, dec in (("TSV", lambda c: tsv_encode(c, digits), tsv_decode),
                               ("Feather", feather_encode, feather_decode)):
            blob = enc(columns)
            # the values are float32: exact either way (TSV: once back in float32)
            assert np.array_equal(dec(blob).astype(np.float32), np.column_stack(
                list(columns.values())).astype(np.float32))
            print(f"{what[:8]} {name:<13}{len(blob):>12,}{timed(enc, columns):>10.4f}"
                  f"{timed(dec, blob):>10.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
