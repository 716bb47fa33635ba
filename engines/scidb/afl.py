"""The steps compiled to SciDB's AFL (SciDB 19.11 syntax): what the SciDB engine sends,
pinned by reviewed snapshots (tests/snapshots/scidb/).

Arrays are dense, one attribute, dimensions in the suite's axis order; a DWI is
`[vol; x; y; z]` chunked one volume per chunk (the study's unit). Data goes in as binary
(`input()` of an uploaded file, `reshape`d to the volume, `redimension`ed into place),
and results come out as binary (`save` formats of engines.scidb.binary). Where SciDB has
the operator, the step is AFL alone (the b0 mean: `filter` + `aggregate`); where it does
not, `stream()` runs engines.scidb.stream_child, the suite's own kernels, on each chunk,
in the plugin's Feather format: the coordinates `apply()`d as attributes (only
attributes travel) and the values cast to double or int64 (the only numbers it sends);
the children's answers are typed arrays, read back as binary.

The astronomy arrays (`Cells`) are stacks of planes keyed as the study keyed its work, one
member per chunk: CCDs `[ccd; y; x]` (calibrate), calexps shuffled to `[part; ccd; y; x]`
by (visit, patch) (warp), warps `[patch; n; y; x]` (coadd), coadds `[patch; y; x]`
(detect).
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


def stream(source: str, command: str, target: str, answer) -> str:
    """Run `command` on each chunk of `source` (Feather exchange), its answers, columns
    `answer` ((name, type) each), kept in `target`:
    <name: type, ...>[instance_id, chunk_no, value_no], an answer per chunk_no."""
    def group(items):
        items = [quote(i) for i in items]
        return items[0] if len(items) == 1 else "(" + ",".join(items) + ")"

    return f"store(stream({source}, {quote(command)}, format:'feather', " \
           f"types:{group(t for _, t in answer)}, names:{group(n for n, _ in answer)}), " \
           f"{target})"


# SciDB type -> the type stream()'s Feather exchange sends it as (int64, double, string,
# binary only: Paradigm4/stream src/FeatherInterface.cpp writeFeather)
SENT_AS = {"float": "double", "double": "double", "int32": "int64", "int64": "int64"}


def sent(attribute: str, kind: str) -> str:
    """`apply()` arguments making `attribute` (of SciDB type `kind`) `<attribute>64`, the
    type the Feather exchange sends it as."""
    return f"{attribute}64, {SENT_AS[kind]}({attribute})"


def with_coordinates(source: str, four_d: bool) -> str:
    """The cells' coordinates as leading attributes, as the stream child reads them."""
    if four_d:
        return f"project(apply({source}, k, vol, xi, x, yi, y, zi, z, {sent('v', 'float')})" \
               f", k, xi, yi, zi, v64)"
    return f"project(apply({source}, xi, x, yi, y, zi, z, {sent('mean_b0', 'float')}), " \
           f"xi, yi, zi, mean_b064)"


def with_mask(series: Series, mask: Volume) -> str:
    """Every cell of a series with the mask's value at its voxel (the join needs the
    mask chunked as the series is over x, y, z)."""
    joined = f"cross_join({series.name}, {mask.name}, {series.name}.x, {mask.name}.x, " \
             f"{series.name}.y, {mask.name}.y, {series.name}.z, {mask.name}.z)"
    return f"project(apply({joined}, k, vol, xi, x, yi, y, zi, z, {sent('v', 'float')}, " \
           f"mi, iif(m, 1, 0)), k, xi, yi, zi, v64, mi)"


def rechunk(series: Series, block, target: str, volumes_per_chunk: int) -> Series:
    """`series` stored again as `target`, chunked into voxel blocks of this many volumes
    (the fit's unit: a block of every volume; the denoising's: a whole volume)."""
    return Series(target, series.shape, series.volumes, tuple(block), volumes_per_chunk)


def store_rechunked(series: Series, target: Series) -> str:
    return f"store(repart({series.name}, {target.schema}), {target.name})"


def answer_positions(target: str) -> tuple[str, str]:
    """(query, binary save format) listing a stream's answers: (instance, chunk) each,
    from the first value of each (value_no 0)."""
    return (f"project(apply(between({target}, null, null, 0, null, null, 0), ii, "
            f"instance_id, ci, chunk_no), ii, ci)", "(int64, int64)")


def answer(target: str, instance: int, chunk: int, columns) -> tuple[str, str]:
    """(query, binary save format) of one answer of a stream, its `columns` ((name,
    type) each, nullable as stream() makes them) in value_no order (read one at a time:
    a volume's cells each)."""
    return (f"project(between({target}, {instance}, {chunk}, null, {instance}, {chunk}, "
            f"null), {', '.join(n for n, _ in columns)})",
            "(" + ", ".join(f"{t} null" for _, t in columns) + ")")


