"""The bytes of a Myria BLOB that holds arrays, both ways.

Myria's Python workers unpickle every BLOB argument before a UDF sees it and pickle every
BLOB result (protocol 2, under Python 2). A NumPy pickle is not a safe carrier: one made
by NumPy 2 may not load in a worker's Python 2 NumPy. So a BLOB here is a protocol-2
pickle of a *byte string* only, and that string holds the arrays in NumPy's own `.npy`
format (version 1.0: a small text header with dtype and shape, then the raw little-endian
data), one record after another. Python 2 loads the pickle as a `str`, Python 3 as
`bytes` (with `encoding='bytes'`); neither needs NumPy to carry it.
"""
from __future__ import annotations

import io
import pickle
import struct

import numpy as np

PROTO_2 = b"\x80\x02"


def pack(arrays) -> bytes:
    """Arrays as `.npy` 1.0 records, little-endian, C order, one after another."""
    out = io.BytesIO()
    for array in arrays:
        array = np.asarray(array)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        np.lib.format.write_array(out, np.ascontiguousarray(little), version=(1, 0),
                                  allow_pickle=False)
    return out.getvalue()


def unpack(data: bytes) -> list[np.ndarray]:
    """The arrays `pack` wrote, in order."""
    stream, arrays = io.BytesIO(data), []
    while stream.tell() < len(data):
        arrays.append(np.lib.format.read_array(stream, allow_pickle=False))
    return arrays


def pickled(data: bytes) -> bytes:
    """`data` as a protocol-2 pickle of a byte string (BINSTRING, which Python 2 loads as
    `str`): what a Myria worker hands a UDF after unpickling a BLOB."""
    return PROTO_2 + b"T" + struct.pack("<I", len(data)) + data + b"."


def unpickled(data: bytes) -> bytes:
    """The byte string in a BLOB as Myria returns it (a worker's Python 2 result pickled
    with protocol 2, or one `pickled` made). Anything else is refused: no object but a
    byte string is ever loaded from a server's reply."""
    value = pickle.loads(data, encoding="bytes") if _only_a_string(data) else None
    if not isinstance(value, bytes):
        raise ValueError(f"a BLOB that is not a pickled byte string "
                         f"({len(data)} bytes, starting {data[:16]!r})")
    return value


def _only_a_string(data: bytes) -> bool:
    """A protocol-2 pickle whose one opcode is a byte string: SHORT_BINSTRING ('U'),
    BINSTRING ('T') or SHORT_BINBYTES/BINBYTES ('C'/'B', Python 3), then STOP, with a
    BINPUT/memo opcode allowed between (cPickle writes 'q' after a string)."""
    if data[:2] != PROTO_2 or len(data) < 4:
        return False
    op, at = data[2:3], 3
    if op in (b"U", b"C"):
        size, at = data[at], at + 1
    elif op in (b"T", b"B"):
        size, at = struct.unpack_from("<I", data, at)[0], at + 4
    else:
        return False
    at += size
    if data[at:at + 1] == b"q":
        at += 2
    elif data[at:at + 1] == b"r":
        at += 5
    return data[at:] == b"."


def encode(*arrays) -> bytes:
    """Arrays as the bytes of one BLOB (a stage file DOWNLOADBLOB reads)."""
    return pickled(pack(arrays))


def decode(data: bytes) -> list[np.ndarray]:
    """The arrays in one BLOB's bytes."""
    return unpack(unpickled(data))
