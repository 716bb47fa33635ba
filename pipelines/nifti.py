"""NIfTI access as the workers need it: one volume or one voxel block at a time, read from
the file by path, and writes of one volume into a shared output file. Every read that
can fail because of the file turns into one `InputError` line."""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from .errors import InputError, allocate

NIFTI1_DATA_OFFSET = 352  # 348-byte header + 4-byte empty extension flag


def open_image(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI header and check that the file holds all the data it announces."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        img = nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: expected a NIfTI image, found {type(img).__name__}")
    expected = img.dataobj.offset + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    if path.suffix == ".gz":
        # A gzip member ends with the uncompressed size mod 2**32: a cheap truncation check
        # that avoids decompressing gigabytes up front.
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
        if isize != expected % 2**32:
            raise InputError(f"{path}: gzip stream is truncated or corrupt "
                             f"(expected {expected} bytes of image, trailer says {isize})")
    else:
        actual = path.stat().st_size
        if actual < expected:
            raise InputError(f"{path}: file is truncated ({actual} bytes, the header "
                             f"announces {expected})")
    return img


def read_volume(path: str | os.PathLike, index: int) -> np.ndarray:
    """Volume `index` of a 4D image as float32, refusing NaN or infinite values."""
    img = _load_quiet(path)
    try:
        vol = np.asarray(img.dataobj[..., index], dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: cannot read volume {index} ({_one_line(exc)})") from None
    bad = vol.size - np.count_nonzero(np.isfinite(vol))
    if bad:
        raise InputError(f"{path}: volume {index} holds {bad} NaN or infinite values")
    return vol


def read_block(path: str | os.PathLike, block: tuple[slice, slice, slice]) -> np.ndarray:
    """A voxel block across all volumes, (bx, by, bz, V) float32."""
    st = os.stat(path)
    data = _mapped(str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    return np.asarray(data[block], dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _mapped(path: str, inode: int, size: int, mtime_ns: int):
    """The image's data, memory-mapped once per process and file version (the identity
    in the key means a rewritten file is mapped anew): a voxel block touches one page per
    row of every volume, and keeping the mapping spares a worker those page faults on
    every block it fits."""
    img = _load_quiet(path)
    proxy = img.dataobj
    if not path.endswith(".gz") and proxy.slope == 1.0 and proxy.inter == 0.0:
        return np.memmap(path, dtype=img.get_data_dtype(), mode="r", offset=proxy.offset,
                         shape=img.shape, order="F")
    return proxy  # compressed or scaled data: nibabel's proxy reads it correctly


def create(path: str | os.PathLike, shape: tuple[int, ...], affine: np.ndarray,
           dtype=np.float32) -> Path:
    """Make an uncompressed NIfTI of `shape`, zero-filled, for workers to fill in place."""
    path = Path(path)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_slope_inter(1.0, 0.0)
    header["vox_offset"] = NIFTI1_DATA_OFFSET
    size = NIFTI1_DATA_OFFSET + int(np.prod(shape)) * np.dtype(dtype).itemsize
    with open(path, "wb") as fh:
        header.write_to(fh)
        fh.write(b"\0" * (NIFTI1_DATA_OFFSET - fh.tell()))
        fh.flush()
        # Allocated for real, not sparse: workers write it through memory maps, where a
        # full disk would surface as a bus error (SIGBUS) instead of an error here.
        allocate(fh, size)
    return path


def write_volume(path: str | os.PathLike, index: int, volume: np.ndarray) -> None:
    """Write volume `index` of a file made by `create`. NIfTI stores data in Fortran order,
    so a volume is one contiguous run of bytes and writers of different volumes never
    touch the same page."""
    img = nib.load(path)
    out = np.memmap(path, dtype=img.get_data_dtype(), mode="r+",
                    offset=img.dataobj.offset, shape=img.shape, order="F")
    out[..., index] = volume
    out.flush()
    del out


def save(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    if data.dtype == bool:
        data = data.astype(np.uint8)
    nib.save(nib.Nifti1Image(data, affine), path)
    return Path(path)


def _load_quiet(path):
    try:
        return nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