# -- astronomy ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cells:
    """An array of named attributes over named dimensions, `dims`: (name, size, chunk)."""

    name: str
    attributes: tuple[tuple[str, str], ...]  # (name, SciDB type), all not null
    dims: tuple[tuple[str, int, int], ...]

    @property
    def schema(self) -> str:
        return attributes(self.attributes) + dims(*zip(*self.dims))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.attributes)


def attributes(pairs) -> str:
    return "<" + ", ".join(f"{n}:{t} not null" for n, t in pairs) + ">"


def load_plane(target: Cells, path: str, shape, member: dict[str, int]) -> str:
    """Insert one uploaded member of a stack (a CCD, a coadd: its attributes per pixel,
    C order over y, x, in binary) at `member`'s coordinates of `target`."""
    rows, cols = shape
    fmt = "(" + ", ".join(t for _, t in target.attributes) + ")"
    flat = f"input({attributes(target.attributes)}[i=0:{rows * cols - 1}:0:{rows * cols}], " \
           f"{quote(path)}, -2, {quote(fmt)})"
    plane = f"reshape({flat}, {attributes(target.attributes)}" \
            f"{dims('yx', shape, shape)})"
    at = ", ".join(f"{d}, int64({v})" for d, v in member.items())
    return f"insert(redimension(apply({plane}, {at}), {target.name}), {target.name})"


def load_cells(target: Cells, path: str, count: int) -> str:
    """Insert `count` uploaded cells, each its coordinates then its attributes (int64
    coordinates; binary), into `target` (the sparse way in: only the cells there are)."""
    columns = [(d, "int64") for d, _, _ in target.dims] + list(target.attributes)
    fmt = "(" + ", ".join(t for _, t in columns) + ")"
    return f"insert(redimension(input({attributes(columns)}[i=0:{count - 1}:0:{count}], " \
           f"{quote(path)}, -2, {quote(fmt)}), {target.name}), {target.name})"


def coordinates(source: str, names, attrs, applied=()) -> str:
    """The cells' coordinates `names` as leading attributes (`<name>i`), then `attrs`
    (which `applied`, more `apply()` arguments, may make)."""
    made = ", ".join([f"{n}i, {n}" for n in names] + list(applied))
    kept = ", ".join([f"{n}i" for n in names] + list(attrs))
    return f"project(apply({source}, {made}), {kept})"


def stream_cells(cells: Cells) -> str:
    """A stack's cells as stream() sends them to a child: every coordinate, then every
    attribute in the type the Feather exchange sends it as."""
    return coordinates(cells.name, [d for d, _, _ in cells.dims],
                       [f"{n}64" for n in cells.names],
                       [sent(n, t) for n, t in cells.attributes])


def shuffle(ccds: Cells, assignment: Cells, target: Cells) -> str:
    """The study's flatMap and group-by in AFL: each CCD's cells copied to every part
    (visit, patch) the assignment `<part>[ccd; k]` gives it, one part per chunk."""
    joined = f"cross_join({ccds.name}, {assignment.name}, {ccds.name}.ccd, " \
             f"{assignment.name}.ccd)"
    return f"store(redimension({joined}, {target.schema}), {target.name})"


def coadd_sums(warps: Cells, weights: Cells, dropped: Cells) -> tuple[str, str]:
    """(query, binary save format): per patch pixel, the visit-weighted sums of the cells
    the clipping kept (every cell of `warps` but the `dropped` ones), as the kernel
    forms them (image * w; variance * w * w; double), the sum of weights and the count,
    then mean = sum(image w) / sum(w) and variance = sum(variance w w) / sum(w)^2."""
    w, wt, dr = warps.name, weights.name, dropped.name
    flags = f"merge({dr}, project(apply({w}, r, int64(0)), r))"
    weighted = f"cross_join({w}, {wt}, {w}.patch, {wt}.patch, {w}.n, {wt}.n)"
    kept = f"filter(join({weighted}, {flags}), r = 0)"
    terms = f"apply({kept}, wi, double(image) * w, wv, double(variance) * w * w)"
    sums = f"aggregate({terms}, sum(wi) as swi, sum(wv) as swv, sum(w) as sw, " \
           f"count(*) as kept, patch, y, x)"
    stats = f"apply({sums}, mean, swi / sw, var, swv / (sw * sw))"
    return (coordinates(stats, ("patch", "y", "x"), ("mean", "var", "kept")),
            "(int64, int64, int64, double null, double null, uint64)")
