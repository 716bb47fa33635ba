"""SciDB's binary cell format, the way this engine moves arrays in and out of SciDB (the
study's SciDB cost was TSV text; SciDB 19.11's `input()` and `save()` read and write
this format directly).

A binary file is a dense sequence of cells; each cell is its attributes in the format
string's order, little-endian, with no separators. A nullable entry (`double null`) is
preceded by one byte: 0xFF for a value, 0..127 (a "missing reason") for a null, whose
value bytes follow anyway, zero-filled. Strings are a uint32 length counting a trailing
NUL, the UTF-8 bytes and the NUL. (SciDB docs, "Binary Files" and "Binary Format
Strings"; SciDB 19.11 src/array/ArrayWriter.cpp and ChunkLoader.cpp.)

Only fixed-size types are needed here (image values and their coordinates), so a format
maps onto a packed numpy structured dtype and both directions are one `tobytes` /
`frombuffer`.
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
    def dtype(self) -> np.dtype:
        """The packed numpy dtype of one cell (a nullable field: (null byte, value))."""
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
            if not words or words[0] not in TYPES or (len(words) > 1 and not nullable):
                raise FormatError(f"{text!r}: {entry!r} is not a fixed-size SciDB type "
                                  f"(known: {', '.join(TYPES)}), optionally 'null'")
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
    field and refused for any other (images have no nulls: one is a bug upstream)."""
    size = fmt.dtype.itemsize
    if len(buffer) % size:
        raise FormatError(f"{len(buffer)} bytes are not whole cells of {fmt.string} "
                          f"({size} bytes each)")
    cells = np.frombuffer(buffer, dtype=fmt.dtype)
    out = {}
    for f in fmt.fields:
        if not f.nullable:
            out[f.name] = cells[f.name].astype(TYPES[f.type].replace("<", "="))
            continue
        values = cells[f.name]["value"].astype(TYPES[f.type].replace("<", "="))
        null = cells[f.name]["null"] != PRESENT
        if null.any():
            if values.dtype.kind != "f":
                raise FormatError(f"{f.name}: {int(null.sum())} null {f.type} cells")
            values[null] = np.nan
        out[f.name] = values
    return out


def decode_strings(buffer: bytes, nullable: bool = True) -> list[str | None]:
    """The cells of a one-attribute `save(..., '(string null)')`: per cell the null byte
    (if nullable), a uint32 length counting the trailing NUL, the UTF-8 bytes, the NUL."""
    out, at, size = [], 0, len(buffer)
    while at < size:
        present = True
        if nullable:
            present, at = buffer[at] == PRESENT, at + 1
        if at + 4 > size:
            raise FormatError(f"a string cell cut short at byte {at} of {size}")
        length = int.from_bytes(buffer[at:at + 4], "little")
        at += 4
        if at + length > size:
            raise FormatError(f"a string of {length} bytes at byte {at} of {size}")
        out.append(buffer[at:at + max(length - 1, 0)].decode("utf-8") if present else None)
        at += length
    return out
