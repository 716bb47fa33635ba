"""Plain FITS images into the astronomy pipeline: archive images as most surveys serve
them (the image in the primary HDU or in one image extension, a celestial WCS, whatever
keywords the camera wrote) made into the pipeline's CCD files (pipelines/fitsio.py:
IMAGE, MASK, VARIANCE and the exposure's facts), one per image, in the run's directory.

What a plain file lacks is filled in from the file itself, and every choice is recorded
per file (`Ingested`, written to run.json), because each one changes the answer:
- mask: empty, plus an `EDGE_PIXELS` frame (the detector's edge, where a resampled image
  and the background mesh are least reliable), NaN or BLANK pixels (NO_DATA) and pixels
  at the saturation level (SAT): SATURATE / SATLEVEL, else an integer image's full scale;
- variance: with a gain (GAIN / EGAIN / CCDGAIN, electrons per count) and read noise
  (RDNOISE / READNOIS / RON / ENOISE, electrons), counts / gain + (read noise / gain)^2;
  without one, Poisson-like from the image's own noise, scaled so the sky's variance is
  the sky's measured (3-sigma clipped) scatter: sigma_sky^2 * max(image, sky) / sky. An
  image whose sky was already subtracted (sky level under its scatter) has no sky term
  to count: its variance is the measured sky variance, plus image / gain with a gain.
  The measured sky scatter over the model's is recorded (`noise_ratio`), and a model
  that is off by more than `NOISE_RATIO_WARN` says so (`warning`);
- visit: VISIT or EXPNUM, else the exposure's time (MJD-OBS, DATE-OBS with its time or
  with TIME-OBS / UT: files taken in the same second are one exposure, numbered in time
  order), else one visit per file; visits made up are numbered after `first_visit`;
- CCD: CCDNUM, else the file's order within its visit;
- flux scale: from a photometric zero point (MAGZERO / MAGZPT / PHOTZP), when every file
  has one, onto the first file's; otherwise the images' own counts.
Two files that would be the same (visit, CCD), or the same file twice, are refused: the
second one is skipped with the reason.
"""
from __future__ import annotations

import math
import re
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
ZERO_POINT_KEYS = ("MAGZERO", "MAGZPT", "PHOTZP")
NOISE_RATIO_WARN = (0.7, 1.4)  # measured / modelled sky noise outside this: said so


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
    warning: str | None = None

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

    def get(self, keys):
        """(value, keyword) of the first keyword present, else (None, None)."""
        for key in keys:
            value = self.header.get(key)
            if value not in (None, ""):
                return value, key
        return None, None

    def number(self, keys, integer=False, positive=False):
        """(value, keyword) of the first of `keys` present, checked: InputError, one line,
        for a value that is not a (whole, positive) number."""
        value, key = self.get(keys)
        if value is None:
            return None, None
        what = "a whole number" if integer else "a number"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{self.path}: {key} = {value!r} is not {what}") from None
        if not math.isfinite(number) or (integer and number != int(number)) or \
                (positive and number <= 0):
            raise InputError(f"{self.path}: {key} = {value!r} is not "
                             f"{'a positive ' + what[2:] if positive else what}")
        return (int(number) if integer else number), key

    def time(self):
        """(MJD, keyword) of the exposure, or (None, None) where the header has no time of
        day: a date alone cannot tell a night's exposures apart."""
        from astropy.time import Time

        mjd, key = self.number(("MJD-OBS",))
        if mjd is not None:
            return mjd, key
        date, _ = self.get(("DATE-OBS",))
        if date is None:
            return None, None
        text = str(date).strip().replace(" ", "T")
        text = re.sub(r"(Z|[+-]00:?00)$", "", text)  # UTC spelled out: what FITS means
        if "T" not in text:
            clock, clock_key = self.get(("TIME-OBS", "UT"))
            if clock is None:
                return None, None
            text, key = f"{text}T{str(clock).strip()}", f"DATE-OBS and {clock_key}"
        else:
            key = "DATE-OBS"
        try:
            return float(Time(text, format="isot", scale="utc").mjd), key
        except ValueError:
            raise InputError(f"{self.path}: {key} {date!r} is not a date and time "
                             f"(ISO 8601, as FITS writes it)") from None


def _image_hdu(hdul, path) -> int:
    """The one HDU holding an image (two or more axes longer than 1; 1-D vectors beside
    it, as SDSS frames carry, are not images)."""
    images = [i for i, h in enumerate(hdul)
              if h.is_image and sum(n > 1 for n in (h.shape or ())) >= 2]
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
    return _Header(Path(path), index, header)


