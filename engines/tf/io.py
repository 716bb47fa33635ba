"""Data in for TensorFlow: `tf.data` pipelines that read pixels straight from the files.

A NIfTI volume, a FITS plane or a band of its rows is one contiguous run of bytes at a
known offset, so each is a record of a `tf.data.FixedLengthRecordDataset` whose header and
footer sizes cut it out of the file, decoded with `tf.io.decode_raw` in the file's byte
order. Headers are parsed on the host by nibabel and astropy: metadata only.

Images stay in file order: a NIfTI volume (Fortran order, x fastest) is a [z, y, x]
tensor, and a FITS plane a [row, col] one.
"""
from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines import fitsio, nifti
from pipelines.errors import InputError


# -- NIfTI -------------------------------------------------------------------------------

@dataclass(frozen=True)
class NiftiLayout:
    path: str
    shape: tuple[int, ...]  # (x, y, z[, volumes]) as the header says
    dtype: np.dtype  # with the file's byte order
    offset: int
    file_size: int
    slope: float
    inter: float
    gzipped: bool
    mtime_ns: int  # with the size, tells a rewritten file from the one a pipeline read

    @classmethod
    def of(cls, path) -> "NiftiLayout":
        img = nifti.open_image(path)  # checks the file holds what the header announces
        proxy = img.dataobj
        slope = float(proxy.slope) if np.isfinite(proxy.slope) else 1.0
        inter = float(proxy.inter) if np.isfinite(proxy.inter) else 0.0
        st = Path(path).stat()
        return cls(str(path), tuple(int(s) for s in img.shape), img.get_data_dtype(),
                   int(proxy.offset), st.st_size, slope, inter, str(path).endswith(".gz"),
                   st.st_mtime_ns)

    @property
    def plane_bytes(self) -> int:  # one z-plane of one volume
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    @property
    def volume_bytes(self) -> int:
        return self.plane_bytes * self.shape[2]

    def _decode(self, record, shape) -> tf.Tensor:
        """Raw bytes -> float32 as nibabel gives them (scaled in float64 when scaled)."""
        raw = tf.io.decode_raw(record, tf.as_dtype(self.dtype.newbyteorder("=")),
                               little_endian=self.dtype.byteorder in "<|" or
                               (self.dtype.byteorder == "=" and np.little_endian))
        if (self.slope, self.inter) != (1.0, 0.0):
            raw = tf.cast(raw, tf.float64) * self.slope + self.inter
        return tf.reshape(tf.cast(raw, tf.float32), shape)

    def volumes(self, indices) -> tf.data.Dataset:
        """(index, [z, y, x] float32 volume, count of its NaN or infinite values) for each
        volume index, in increasing order, from one sequential read of the file up to the
        last volume asked for. (A FixedLengthRecordDataset skips its header bytes by
        reading them, so one pass that drops the volumes not asked for costs less than a
        read per volume.) Pipelines are made once per file and selection (tracing one
        costs ~15 ms); each iteration reads the file afresh."""
        return self._volumes(tuple(sorted(set(int(k) for k in indices))))

    @functools.lru_cache(maxsize=32)
    def _volumes(self, indices: tuple[int, ...]) -> tf.data.Dataset:
        x, y, z = self.shape[:3]
        wanted = tf.constant(indices, tf.int64)
        count = indices[-1] + 1
        compression = "GZIP" if self.gzipped else None
        footer = 0 if self.gzipped else self.file_size - self.offset - count * self.volume_bytes
        records = tf.data.FixedLengthRecordDataset(
            self.path, self.volume_bytes, header_bytes=self.offset, footer_bytes=footer,
            buffer_size=min(self.volume_bytes, 64 * 2**20), compression_type=compression)
        records = records.take(count).enumerate()
        if len(indices) < count:
            records = records.filter(lambda k, _: tf.reduce_any(tf.equal(k, wanted)))

        def decode(k, record):
            volume = self._decode(record, (z, y, x))
            bad = tf.size(volume, tf.int64) - tf.math.count_nonzero(tf.math.is_finite(volume))
            return k, volume, bad
        return records.map(decode, num_parallel_calls=2, deterministic=True)


def check_finite(path, index, bad) -> None:
    """The reference's rule for a volume (pipelines.nifti.read_volume): no NaN or inf."""
    if int(bad):
        raise InputError(f"{path}: volume {int(index)} holds {int(bad)} NaN or infinite "
                         f"values")


def read_errors():
    """What tf.data raises for a file that went bad under it, as one InputError line."""
    return (tf.errors.OpError, OSError, EOFError, zlib.error, gzip.BadGzipFile)


