"""Read SDSS DR12 imaging frames as `~astropy.nddata.NDData` in electrons.

An SDSS "corrected frame" (``frame-<band>-<run>-<camcol>-<field>.fits.bz2``)
holds a sky-subtracted, flat-fielded image in nanomaggies together with
the calibration vector (nanomaggies per count, one value per column) and a
coarse sky model in counts. `load_sdss_frame` turns frames of several bands
into one image in electrons on the pixel grid of the first band, with the
PSF of each band from the ``psField`` file (the power-law fit or the KL
PSF) and the gains from the ``photoField`` file.

Files are looked up in ``cache_dir`` (a file of the user's is never passed
over), then in the package's bundled data directory (run 2583, camcol 2,
field 136, bands r and i) or astropy's download cache, and finally
downloaded from the SDSS Science Archive Server (DR12, rerun 301).
"""

import functools
import operator
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import NDData
from astropy.utils.data import download_file
from astropy.wcs import WCS, FITSFixedWarning
from scipy.ndimage import map_coordinates
from photutils.psf import GriddedPSFModel, ImagePSF

from ..images import StarFieldImage
from ..psf import PowerLawPSF, as_psf, kl_psf_from_psfield, pixel_stamps
from .fpm import read_fpm_mask

__all__ = ["SDSS_BANDS", "SAS_URL", "load_sdss_frame"]

SDSS_BANDS = ("u", "g", "r", "i", "z")
"""The SDSS bands, in the order of the per-band arrays of SDSS files."""

SAS_URL = "https://data.sdss.org/sas/dr12"
"""Root of the SDSS DR12 Science Archive Server (files of rerun 301)."""

_BUNDLED_DIR = Path(__file__).parent / "data" / "sdss"


def _file_name_and_url(kind, run, camcol, field, band=None):
    """File name and DR12 download address of one SDSS file."""
    if kind == "frame":
        name = f"frame-{band}-{run:06d}-{camcol}-{field:04d}.fits.bz2"
        return name, f"{SAS_URL}/boss/photoObj/frames/301/{run}/{camcol}/{name}"
    if kind == "psField":
        name = f"psField-{run:06d}-{camcol}-{field:04d}.fit"
        return name, f"{SAS_URL}/boss/photo/redux/301/{run}/objcs/{camcol}/{name}"
    if kind == "fpM":
        name = f"fpM-{run:06d}-{band}{camcol}-{field:04d}.fit.gz"
        return name, f"{SAS_URL}/boss/photo/redux/301/{run}/objcs/{camcol}/{name}"
    name = f"photoField-{run:06d}-{camcol}.fits"
    return name, f"{SAS_URL}/boss/photoObj/301/{run}/{name}"


def _locate(kind, run, camcol, field, *, band=None, cache_dir=None):
    """Path of an SDSS file: in ``cache_dir``, bundled, or downloaded (see module doc)."""
    name, url = _file_name_and_url(kind, run, camcol, field, band)
    target = None if cache_dir is None else Path(cache_dir) / name
    if target is not None and target.is_file():
        return target
    bundled = _BUNDLED_DIR / name
    if bundled.is_file():
        return bundled
    try:
        downloaded = Path(download_file(url, cache=target is None))
    except OSError as err:  # includes urllib's URLError
        where = "astropy's download cache" if target is None else str(cache_dir)
        msg = (f"{name} is neither bundled with starnet nor in {where}, and "
               f"downloading it from {url} failed ({err}); download it by hand "
               "into cache_dir, or retry with network access")
        raise OSError(msg) from err
    if target is None:
        return downloaded
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(downloaded, target)
    return target