def _assign_visits(headers: list[_Header], first_visit: int) -> list[tuple[int, str]]:
    """(visit, where it came from) per file: one rule for the whole set, so that visits
    from keywords and visits made up are never mixed."""
    own = [h.number(VISIT_KEYS, integer=True) for h in headers]
    if all(v is not None for v, _ in own):
        return list(own)
    times = [h.time() for h in headers]
    if all(t is not None for t, _ in times):
        # The same instant to a second is the same exposure (a camera's CCDs).
        rounded = [round(t * 86400.0) for t, _ in times]
        order = {t: first_visit + n for n, t in enumerate(sorted(set(rounded)))}
        return [(order[r], k) for r, (_, k) in zip(rounded, times)]
    return [(first_visit + n, "one per file") for n in range(len(headers))]


def _assign_ccds(headers, visits) -> list[tuple[int, str]]:
    own = [h.number(("CCDNUM",), integer=True) for h in headers]
    if all(v is not None for v, _ in own):
        return list(own)
    seen: dict[int, int] = {}
    found = []
    for visit, _ in visits:
        seen[visit] = seen.get(visit, 0) + 1
        found.append((seen[visit], "file order within the visit"))
    return found


def _flux_scales(headers) -> list[tuple[float, str]]:
    points = [h.number(ZERO_POINT_KEYS) for h in headers]
    if not points or not all(v is not None for v, _ in points):
        return [(1.0, "none (no zero point in every file): the images' own counts")] * \
            len(headers)
    first = points[0][0]
    return [(float(10.0 ** (-0.4 * (v - first))), f"{k} onto the first file's")
            for v, k in points]


def _saturation(h: _Header, bitpix: int) -> tuple[float | None, str]:
    value, key = h.number(SATURATION_KEYS)
    if value is not None:
        return value, key
    if bitpix > 0:
        # Integer pixels stop at their type's top (FITS: 8 bits unsigned, others signed,
        # BZERO shifting them: 16 bits with BZERO 32768 is a uint16 camera's 65535).
        raw = np.dtype({8: "u1", 16: "i2", 32: "i4", 64: "i8"}[bitpix])
        scale = float(h.header.get("BSCALE", 1.0))
        top = np.iinfo(raw).max * scale + float(h.header.get("BZERO", 0.0))
        kind = "unsigned" if bitpix == 8 or h.header.get("BZERO", 0) > 0 else "signed"
        return float(top), f"{bitpix}-bit {kind} integer full scale"
    return None, "none (no SATURATE keyword, floating-point pixels)"


def _read_image(h: _Header):
    """(image as float64 with NaN for BLANK, BITPIX): scaled by BSCALE/BZERO by hand,
    as astropy cannot scale a memory-mapped image."""
    with fitsio.open_fits(h.path, memmap=False, do_not_scale_image_data=True) as hdul:
        hdu = hdul[h.hdu]
        bitpix = hdu.header["BITPIX"]
        try:
            raw = np.squeeze(np.asarray(hdu.data))
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{h.path}: cannot read its image "
                             f"({str(exc).splitlines()[0]})") from None
        blank = hdu.header.get("BLANK") if bitpix > 0 else None
        image = raw.astype(np.float64) * float(hdu.header.get("BSCALE", 1.0)) + \
            float(hdu.header.get("BZERO", 0.0))
    if blank is not None:
        image[raw == blank] = np.nan
    return image, bitpix


def _variance(h, image, usable, sky, sigma):
    """(variance, how it was made, gain and read noise for the CCD file, model's sky
    variance)."""
    gain, gain_key = h.number(GAIN_KEYS)
    read_noise = h.number(READ_NOISE_KEYS)[0] or 0.0
    ignored = ""
    if gain is not None and gain <= 0:  # some headers write 0 for "not known"
        gain, ignored = None, f" ({gain_key} = {gain:g} ignored)"
    holds_sky = sky >= sigma  # a subtracted sky sits within its own scatter of zero
    if gain and holds_sky:
        variance = np.maximum(image, 0.0) / gain + (read_noise / gain) ** 2
        how = f"{gain_key} {gain:g} e-/count, read noise {read_noise:g} e-"
        return variance, how, gain, read_noise, sky / gain + (read_noise / gain) ** 2
    if gain:
        variance = sigma ** 2 + np.maximum(image, 0.0) / gain
        how = (f"the sky-subtracted image's scatter {sigma:.4g} counts, sources from "
               f"{gain_key} {gain:g} e-/count")
        return variance, how, gain, read_noise, sigma ** 2
    if holds_sky:
        variance = sigma ** 2 * np.maximum(image, sky) / sky
        how = f"image noise: sky {sky:.4g}, clipped scatter {sigma:.4g} counts{ignored}"
        # the calibrate step's cosmic-ray finder needs electrons per count: the sky's own
        return variance, how, sky / sigma ** 2, 0.0, sigma ** 2
    variance = np.full(image.shape, sigma ** 2)
    how = (f"image noise, constant: sky-subtracted (sky {sky:.3g}), clipped scatter "
           f"{sigma:.4g} counts{ignored}")
    return variance, how, None, 0.0, sigma ** 2