# -- FITS --------------------------------------------------------------------------------
#
# Readers are graphs made once per layout and reused (building a tf.data pipeline per read
# costs 15-40 ms of tracing, more than a whole reference kernel on a small CCD). Whole
# planes come from one read of the file: FixedLengthRecordDataset reaches an offset by
# reading through what lies before it (io::InputBuffer::SkipNBytes), so reading a CCD's
# three planes as records would read the file twice over. Bands of rows, whose point is
# to hold less than a plane, are FixedLengthRecordDataset records.

@dataclass(frozen=True)
class FitsPlane:
    path: str
    name: str
    shape: tuple[int, int]  # (rows, cols)
    dtype: np.dtype  # big-endian, as FITS stores it
    offset: int  # byte offset of the plane's data in the file
    file_size: int

    @classmethod
    def of(cls, hdul, name: str, path) -> "FitsPlane":
        """Where plane `name` of an open FITS file (pipelines.fitsio.open_fits) lies."""
        index = hdul.index_of(name)
        header = hdul[index].header
        if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0:
            raise InputError(f"{path}: {name} is scaled (BSCALE/BZERO); TensorFlow reads "
                             f"unscaled planes")
        dtype = {-32: ">f4", -64: ">f8", 32: ">i4", 16: ">i2", 8: "u1"}.get(header["BITPIX"])
        if dtype is None or header.get("NAXIS") != 2:
            raise InputError(f"{path}: {name} is not a 2D image plane")
        return cls(str(path), name, (int(header["NAXIS2"]), int(header["NAXIS1"])),
                   np.dtype(dtype), int(hdul.fileinfo(index)["datLoc"]),
                   Path(path).stat().st_size)

    @property
    def layout(self) -> tuple[str, int, int]:
        return self.dtype.str, self.shape[0], self.shape[1]

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.dtype.itemsize

    def read(self) -> tf.Tensor:
        """The whole plane, in its own type."""
        return read_planes([self])[0]

    def band(self, start: int, stop: int) -> tuple[str, int, int, int]:
        """(path, header, size, footer) of the record holding rows [start, stop), for
        `read_records`."""
        header = self.offset + start * self.row_bytes
        size = (stop - start) * self.row_bytes
        return self.path, header, size, self.file_size - header - size


def decode(raw, layout: tuple[str, int, int]) -> tf.Tensor:
    """FITS bytes (big-endian) -> [rows, cols] in native byte order and the plane's type;
    `layout`: FitsPlane.layout, rows may be -1."""
    dtype, rows, cols = layout
    dtype = np.dtype(dtype)
    values = tf.io.decode_raw(raw, tf.as_dtype(dtype.newbyteorder("=")),
                              little_endian=dtype.itemsize == 1)
    return tf.reshape(values, (rows, cols))


@functools.lru_cache(maxsize=None)
def _planes_reader(layouts: tuple[tuple[str, int, int], ...]):
    @tf.function(input_signature=[tf.TensorSpec([], tf.string),
                                  tf.TensorSpec([len(layouts)], tf.int64)])
    def read(path, offsets):
        contents = tf.io.read_file(path)
        return [decode(tf.strings.substr(contents, offsets[k],
                                         rows * cols * np.dtype(dtype).itemsize), layout)
                for k, layout in enumerate(layouts) for dtype, rows, cols in [layout]]
    return read


def read_planes(planes: list[FitsPlane]) -> list[tf.Tensor]:
    """Whole planes of one FITS file, from one read of it."""
    if len({p.path for p in planes}) != 1:
        raise ValueError("read_planes reads planes of one file")
    try:
        return _planes_reader(tuple(p.layout for p in planes))(
            tf.constant(planes[0].path), tf.constant([p.offset for p in planes], tf.int64))
    except read_errors() as exc:
        raise InputError(f"{planes[0].path}: cannot read its planes "
                         f"({str(exc).strip().splitlines()[0]})") from None


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)]
             + [tf.TensorSpec([None], tf.int64)] * 3)
def read_records(paths, headers, sizes, footers) -> tf.Tensor:
    """One byte run of each file (`sizes` bytes after `headers`; FitsPlane.band), in one
    graph call, as a string tensor for `decode`."""
    runs = tf.data.Dataset.from_tensor_slices((paths, headers, sizes, footers)).interleave(
        lambda path, header, size, footer: tf.data.FixedLengthRecordDataset(
            path, size, header_bytes=header, footer_bytes=footer), cycle_length=1)
    return runs.batch(tf.size(paths, out_type=tf.int64)).get_single_element()


def fits_planes(path, names=fitsio.PLANES) -> dict[str, FitsPlane]:
    """The layout of each named plane of a FITS file."""
    with fitsio.open_fits(path) as hdul:
        return {name: FitsPlane.of(hdul, name, path) for name in names}
