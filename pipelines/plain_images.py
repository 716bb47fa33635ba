"""Plain FITS images into the astronomy pipeline: archive images as most surveys serve
them (the image in the primary HDU or in one image extension, a celestial WCS, whatever
keywords the camera wrote) made into the pipeline's CCD files (pipelines/fitsio.py:
IMAGE, MASK, VARIANCE and the exposure's facts), one per image, in the run's directory.

What a plain file lacks is filled in from the file itself, and every choice is recorded
per file (`Ingested`, written to run.json), because each one changes the answer:
- mask: empty, plus an `EDGE_PIXELS` frame (the detector's edge, where a resampled image
  and the background mesh are least reliable), NaN pixels (NO_DATA) and pixels at the
  saturation level (SAT): SATURATE / SATLEVEL, else an integer image's full scale;
- variance: from the gain and read noise (GAIN / EGAIN / CCDGAIN, RDNOISE / READNOIS /
  RON / ENOISE) as counts / gain + (read noise / gain)^2; without a gain, from the
  image's own noise: Poisson-like, scaled so the sky's variance equals the sky's
  measured (3-sigma clipped) scatter, var = sigma_sky^2 * max(image, sky) / sky;
  either way the ratio of the measured sky scatter to the model is recorded;
- visit: VISIT or EXPNUM, else the exposure time (DATE-OBS, MJD-OBS: files taken at the
  same time are one visit, numbered in time order), else one visit per file;
- CCD: CCDNUM, else the file's order within its visit;
- flux scale: from a photometric zero point (MAGZERO / MAGZPT / PHOTZP), when every file
  has one, onto the first file's; otherwise the images' own counts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import fitsio
from .astro import celestial_wcs
from .errors import InputError

EDGE_PIXELS = 4
GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON", "ENOISE")
SATURATION_KEYS = ("SATURATE", "SATLEVEL")
VISIT_KEYS = ("VISIT", "EXPNUM")
TIME_KEYS = ("MJD-OBS", "DATE-OBS")
ZERO_POINT_KEYS = ("MAGZERO", "MAGZPT", "PHOTZP")


@dataclass(frozen=True)
class Ingested:
    """What was made of one plain image, and from what: the run.json record."""

    source: str
    hdu: int
    ccd_file: str  # its name in the directory the CCD files were written to
    visit: int
    visit_from: str
    ccd: int
    ccd_from: str
    variance_from: str
    gain: float | None
    read_noise: float | None
    saturation: float | None
    saturation_from: str
    flux_scale: float
    flux_scale_from: str
    masked_edge: int
    masked_no_data: int
    masked_saturated: int
    noise_ratio: float  # the sky's measured scatter / the variance model's, in sky pixels

    def as_json(self) -> dict:
        return asdict(self)


def is_plain(path) -> bool:
    """Whether a FITS file is a plain image rather than one of the pipeline's CCD files."""
    with fitsio.open_fits(path) as hdul:
        return not all(p in {h.name for h in hdul} for p in fitsio.PLANES)


@dataclass(frozen=True)
class _Header:
    path: Path
    hdu: int
    header: object  # the image HDU's header, with the primary's cards it lacks
    time: tuple  # (MJD, keyword) of the exposure, or (None, None)

    def get(self, keys):
        """(value, keyword) of the first keyword present, else (None, None)."""
        for key in keys:
            value = self.header.get(key)
            if value not in (None, ""):
                return value, key
        return None, None


def _image_hdu(hdul, path) -> int:
    images = [i for i, h in enumerate(hdul)
              if h.is_image and h.header.get("NAXIS", 0) > 0]
    if not images:
        raise InputError(f"{path}: no image in any HDU")
    if len(images) > 1:
        raise InputError(f"{path}: {len(images)} image HDUs; a plain image file holds one "
                         f"(a camera's multi-CCD file needs IMAGE/MASK/VARIANCE per CCD)")
    shape = hdul[images[0]].shape
    if len([n for n in shape if n > 1]) != 2:
        raise InputError(f"{path}: HDU {images[0]} is {'x'.join(map(str, shape))}, "
                         f"not a 2-D image")
    return images[0]


