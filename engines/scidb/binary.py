"""SciDB's binary cell format, the way this engine moves arrays in and out of SciDB (the
study's SciDB cost was TSV text; SciDB 19.11's `input()` and `save()` read and write
this format directly).

A binary file is a dense sequence of cells; each cell is its attributes in the format
string's order, little-endian, with no separators. A nullable entry (`double null`) is
preceded by one byte: 0xFF for a value, 0..127 (a "missing reason") for a null, whose
value bytes follow anyway, zero-filled. Strings are a uint32 length counting a trailing
NUL, the UTF-8 bytes and the NUL. (SciDB docs, "Binary Files" and "Binary Format
Strings"; SciDB 19.11 src/array/ArrayWriter.cpp and ChunkLoader.cpp.)

A variable-size entry (string, binary) is a uint32 byte count, then the bytes (a string's
counting its NUL). Data goes in as fixed-size types only (image values and their
coordinates): a format maps onto a packed numpy structured dtype, and both directions of
those are one `tobytes` / `frombuffer`; the stream children's answers come back with
binary columns too (a kernel's file, its catalog rows), read cell by cell.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# SciDB type name -> little-endian numpy type (fixed-size types only)
TYPES = {"bool": "?", "int8": "i1", "uint8": "u1", "int16": "<i2", "uint16": "<u2",
         "int32": "<i4", "uint32": "<u4", "int64": "<i8", "uint64": "<u8",
         "float": "<f4", "double": "<f8"}
NUMPY_TO_SCIDB = {np.dtype(v).newbyteorder("<").str: k for k, v in TYPES.items()}
VARIABLE = ("string", "binary")  # SciDB types of a uint32 count and that many bytes
PRESENT = 0xFF  # the null byte of a value that is there


class FormatError(ValueError):
    """A format string or a buffer that does not fit it."""


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # a SciDB type name of TYPES
    nullable: bool = False

    @property
    def format(self) -> str:
        return self.type + (" null" if self.nullable else "")


@dataclass(frozen=True)
class Format:
    """A binary format string's fields, with the attribute names they fill."""

    fields: tuple[Field, ...]

    @property
    def string(self) -> str:
        """The format string `input()` and `save()` take: '(int64, double null)'."""
        return "(" + ", ".join(f.format for f in self.fields) + ")"

    @property
    def fixed(self) -> bool:
        return all(f.type not in VARIABLE for f in self.fields)

    @property
    def dtype(self) -> np.dtype:
        """The packed numpy dtype of one cell (a nullable field: (null byte, value))."""
        if not self.fixed:
            raise FormatError(f"{self.string}: string and binary cells have no fixed size")
        parts = []
        for f in self.fields:
            if f.nullable:
                parts.append((f.name, [("null", "u1"), ("value", TYPES[f.type])]))
            else:
                parts.append((f.name, TYPES[f.type]))
        return np.dtype(parts)  # numpy packs structured dtypes unless told to align

    @classmethod
    def parse(cls, text: str, names=None) -> "Format":
        """'(int64, double null)' -> Format; `names` name the fields (default a0, a1...)."""
        match = re.fullmatch(r"\s*\((.*)\)\s*", text)
        if not match:
            raise FormatError(f"{text!r}: a binary format is '(type[ null], ...)'")
        entries = [e.strip().lower() for e in match.group(1).split(",")]
        names = list(names) if names is not None else [f"a{i}" for i in range(len(entries))]
        if len(names) != len(entries):
            raise FormatError(f"{text!r}: {len(entries)} fields, {len(names)} names")
        fields = []
        for name, entry in zip(names, entries):
            words = entry.split()
            nullable = words[1:] == ["null"]
            known = (*TYPES, *VARIABLE)
            if not words or words[0] not in known or (len(words) > 1 and not nullable):
                raise FormatError(f"{text!r}: {entry!r} is not a SciDB type read here "
                                  f"(known: {', '.join(known)}), optionally 'null'")
            fields.append(Field(name, words[0], nullable))
        return cls(tuple(fields))


def encode(columns: dict[str, np.ndarray], fmt: Format) -> bytes:
    """Cells from equal-length columns (NaN is a value, not a null: nothing here writes
    nulls), in `fmt`'s field order."""
    lengths = {len(np.asarray(columns[f.name])) for f in fmt.fields}
    if len(lengths) != 1:
        raise FormatError(f"columns of different lengths: {sorted(lengths)}")
    cells = np.zeros(lengths.pop(), dtype=fmt.dtype)
    for f in fmt.fields:
        if f.nullable:
            cells[f.name]["null"] = PRESENT
            cells[f.name]["value"] = columns[f.name]
        else:
            cells[f.name] = columns[f.name]
    return cells.tobytes()


def decode(buffer: bytes, fmt: Format) -> dict[str, np.ndarray]:
    """Columns from a buffer `save(..., fmt.string)` wrote; a null is NaN for a float
    field and refused for any other fixed-size one (images have no nulls: one is a bug
    upstream); string and binary columns hold str / bytes objects, None for a null."""
    if not fmt.fixed:
        return _decode_cells(buffer, fmt)
    size = fmt.dtype.itemsize
    if len(buffer) % size:
        raise FormatError(f"{len(buffer)} bytes are not whole cells of {fmt.string} "
                          f"({size} bytes each)")
    cells = np.frombuffer(buffer, dtype=fmt.dtype)
    out = {}
    for f in fmt.fields:
        if not f.nullable:
            out[f.name] = _column(f, cells[f.name])
        else:
            out[f.name] = _column(f, cells[f.name]["value"], cells[f.name]["null"] != PRESENT)
    return out


def _column(f: Field, values: np.ndarray, null=None) -> np.ndarray:
    values = values.astype(TYPES[f.type].replace("<", "="))
    if null is not None and null.any():
        if values.dtype.kind != "f":
            raise FormatError(f"{f.name}: {int(null.sum())} null {f.type} cells")
        values[null] = np.nan
    return values


def _decode_cells(buffer: bytes, fmt: Format) -> dict[str, np.ndarray]:
    """A format with string or binary fields, cell by cell (answers are a few cells)."""
    values = {f.name: [] for f in fmt.fields}
    nulls = {f.name: [] for f in fmt.fields}
    at, size = 0, len(buffer)

    def take(n):
        nonlocal at
        if at + n > size:
            raise FormatError(f"a cell of {fmt.string} cut short at byte {at} of {size}")
        at += n
        return buffer[at - n:at]

    while at < size:
        for f in fmt.fields:
            null = f.nullable and take(1)[0] != PRESENT
            if f.type in VARIABLE:
                data = take(int.from_bytes(take(4), "little"))
                value = data[:-1].decode("utf-8") if f.type == "string" else bytes(data)
            else:
                value = np.frombuffer(take(np.dtype(TYPES[f.type]).itemsize), TYPES[f.type])[0]
            values[f.name].append(None if null and f.type in VARIABLE else value)
            nulls[f.name].append(null)
    out = {}
    for f in fmt.fields:
        if f.type in VARIABLE:
            out[f.name] = np.array(values[f.name], dtype=object)
        else:
            out[f.name] = _column(f, np.array(values[f.name], dtype=TYPES[f.type]),
                                  np.array(nulls[f.name], dtype=bool))
    return out
