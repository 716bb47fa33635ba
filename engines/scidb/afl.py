"""The neuroscience steps compiled to SciDB's AFL (SciDB 19.11 syntax): what the SciDB
engine sends, pinned by reviewed snapshots (tests/snapshots/scidb/).

Arrays are dense, one attribute, dimensions in the suite's axis order; a DWI is
`[vol; x; y; z]` chunked one volume per chunk (the study's unit). Data goes in as binary
(`input()` of an uploaded file, `reshape`d to the volume, `redimension`ed into place),
and results come out as binary (`save` formats of engines.scidb.binary). Where SciDB has
the operator, the step is AFL alone (the b0 mean: `filter` + `aggregate`); where it does
not, `stream()` runs engines.scidb.stream_child, the suite's own kernels, on each chunk,
with the coordinates `apply()`d as attributes (only attributes travel).
"""
from __future__ import annotations

from dataclasses import dataclass


def quote(text: str) -> str:
    """An AFL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dims(names, sizes, chunks) -> str:
    """`[x=0:9:0:10; ...]`: low:high:overlap:chunk, SciDB 19's form."""
    return "[" + "; ".join(f"{n}=0:{s - 1}:0:{c}" for n, s, c in zip(names, sizes, chunks)) \
        + "]"


@dataclass(frozen=True)
class Volume:
    """A 3-D image array (a mean b0, a mask)."""

    name: str
    shape: tuple[int, int, int]
    attribute: str = "v"
    type: str = "float"
    chunk: tuple[int, int, int] | None = None  # voxel block per chunk (default: all)

    @property
    def schema(self) -> str:
        return f"<{self.attribute}:{self.type} not null>" + dims("xyz", self.shape,
                                                                  self.chunk or self.shape)


@dataclass(frozen=True)
class Series:
    """A 4-D image array, one volume per chunk (a DWI, its denoised copy)."""

    name: str
    shape: tuple[int, int, int]
    volumes: int
    chunk: tuple[int, int, int] | None = None  # voxel block per chunk (default: a volume)
    volumes_per_chunk: int = 1

    @property
    def schema(self) -> str:
        block = self.chunk or self.shape
        return "<v:float not null>" + dims(("vol", "x", "y", "z"),
                                           (self.volumes, *self.shape),
                                           (self.volumes_per_chunk, *block))


def create(array) -> str:
    return f"create_array({array.name}, {array.schema}, false)"


def remove(name: str) -> str:
    return f"remove({name})"


def load_volume(target: Volume | Series, path: str, volume: int | None = None) -> str:
    """Insert one uploaded volume (float32, C order over x, y, z: engines.scidb.binary)
    into `target`, as volume `volume` of a Series."""
    x, y, z = target.shape
    flat = f"input(<v:float not null>[i=0:{x * y * z - 1}:0:{x * y * z}], {quote(path)}, " \
           f"-2, '(float)')"
    cube = f"reshape({flat}, <v:float not null>{dims('xyz', target.shape, target.shape)})"
    if isinstance(target, Series):
        cube = f"redimension(apply({cube}, vol, int64({volume})), {target.name})"
    elif target.type == "bool":  # a mask, sent as 0.0 / 1.0
        cube = f"redimension(apply({cube}, {target.attribute}, v > 0), {target.name})"
    elif target.attribute != "v" or target.type != "float":
        cube = f"redimension(apply({cube}, {target.attribute}, {target.type}(v)), " \
               f"{target.name})"
    elif target.chunk is not None:
        cube = f"repart({cube}, {target.schema})"
    return f"insert({cube}, {target.name})"


def fetch_volume(source: str, attribute: str) -> tuple[str, str]:
    """(query, binary save format) reading a 3-D array's cells with their coordinates."""
    return (f"project(apply({source}, xi, x, yi, y, zi, z), xi, yi, zi, {attribute})",
            "(int64, int64, int64, double null)")


def mean_b0(dwi: Series, b0_index, target: str) -> str:
    """The mean of the b0 volumes, by SciDB alone: filter the volumes, average each
    voxel over them (double)."""
    chosen = " or ".join(f"vol={k}" for k in b0_index)
    return f"store(aggregate(filter({dwi.name}, {chosen}), avg(v) as mean_b0, x, y, z), " \
           f"{target})"


def stream(source: str, command: str, target: str) -> str:
    """Run `command` on each chunk of `source` (TSV exchange), its answers kept in
    `target` (one string per answer)."""
    return f"store(stream({source}, {quote(command)}), {target})"


def with_coordinates(source: str, four_d: bool) -> str:
    """The cells' coordinates as leading attributes, as the stream child reads them."""
    if four_d:
        return f"project(apply({source}, k, vol, xi, x, yi, y, zi, z), k, xi, yi, zi, v)"
    return f"project(apply({source}, xi, x, yi, y, zi, z), xi, yi, zi, mean_b0)"


def with_mask(series: Series, mask: Volume) -> str:
    """Every cell of a series with the mask's value at its voxel (the join needs the
    mask chunked as the series is over x, y, z)."""
    joined = f"cross_join({series.name}, {mask.name}, {series.name}.x, {mask.name}.x, " \
             f"{series.name}.y, {mask.name}.y, {series.name}.z, {mask.name}.z)"
    return f"project(apply({joined}, k, vol, xi, x, yi, y, zi, z, mi, iif(m, 1, 0)), " \
           f"k, xi, yi, zi, v, mi)"


def rechunk(series: Series, block, target: str) -> str:
    """A series rechunked into voxel blocks of every volume (the fit's unit)."""
    blocks = Series(target, series.shape, series.volumes, tuple(block), series.volumes)
    return f"store(repart({series.name}, {blocks.schema}), {target})"


def answer_positions(target: str) -> tuple[str, str]:
    """(query, binary save format) listing a stream's answers: (instance, chunk) each
    (stream's TSV output is <response:string>[instance_id; chunk_no])."""
    return (f"project(apply({target}, ii, instance_id, ci, chunk_no), ii, ci)",
            "(int64, int64)")


def answer(target: str, instance: int, chunk: int) -> str:
    """One answer of a stream (read one at a time: a volume's cells each)."""
    return f"project(between({target}, {instance}, {chunk}, {instance}, {chunk}), response)"
