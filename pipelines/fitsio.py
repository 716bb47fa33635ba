"""FITS input/output of the astronomy pipeline: the pipeline's one place for it.

A CCD (raw or calibrated) is a multi-extension FITS file: a primary header with the
exposure's facts (VISIT, CCDNUM, GAIN, RDNOISE, SATURATE, FLUXSCAL), then IMAGE (float32,
with the CCD's celestial WCS), MASK (int32 bit planes, named in its header as
MASKBIT<n> = NAME) and VARIANCE (float32), the layout of LSST's and DECam community
pipelines' calibrated exposures. Warps and coadds are the same idea on a patch grid.
Files are written uncompressed so workers can memory-map the rows or cut-outs they need.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from .errors import DISK_FULL_ERRNOS, DiskFull, InputError, size_text

PLANES = ("IMAGE", "MASK", "VARIANCE")
# The LSST stack's mask planes; a file's own MASKBIT<n> keywords take precedence.
DEFAULT_MASK_BITS = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
                     "NO_DATA": 8}


def mask_bits(header) -> dict[str, int]:
    named = {str(v).strip().upper(): int(k[len("MASKBIT"):])
             for k, v in header.items() if k.startswith("MASKBIT") and k[7:].isdigit()}
    return named or dict(DEFAULT_MASK_BITS)


def with_default_planes(bits: dict[str, int]) -> dict[str, int]:
    """A file's named planes, plus the pipeline's planes it lacks, each of those on its
    default bit when that is free and on the lowest free bit otherwise."""
    bits = dict(bits)
    for name, bit in DEFAULT_MASK_BITS.items():
        if name not in bits:
            used = set(bits.values())
            bits[name] = bit if bit not in used else min(set(range(31)) - used)
    return bits


def bits_value(bits: dict[str, int], names) -> int:
    """The integer with the named mask planes set; planes a file does not name are 0."""
    return int(sum(1 << bits[n] for n in names if n in bits))


def mask_header(bits: dict[str, int]):
    from astropy.io import fits

    header = fits.Header()
    for name, bit in sorted(bits.items(), key=lambda item: item[1]):
        header[f"MASKBIT{bit}"] = name
    return header


def open_fits(path, memmap: bool = True, **options):
    """Open a FITS file, turning astropy's ways of saying 'corrupt' into one InputError.
    Truncation, which astropy only warns about, is an error here. Memory-mapped by
    default (workers read the rows they need); astropy cannot map scaled integers
    (BZERO/BSCALE/BLANK), which a plain image's reader opens with memmap=False."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", fits.verify.VerifyWarning)
            warnings.filterwarnings("error", message="File may have been truncated")
            hdul = fits.open(path, memmap=memmap, lazy_load_hdus=False, **options)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, TypeError, Warning) as exc:
        raise InputError(f"{path}: not a readable FITS file "
                         f"({str(exc).splitlines()[0]})") from None
    return hdul


def read_plane(hdul, name: str, rows=slice(None), cols=slice(None), path="") -> np.ndarray:
    """A plane (or a cut-out of it) in native byte order; memory-mapped files are read
    only where asked."""
    try:
        data = hdul[name].section[rows, cols]
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: cannot read {name} ({str(exc).splitlines()[0]})") from None
    return np.asarray(data).astype(data.dtype.newbyteorder("="), copy=False)


def write_planes(path: Path, primary_header, planes: dict[str, tuple]) -> Path:
    """planes: EXTNAME -> (array, header or None), written in order."""
    from astropy.io import fits

    hdus = [fits.PrimaryHDU(header=primary_header)]
    for name, (data, header) in planes.items():
        hdus.append(fits.ImageHDU(data=data, header=header, name=name))
    return write_hdus(path, fits.HDUList(hdus))


def write_hdus(path: Path, hdul) -> Path:
    """Write a FITS file whole, under a temporary name renamed at the end, so readers
    never see a half-written file (a retried task rewrites it). A full disk is DiskFull,
    one line with the path and the size: astropy re-raises a failed write without its
    errno, and NumPy reports a short one as "32768 requested and 3120 written"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.fits")
    try:
        hdul.writeto(tmp, overwrite=True)
    except OSError as exc:
        why = _out_of_room(exc, tmp)
        tmp.unlink(missing_ok=True)
        if why is None:
            raise
        size = sum(hdu.filebytes() for hdu in hdul)
        raise DiskFull(f"{path}: no room for its {size_text(size)} ({why})") from exc
    tmp.replace(path)
    return path


def _out_of_room(exc: BaseException, written) -> str | None:
    """Why a failed write ran out of room (None: it did not): a full disk's errno in the
    exception's chain, or, after a short write, the errno one more byte at the end of
    the file gets (the disk, or the file-size limit, says what stopped it)."""
    seen = exc
    while seen is not None:
        if getattr(seen, "errno", None) in DISK_FULL_ERRNOS:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    if not re.search(r"\d+ requested and \d+ written", str(exc)):
        return None
    try:
        with open(written, "ab") as fh:
            fh.write(b"\0")
            fh.flush()
    except OSError as probe:
        if probe.errno in DISK_FULL_ERRNOS:
            return os.strerror(probe.errno)
    return "a write was cut short"