def _read_only(array, dtype):
    """A native-byte-order, read-only copy of ``array``."""
    array = np.array(array, dtype=dtype)
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class _Frame:
    """The parts of an SDSS frame file used here (arrays are read-only)."""

    header: fits.Header
    image: np.ndarray        # (rows, cols) nanomaggies, sky subtracted
    calibration: np.ndarray  # (cols,) nanomaggies per count
    allsky: np.ndarray       # coarse sky grid in counts
    xinterp: np.ndarray      # (cols,) frame column -> allsky column
    yinterp: np.ndarray      # (rows,) frame row -> allsky row

    @property
    def shape(self):
        return self.image.shape

    @functools.cached_property
    def wcs(self):
        # The SDSS headers use the deprecated RADECSYS keyword and lack
        # MJD-OBS: astropy fixes both and warns; the fixes are harmless.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(self.header)

    def electrons(self, gain, rows, cols):
        """Sky-subtracted image and sky model in electrons, both float32.

        The image is ``nmgy * (gain / calibration[col])`` and the sky is the
        ALLSKY grid at the nearest node to (YINTERP, XINTERP), times the
        gain: the recipe of the StarNet paper, which this reproduces to the
        last bit (float32 arithmetic, ties of the nearest node rounded
        down, as `scipy.interpolate.RegularGridInterpolator` does).
        """
        signal = self.image[rows, cols] * (gain / self.calibration[cols])
        iy = _nearest_node(self.yinterp[rows], self.allsky.shape[0])
        ix = _nearest_node(self.xinterp[cols], self.allsky.shape[1])
        sky = self.allsky[np.ix_(iy, ix)] * gain
        return signal, sky


def _nearest_node(coords, n):
    """Index of the nearest grid node (0..n-1); ties go to the lower node."""
    return np.ceil(np.clip(coords, 0, n - 1) - 0.5).astype(int)


@functools.lru_cache(maxsize=6)
def _read_frame(path):
    """Read an SDSS frame file once (decompressing a .bz2 frame takes ~1 s)."""
    with fits.open(path) as hdul:
        sky = hdul[2].data
        return _Frame(header=hdul[0].header.copy(),
                      image=_read_only(hdul[0].data, np.float32),
                      calibration=_read_only(hdul[1].data, np.float32),
                      allsky=_read_only(sky["ALLSKY"][0], np.float32),
                      xinterp=_read_only(sky["XINTERP"][0], np.float64),
                      yinterp=_read_only(sky["YINTERP"][0], np.float64))


@functools.lru_cache(maxsize=6)
def _read_gains(path, field):
    """Gains (electrons per count, float32) of one field, in ugriz order."""
    with fits.open(path) as hdul:
        table = hdul[1].data
        rows = np.flatnonzero(table["FIELD"] == field)
        if rows.size == 0:
            msg = (f"field {field} is not in {Path(path).name}, which has "
                   f"fields {table['FIELD'].min()} to {table['FIELD'].max()}")
            raise ValueError(msg)
        return _read_only(table["GAIN"][rows[0]], np.float32)


def _check_bands(bands):
    if isinstance(bands, str):
        bands = (bands,)
    bands = tuple(bands)
    unknown = [b for b in bands if b not in SDSS_BANDS]
    if not bands or unknown or len(set(bands)) != len(bands):
        msg = ("bands must be distinct SDSS band names among "
               f"{', '.join(SDSS_BANDS)}; got {bands!r}")
        raise ValueError(msg)
    return bands


def _check_cutout(cutout, shape):
    """``(slice(r0, r1), slice(c0, c1))`` inside a frame of ``shape``."""
    if cutout is None:
        return slice(0, shape[0]), slice(0, shape[1])
    msg = ("cutout must be (slice(r0, r1), slice(c0, c1)) or "
           f"((r0, r1), (c0, c1)) in frame pixels; got {cutout!r}")
    if not isinstance(cutout, (tuple, list)) or len(cutout) != 2:
        raise TypeError(msg)
    ranges = []
    for item, n, axis in zip(cutout, shape, ("rows", "columns")):
        try:
            if isinstance(item, slice):
                if item.step not in (None, 1):
                    raise ValueError(msg)
                start = 0 if item.start is None else operator.index(item.start)
                stop = n if item.stop is None else operator.index(item.stop)
            else:
                start, stop = (operator.index(v) for v in item)
        except TypeError as err:
            raise TypeError(msg) from err
        if not 0 <= start < stop <= n:
            raise ValueError(
                f"cutout {axis} {start}:{stop} are not inside the frame; "
                f"expected 0 <= start < stop <= {n}")
        ranges.append(slice(start, stop))
    return tuple(ranges)