def _read_header(path: Path) -> _Header:
    from astropy.io import fits

    with fitsio.open_fits(path) as hdul:
        index = _image_hdu(hdul, path)
        header = hdul[index].header.copy()
        if index:  # keywords a camera wrote once for the exposure, in the primary
            for card in hdul[0].header.cards:
                if card.keyword not in header and card.keyword not in ("", "COMMENT",
                                                                        "HISTORY"):
                    header.append(fits.Card(card.keyword, card.value, card.comment))
    celestial_wcs(header, path)  # refused here, before any file is converted
    return _Header(Path(path), index, header, _time_of(path, header))


def _time_of(path, header):
    key = next((k for k in TIME_KEYS if header.get(k) not in (None, "")), None)
    if key is None:
        return None, None
    value = header[key]
    from astropy.time import Time

    try:
        if key == "MJD-OBS":
            return float(value), key
        return float(Time(str(value), format="isot", scale="utc").mjd), key
    except ValueError:
        raise InputError(f"{path}: {key} {value!r} is not a date (ISO or MJD)") from None


def _assign_visits(headers: list[_Header]) -> list[tuple[int, str]]:
    """(visit, where it came from) per file: one rule for the whole set, so that visits
    from keywords and visits made up are never mixed."""
    own = [h.get(VISIT_KEYS) for h in headers]
    if all(v is not None for v, _ in own):
        return [(int(v), k) for v, k in own]
    times = [h.time for h in headers]
    if all(t is not None for t, _ in times):
        # The same instant to a second is the same exposure (a camera's CCDs).
        rounded = [round(t * 86400.0) for t, _ in times]
        order = {t: n + 1 for n, t in enumerate(sorted(set(rounded)))}
        return [(order[r], k) for r, (_, k) in zip(rounded, times)]
    return [(n + 1, "one per file") for n in range(len(headers))]


def _assign_ccds(headers, visits) -> list[tuple[int, str]]:
    own = [h.get(("CCDNUM",)) for h in headers]
    if all(v is not None for v, _ in own):
        return [(int(v), "CCDNUM") for v, _ in own]
    seen: dict[int, int] = {}
    found = []
    for visit, _ in visits:
        seen[visit] = seen.get(visit, 0) + 1
        found.append((seen[visit], "file order within the visit"))
    return found


def _flux_scales(headers) -> list[tuple[float, str]]:
    points = [h.get(ZERO_POINT_KEYS) for h in headers]
    if not all(v is not None for v, _ in points):
        return [(1.0, "none (no zero point in every file): the images' own counts")] * \
            len(headers)
    first = float(points[0][0])
    return [(float(10.0 ** (-0.4 * (float(v) - first))), f"{k} onto the first file's")
            for v, k in points]


def _saturation(h: _Header, raw_dtype) -> tuple[float | None, str]:
    value, key = h.get(SATURATION_KEYS)
    if value is not None:
        return float(value), key
    if np.issubdtype(raw_dtype, np.integer):
        # Integer pixels stop at their type's top: that value is a saturated pixel.
        top = np.iinfo(raw_dtype).max
        scaled = top * float(h.header.get("BSCALE", 1.0)) + float(h.header.get("BZERO", 0.0))
        return float(scaled), f"{np.dtype(raw_dtype).name} full scale"
    return None, "none (no SATURATE keyword, floating-point pixels)"


def _positive(h: _Header, keys) -> tuple[float | None, str | None]:
    value, key = h.get(keys)
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        raise InputError(f"{h.path}: {key} = {value!r} is not a number") from None
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InputError(f"{h.path}: {key} = {value} is not a non-negative number")
    return value, key