def _convert(h: _Header, visit, ccd, scale, out_dir: Path) -> Ingested:
    from astropy.io import fits
    from astropy.stats import sigma_clipped_stats

    image, bitpix = _read_image(h)
    wcs = celestial_wcs(h.header, h.path)
    saturation, saturation_from = _saturation(h, bitpix)
    no_data = ~np.isfinite(image)
    saturated = np.zeros(image.shape, dtype=bool) if saturation is None else \
        (image >= saturation) & ~no_data
    edge = np.ones(image.shape, dtype=bool)
    edge[EDGE_PIXELS:-EDGE_PIXELS, EDGE_PIXELS:-EDGE_PIXELS] = False
    usable = ~(no_data | saturated | edge)
    if not usable.any():
        raise InputError(f"{h.path}: no usable pixel (all NaN, saturated or edge)")
    _, sky, sigma = (float(v) for v in sigma_clipped_stats(image[usable], sigma=3.0))
    if not sigma > 0:
        raise InputError(f"{h.path}: the image has no noise to measure (a constant sky)")
    image = np.where(no_data, sky, image)
    variance, how, gain, read_noise, model_sky = _variance(h, image, usable, sky, sigma)
    ratio = round(sigma / math.sqrt(model_sky), 3)
    warning = None
    if not NOISE_RATIO_WARN[0] <= ratio <= NOISE_RATIO_WARN[1]:
        warning = (f"the sky scatters {ratio:g}x what {how.split(',')[0]} predicts: check "
                   f"the keywords (are the pixels raw counts?)")
    bits = fitsio.DEFAULT_MASK_BITS
    mask = np.zeros(image.shape, dtype=np.int32)
    mask[edge] |= 1 << bits["EDGE"]
    mask[no_data] |= 1 << bits["NO_DATA"]
    mask[saturated] |= 1 << bits["SAT"]
    primary = fits.Header()
    primary["VISIT"], primary["CCDNUM"] = visit[0], ccd[0]
    primary["GAIN"] = gain if gain else 1.0  # what the cosmic-ray finder reads
    primary["RDNOISE"] = read_noise or 0.0
    if saturation is not None:
        primary["SATURATE"] = saturation
    primary["FLUXSCAL"] = scale[0]
    primary["SRCFILE"] = (h.path.name, "the plain image this CCD was made from")
    primary["SRCHDU"] = h.hdu
    for key in ("MJD-OBS", "DATE-OBS", "EXPTIME", "FILTER"):
        if key in h.header:
            primary[key] = h.header[key]
    path = out_dir / f"v{visit[0]:04d}_c{ccd[0]:03d}.fits"
    fitsio.write_planes(path, primary, {
        "IMAGE": (image.astype(np.float32), wcs.to_header(relax=True)),
        "MASK": (mask, fitsio.mask_header(bits)),
        "VARIANCE": (variance.astype(np.float32), None)})
    return Ingested(str(h.path), h.hdu, path.name, visit[0], visit[1], ccd[0], ccd[1],
                    how, gain, read_noise, saturation, saturation_from, scale[0], scale[1],
                    int(edge.sum()), int(no_data.sum()), int(saturated.sum()), ratio,
                    warning)


def ingest(paths, out_dir, first_visit: int = 1) -> tuple[list[Ingested],
                                                          list[tuple[str, str]]]:
    """Plain images made into the pipeline's CCD files in `out_dir`; visits made up are
    numbered from `first_visit` (after the CCD files' own). Returns what was made of
    each, and the (file, reason) of each that could not be used."""
    headers, skipped, seen = [], [], set()
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            skipped.append((str(path), f"{path}: given twice"))
            continue
        seen.add(resolved)
        try:
            h = _read_header(Path(path))
            for keys, integer in ((VISIT_KEYS, True), (("CCDNUM",), True),
                                  (ZERO_POINT_KEYS, False), (GAIN_KEYS, False),
                                  (READ_NOISE_KEYS, False), (SATURATION_KEYS, False)):
                h.number(keys, integer=integer)  # each file's own keywords, checked
            if h.get(VISIT_KEYS)[0] is None:
                h.time()  # needed only where the visit comes from it
            headers.append(h)
        except InputError as exc:
            skipped.append((str(path), str(exc)))
    visits = _assign_visits(headers, first_visit)
    ccds = _assign_ccds(headers, visits)
    scales = _flux_scales(headers)
    made = []
    taken: dict[tuple[int, int], str] = {}
    for h, visit, ccd, scale in zip(headers, visits, ccds, scales):
        key = (visit[0], ccd[0])
        if key in taken:
            skipped.append((str(h.path), f"{h.path}: visit {key[0]} CCD {key[1]} "
                                         f"({visit[1]}, {ccd[1]}) is already {taken[key]}"))
            continue
        try:
            made.append(_convert(h, visit, ccd, scale, Path(out_dir)))
            taken[key] = str(h.path)
        except InputError as exc:
            skipped.append((str(h.path), str(exc)))
    return made, skipped