def _frame_pixels(frame, wcs_out, rows, cols):
    """Frame positions ``(x, y)`` of the pixels (rows, cols) of ``wcs_out``."""
    yy, xx = np.mgrid[rows, cols]
    ra, dec = wcs_out.all_pix2world(xx, yy, 0)
    return frame.wcs.all_world2pix(ra, dec, 0)


def _resample(frame, gain, wcs_out, rows, cols, band):
    """Bilinearly resample a frame onto pixels (rows, cols) of ``wcs_out``.

    Returns the sky-subtracted image and the sky (electrons, float32), the
    mask of pixels that fall outside ``frame`` (they get the nearest edge
    value), and the frame columns the pixels map to.
    """
    x, y = _frame_pixels(frame, wcs_out, rows, cols)
    n_rows, n_cols = frame.shape
    outside = (x < 0) | (x > n_cols - 1) | (y < 0) | (y > n_rows - 1)
    if outside.all():
        msg = (f"the cutout rows {rows.start}:{rows.stop}, columns "
               f"{cols.start}:{cols.stop} do not overlap the {band}-band frame")
        raise ValueError(msg)
    # Only the part of the frame that the pixels need (plus one pixel).
    r0, c0 = (max(int(np.floor(v.min())), 0) for v in (y, x))
    r1 = min(max(int(np.ceil(y.max())) + 2, r0 + 2), n_rows)
    c1 = min(max(int(np.ceil(x.max())) + 2, c0 + 2), n_cols)
    coords = np.array([y - r0, x - c0])
    signal, sky = (map_coordinates(a, coords, order=1, mode="nearest")
                   for a in frame.electrons(gain, slice(r0, r1), slice(c0, c1)))
    return signal, sky, outside, x


_PSF_KINDS = ("powerlaw", "kl", "kl-grid")

#: Largest spacing in pixels of the points of a ``psf='kl-grid'`` PSF.
PSF_GRID_STEP = 256


def _check_psf_kind(psf):
    if not isinstance(psf, str) or psf not in _PSF_KINDS:
        msg = f"psf must be 'powerlaw', 'kl' or 'kl-grid'; got {psf!r}"
        raise ValueError(msg)
    return psf


def _frame_position(wcs_first, frame, row, col, first):
    """Frame (row, col) of the first band's pixel (row, col), in the frame of one band."""
    if first:
        return row, col
    ra, dec = wcs_first.all_pix2world(col, row, 0)
    x, y = frame.wcs.all_world2pix(ra, dec, 0)
    return float(y), float(x)


def _kl_psf(psfield, band, wcs_first, frame, row, col, first, *, pixel=None):
    """SDSS's KL PSF of ``band`` at the first band's position (row, col); for a band
    resampled onto the first band's pixels, blurred by the resampling at ``pixel``
    (row, col; default: the position)."""
    frame_row, frame_col = _frame_position(wcs_first, frame, row, col, first)
    kl = kl_psf_from_psfield(psfield, band=band, row=frame_row, col=frame_col)
    if first:
        return kl
    frame_row, frame_col = _frame_position(wcs_first, frame, *(pixel or (row, col)), first)
    return resampled_psf(kl, frame_col % 1, frame_row % 1)