def _convert(h: _Header, visit, ccd, scale, out_dir: Path) -> Ingested:
    from astropy.io import fits
    from astropy.stats import sigma_clipped_stats

    with fitsio.open_fits(h.path) as hdul:
        bitpix = hdul[h.hdu].header["BITPIX"]
        try:
            image = np.squeeze(np.array(hdul[h.hdu].data, dtype=np.float64))
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{h.path}: cannot read its image "
                             f"({str(exc).splitlines()[0]})") from None
    # FITS integers: 8 bits unsigned, the others signed (BZERO shifts them, in _saturation)
    raw_dtype = np.dtype({8: "u1", 16: "i2", 32: "i4", 64: "i8"}.get(bitpix, "f8"))
    wcs = celestial_wcs(h.header, h.path)
    saturation, saturation_from = _saturation(h, raw_dtype)
    gain, gain_key = _positive(h, GAIN_KEYS)
    read_noise, _ = _positive(h, READ_NOISE_KEYS)
    no_data = ~np.isfinite(image)
    saturated = np.zeros(image.shape, dtype=bool) if saturation is None else \
        (image >= saturation) & ~no_data
    edge = np.ones(image.shape, dtype=bool)
    edge[EDGE_PIXELS:-EDGE_PIXELS, EDGE_PIXELS:-EDGE_PIXELS] = False
    usable = ~(no_data | saturated | edge)
    if not usable.any():
        raise InputError(f"{h.path}: no usable pixel (all NaN, saturated or edge)")
    clipped = sigma_clipped_stats(image[usable], sigma=3.0)
    sky, sigma = float(clipped[1]), float(clipped[2])
    if not sigma > 0:
        raise InputError(f"{h.path}: the image has no noise to measure (a constant sky)")
    filled = np.where(no_data, sky, image)
    if gain:
        rn = read_noise or 0.0
        variance = np.maximum(filled, 0.0) / gain + (rn / gain) ** 2
        variance_from = f"{gain_key} {gain:g} e-/count, read noise {rn:g} e-"
        model_sky = max(sky, 0.0) / gain + (rn / gain) ** 2
    elif sky > 0:
        variance = sigma ** 2 * np.maximum(filled, sky) / sky
        variance_from = f"image noise: sky {sky:.4g}, clipped scatter {sigma:.4g} counts"
        gain, read_noise, model_sky = sky / sigma ** 2, 0.0, sigma ** 2
    else:  # a sky-subtracted image: its sources' own noise cannot be known
        variance = np.full(image.shape, sigma ** 2)
        variance_from = f"image noise, constant: sky-subtracted, scatter {sigma:.4g}"
        gain, read_noise, model_sky = None, 0.0, sigma ** 2
    bits = fitsio.DEFAULT_MASK_BITS
    mask = np.zeros(image.shape, dtype=np.int32)
    mask[edge] |= 1 << bits["EDGE"]
    mask[no_data] |= 1 << bits["NO_DATA"]
    mask[saturated] |= 1 << bits["SAT"]
    primary = fits.Header()
    primary["VISIT"], primary["CCDNUM"] = visit[0], ccd[0]
    # GAIN here is what the calibrate step's cosmic-ray finder needs: electrons per count
    # (without a camera gain: the sky's effective one, sky / variance).
    primary["GAIN"] = gain if gain else 1.0
    primary["RDNOISE"] = read_noise or 0.0
    if saturation is not None:
        primary["SATURATE"] = saturation
    primary["FLUXSCAL"] = scale[0]
    primary["SRCFILE"] = (h.path.name, "the plain image this CCD was made from")
    primary["SRCHDU"] = h.hdu
    for key in TIME_KEYS + ("EXPTIME", "FILTER"):
        if key in h.header:
            primary[key] = h.header[key]
    path = out_dir / f"v{visit[0]:04d}_c{ccd[0]:03d}.fits"
    fitsio.write_planes(path, primary, {
        "IMAGE": (image.astype(np.float32), wcs.to_header(relax=True)),
        "MASK": (mask, fitsio.mask_header(bits)),
        "VARIANCE": (variance.astype(np.float32), None)})
    return Ingested(str(h.path), h.hdu, path.name, visit[0], visit[1], ccd[0], ccd[1],
                    variance_from, gain, read_noise, saturation, saturation_from,
                    scale[0], scale[1], int(edge.sum()), int(no_data.sum()),
                    int(saturated.sum()), round(sigma / math.sqrt(model_sky), 3)
                    if model_sky > 0 else float("nan"))


def ingest(paths, out_dir) -> tuple[list[Ingested], list[tuple[str, str]]]:
    """Plain images made into the pipeline's CCD files in `out_dir`. Returns what was made
    of each, and the (file, reason) of each that could not be used."""
    headers, skipped = [], []
    for path in paths:
        try:
            headers.append(_read_header(Path(path)))
        except InputError as exc:
            skipped.append((str(path), str(exc)))
    if not headers:
        return [], skipped
    visits = _assign_visits(headers)
    ccds = _assign_ccds(headers, visits)
    scales = _flux_scales(headers)
    made = []
    out_dir = Path(out_dir)
    for h, visit, ccd, scale in zip(headers, visits, ccds, scales):
        try:
            made.append(_convert(h, visit, ccd, scale, out_dir))
        except InputError as exc:
            skipped.append((str(h.path), str(exc)))
    return made, skipped