def _kl_psf_grid(psfield, band, wcs_first, frame, rows, cols, first):
    """A `~photutils.psf.GriddedPSFModel` of the KL PSF of ``band`` over the cutout:
    `_kl_psf` at a regular grid of points at most `PSF_GRID_STEP` pixels apart, the
    corners included, in the cutout's pixel coordinates."""
    ys, xs = (np.linspace(0, n - 1, max(2, -(-(n - 1) // PSF_GRID_STEP) + 1))
              for n in (rows.stop - rows.start, cols.stop - cols.start))
    stamps, points = [], []
    for y in ys:
        for x in xs:
            psf = _kl_psf(psfield, band, wcs_first, frame, rows.start + y, cols.start + x,
                          first)
            stamps.append(psf.data)
            points.append((x, y))
    return GriddedPSFModel(NDData(np.array(stamps), meta={"grid_xypos": points,
                                                          "oversampling": 1}))


def _fpm_mask(path, planes, frame, wcs_first, rows, cols, first):
    """The fpM mask of one band on the first band's pixels (rows, cols): a pixel is
    masked when a frame pixel it is interpolated from is."""
    mask = read_fpm_mask(path, planes=planes)
    if first:
        return mask[rows, cols]
    x, y = _frame_pixels(frame, wcs_first, rows, cols)
    masked = np.zeros(x.shape, dtype=bool)
    for row in (np.floor(y), np.ceil(y)):
        for col in (np.floor(x), np.ceil(x)):
            masked |= mask[np.clip(row.astype(int), 0, mask.shape[0] - 1),
                           np.clip(col.astype(int), 0, mask.shape[1] - 1)]
    return masked


def resampled_psf(psf, fx, fy, *, size=27):
    """The PSF of a band after bilinear resampling with pixel fractions ``(fx, fy)``.

    A pixel of the resampled image at frame position ``x`` with fractional part ``f``
    is ``(1 - f) I[floor(x)] + f I[floor(x) + 1]``; where the two grids are parallel,
    ``f`` is the same for every pixel, so a star's light is its PSF at offsets ``+f``
    (weight ``1 - f``) and ``f - 1`` (weight ``f``), per axis: a blur with zero mean
    offset.

    Parameters
    ----------
    psf : PSF
        The PSF of the band's own frame (anything `~starnet.psf.as_psf` accepts).
    fx, fy : float
        Fractional parts, 0 to 1, of the frame coordinates the resampled pixels map to.
    size : int, optional
        Odd width of the returned image.

    Returns
    -------
    `~photutils.psf.ImagePSF`
        Unit sum.

    Examples
    --------
    >>> from starnet import PowerLawPSF
    >>> from starnet.datasets.sdss import resampled_psf
    >>> from starnet.psf import pixel_stamps
    >>> psf = PowerLawPSF(sigma1=0.9, sigma2=2.2, sigmap=2.0, beta=3.0, b=0.06, p0=0.01)
    >>> sharp = pixel_stamps(psf, 27, [0.0], [0.0])[0]
    >>> blurred = resampled_psf(psf, 0.5, 0.5).data
    >>> print(f"peak {sharp.max() / sharp.sum():.3f} -> {blurred.max():.3f}")
    peak 0.130 -> 0.100
    """
    taps = [[(f, 1 - f), (f - 1, f)] for f in (fx, fy)]
    stamp = sum(wx * wy * pixel_stamps(as_psf(psf), size, [ox], [oy])[0]
                for ox, wx in taps[0] for oy, wy in taps[1])
    name = f"{getattr(psf, 'name', None) or 'PSF'}, resampled (fx {fx:.2f}, fy {fy:.2f})"
    return ImagePSF(stamp / stamp.sum(), name=name)


def load_sdss_frame(run, camcol, field, bands=("r", "i"), *, cutout=None,
                    include_sky=True, psf="powerlaw", fpm_planes=None, cache_dir=None):
    """
    Load SDSS frames of several bands as one image in electrons.

    Parameters
    ----------
    run, camcol, field : int
        The SDSS field (rerun 301).
    bands : sequence of str, optional
        Band names among ``'u', 'g', 'r', 'i', 'z'``. The first band sets the
        pixel grid and the WCS of the result.
    cutout : tuple, optional
        ``(slice(r0, r1), slice(c0, c1))`` or ``((r0, r1), (c0, c1))``: the
        rows and columns to return, in pixels of the first band's frame
        (which is 1489 x 2048). `None` returns the whole frame.
    include_sky : bool, optional
        Add the SDSS sky model back (the frames are sky subtracted), so that
        the image holds all the electrons, as the StarNet likelihood
        expects. If `False` the image is sky subtracted and
        ``meta['background']`` is zero.
    psf : {'powerlaw', 'kl'}, optional
        The PSF of each band in ``meta['psf']``, both from the psField
        file. ``'powerlaw'``: the power-law fit of HDU 6
        (`~starnet.psf.PowerLawPSF.from_psfield`). ``'kl'``: PHOTO's KL
        PSF (`~starnet.psf.kl_psf_from_psfield`, a 25 x 25
        `~photutils.psf.ImagePSF` of unit sum) at the centre of the cutout,
        mapped to each band's own frame with the WCSs; for the bands
        resampled onto the first band's pixels, convolved with the blur of
        the bilinear resampling there (`resampled_psf`, 27 x 27). The KL PSF
        is the one SDSS measured on the frame's stars; it varies (slowly)
        across the frame, as does the resampling blur, so the PSF at the
        centre describes a small cutout best. ``'kl-grid'``: the KL PSF (with
        the resampling blur) at points at most `PSF_GRID_STEP` pixels apart
        over the cutout, corners included, as a
        `~photutils.psf.GriddedPSFModel` per band: the PSF that varies over a
        frame, for a model that reads the PSF (``reads_psf``).
    fpm_planes : sequence of str, optional
        Mask the pixels of these types of the SDSS fpM mask files
        (`starnet.datasets.fpm.read_fpm_mask`; e.g. ``("SATUR", "INTERP",
        "CR")``: saturated pixels and those PHOTO interpolated over, whose values
        are invented) in ``mask``; for the bands resampled onto the first band's
        pixels, every pixel interpolated from a masked one. None: no fpM file is
        read.
    cache_dir : str or path-like, optional
        Directory searched for files that are not bundled with starnet, and
        where downloaded files are kept. `None` uses astropy's download
        cache.

    Returns
    -------
    image : `~astropy.nddata.NDData`
        ``data`` has shape ``(n_bands, rows, cols)`` (float32, unit
        electron): ``frame_nmgy * gain / calibration[col]`` plus, with
        ``include_sky``, the sky, which is the frame's ALLSKY grid (counts)
        at its nearest node to (YINTERP, XINTERP), times the gain. This is
        the StarNet paper's recipe, reproduced exactly. Bands after the
        first are resampled onto the first band's pixels: each pixel centre
        goes to the sky with the first band's WCS and back to the other
        band's frame with that band's WCS (``all_pix2world``,
        ``all_world2pix``), where the image and the sky are interpolated
        bilinearly (`scipy.ndimage.map_coordinates`, ``order=1``), as the
        paper did with its shift. ``wcs`` is the first band's WCS for the
        cutout. ``mask`` (same shape as ``data``) is `True` where a pixel
        falls outside the frame of its band; such pixels carry the nearest
        edge value, and (with ``fpm_planes``) where the fpM files mask it.
        ``meta`` holds:

        - ``'bands'``: list of the band names;
        - ``'psf'``: one PSF per band, from the psField file: a
          `~starnet.psf.PowerLawPSF`, or with ``psf='kl'`` an
          `~photutils.psf.ImagePSF`;
        - ``'background'``: float32 array ``(n_bands, rows, cols)``, the sky
          in electrons (zeros when ``include_sky`` is `False`);
        - ``'gain'``: array ``(n_bands,)``, electrons per count, from the
          photoField file;
        - ``'nelec_per_nmgy'``: array ``(n_bands,)``, ``gain /
          calibration`` averaged over the frame columns of the cutout;
        - ``'run'``, ``'camcol'``, ``'field'``; ``'cutout'``: the
          ``(slice, slice)`` of the first band's frame;
        - with ``fpm_planes`` holding ``'SATUR'``, ``'saturated'``: the fpM's
          saturated pixels (a boolean map like ``mask``), which the catalog
          flags (`starnet.catalogs.CATALOG_FLAGS`), when there are any.

    Raises
    ------
    ValueError
        For an unknown band or ``psf``, a cutout that is not inside the
        frame, or a field missing from the photoField file.
    OSError
        If a file is not available and cannot be downloaded.

    Notes
    -----
    The SDSS DR12 addresses are ``{SAS_URL}/boss/photoObj/frames/301/<run>/
    <camcol>/frame-<band>-<run:06d>-<camcol>-<field:04d>.fits.bz2``,
    ``{SAS_URL}/boss/photo/redux/301/<run>/objcs/<camcol>/
    psField-<run:06d>-<camcol>-<field:04d>.fit`` and
    ``{SAS_URL}/boss/photoObj/301/<run>/photoField-<run:06d>-<camcol>.fits``.
    Frames are read once per session and kept in memory.

    Examples
    --------
    >>> from starnet.datasets import load_sdss_frame
    >>> image = load_sdss_frame(2583, 2, 136, cutout=((630, 730), (310, 410)))
    >>> image.data.shape, image.meta['bands']
    ((2, 100, 100), ['r', 'i'])
    >>> print(f"{image.meta['background'][0].mean():.1f} e-")
    686.2 e-
    >>> image = load_sdss_frame(2583, 2, 136, cutout=((630, 730), (310, 410)),
    ...                         psf='kl')
    >>> [p.data.shape for p in image.meta['psf']]
    [(25, 25), (27, 27)]
    """
    bands = _check_bands(bands)
    psf = _check_psf_kind(psf)
    # The small per-camcol file first: it tells whether the field exists.
    photofield = _locate("photoField", run, camcol, field, cache_dir=cache_dir)
    all_gains = _read_gains(str(photofield), field)
    gains = [all_gains[SDSS_BANDS.index(b)] for b in bands]
    paths = {b: _locate("frame", run, camcol, field, band=b,
                        cache_dir=cache_dir) for b in bands}
    psfield = _locate("psField", run, camcol, field, cache_dir=cache_dir)

    first = _read_frame(str(paths[bands[0]]))
    rows, cols = _check_cutout(cutout, first.shape)
    signal, sky = first.electrons(gains[0], rows, cols)
    signals, skies = [signal], [sky]
    frames = [first]
    masks = [np.zeros(signal.shape, dtype=bool)]
    nelec = [np.mean(gains[0] / first.calibration[cols], dtype=np.float64)]
    for band, gain in zip(bands[1:], gains[1:]):
        frame = _read_frame(str(paths[band]))
        frames.append(frame)
        signal, sky, outside, x = _resample(frame, gain, first.wcs, rows,
                                            cols, band)
        signals.append(signal)
        skies.append(sky)
        masks.append(outside)
        columns = np.arange(frame.shape[1])
        nelec.append(np.mean(np.interp(x, columns, gain / frame.calibration),
                             dtype=np.float64))

    sky = np.stack(skies)
    data = np.stack(signals) + sky if include_sky else np.stack(signals)
    saturated = None
    if fpm_planes is not None:
        saturated = np.zeros(data.shape, dtype=bool)
        for k, (band, frame) in enumerate(zip(bands, frames)):
            path = _locate("fpM", run, camcol, field, band=band, cache_dir=cache_dir)
            masks[k] = masks[k] | _fpm_mask(path, tuple(fpm_planes), frame, first.wcs,
                                            rows, cols, k == 0)
            if "SATUR" in fpm_planes:
                saturated[k] = _fpm_mask(path, ("SATUR",), frame, first.wcs, rows, cols,
                                         k == 0)
    if psf == "kl":
        # at the cutout's centre, with the resampling fractions of its central pixel
        centre = (0.5 * (rows.start + rows.stop - 1), 0.5 * (cols.start + cols.stop - 1))
        pixel = ((rows.start + rows.stop - 1) // 2, (cols.start + cols.stop - 1) // 2)
        psfs = [_kl_psf(psfield, band, first.wcs, frame, *centre, k == 0, pixel=pixel)
                for k, (band, frame) in enumerate(zip(bands, frames))]
    elif psf == "kl-grid":
        psfs = [_kl_psf_grid(psfield, band, first.wcs, frame, rows, cols, k == 0)
                for k, (band, frame) in enumerate(zip(bands, frames))]
    else:
        psfs = [PowerLawPSF.from_psfield(psfield, band=b) for b in bands]
    meta = {"bands": list(bands),
            "psf": psfs,
            "background": sky if include_sky else np.zeros_like(sky),
            "gain": np.array(gains, dtype=np.float64),
            "nelec_per_nmgy": np.array(nelec),
            "run": run, "camcol": camcol, "field": field,
            "cutout": (rows, cols)}
    if saturated is not None and saturated.any():
        meta["saturated"] = saturated
    return StarFieldImage(data, unit=u.electron, wcs=first.wcs[rows, cols],
                          mask=np.stack(masks), meta=meta)
