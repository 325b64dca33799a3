"""The StarNet paper's M2 (NGC 7089) field: SDSS image and catalogs.

The paper (Liu, Regier et al. 2023) evaluates on a 100 x 100 pixel region of
SDSS run 2583, camcol 2, field 136 (frame rows 630:730, columns 310:410,
r and i bands) against a Hubble (HST ACS) catalogue. Bundled with starnet:

- the SDSS frames, psField and photoField of the field (``data/sdss``);
- ``true_hubble_m2.npz``: the paper's evaluation set, whose 1114 HST stars
  (r flux above 1000 electrons) are the truth of `load_m2`;
- ``sdss0921_true.txt.gz``: all 6048 HST stars of the region, without a
  magnitude cut, from Portillo et al. (2017) (`load_m2_hst`);
- ``idR-002583-2-0136-tru.txt``: the DAOPHOT catalogue of An et al. (2008)
  restricted to the region, from Feder et al. (2020) (`load_m2_daophot`);
- ``sdss-002583-2-0136-psf-{r,i}.fits``: 25 x 25 PSF images of the field
  (SDSS's KL PSF at frame row 600, column 500).

All catalogs are given in the pixel coordinates of the image returned by
``load_m2(border=border)`` (photutils convention: ``x`` = column, ``y`` =
row, centre of the first pixel at 0), so pass the same ``border`` to each.
"""

from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable
from photutils.psf import ImagePSF
from scipy.spatial import cKDTree

from .sdss import load_sdss_frame

__all__ = ["M2_REGION", "M2_NELEC_PER_NMGY", "load_m2", "load_m2_hst",
           "load_m2_daophot"]

M2_REGION = (slice(630, 730), slice(310, 410))
"""Frame rows and columns of the paper's region (run 2583, camcol 2, field 136)."""

M2_NELEC_PER_NMGY = 856.09845
"""Electrons per nanomaggy of the paper's magnitudes in r (its mean over the
frame columns): ``mag = 22.5 - 2.5 log10(flux / 856.09845)``."""

_FIELD = (2583, 2, 136)
_DATA_DIR = Path(__file__).parent / "data" / "m2"
# The frame is 1489 x 2048 pixels: the widest border left of column 310.
_MAX_BORDER = M2_REGION[1].start
# Nanomaggies per count of the r frame (header NMGY). The fluxes in counts of
# the bundled Portillo and Feder catalogues are 10**((22.5 - mag) / 2.5) / NMGY.
_NMGY_PER_COUNT_R = 0.00546689


def _check_border(border):
    if not (isinstance(border, (int, np.integer)) and 0 <= border <= _MAX_BORDER):
        msg = (f"border must be an integer from 0 to {_MAX_BORDER} (pixels "
               f"added on each side of the 100 x 100 region); got {border!r}")
        raise ValueError(msg)
    return int(border)


def _mag_r(flux):
    """The paper's r magnitude of fluxes in electrons."""
    return 22.5 - 2.5 * np.log10(flux / M2_NELEC_PER_NMGY)


def _catalog(x, y, flux, meta):
    table = QTable(meta=meta)
    table["x"] = np.asarray(x, dtype=float)
    table["y"] = np.asarray(y, dtype=float)
    table["flux_r"] = np.asarray(flux, dtype=float) * u.electron
    table["mag_r"] = _mag_r(table["flux_r"].value)
    return table


def _psf_image(band):
    """The bundled 25 x 25 PSF image of a band, normalised to unit sum."""
    data = fits.getdata(_DATA_DIR / f"sdss-002583-2-0136-psf-{band}.fits")
    data = np.asarray(data, dtype=float)
    return ImagePSF(data / data.sum())


def _hst_truth(border):
    """The paper's 1114 HST stars, in the coordinates of a bordered image."""
    with np.load(_DATA_DIR / "true_hubble_m2.npz") as npz:
        locs = npz["true_locs"].astype(float)
        flux = npz["true_fluxes"][:, 0].astype(float)
    # true_locs = (row + 0.5) / 100, (col + 0.5) / 100 with row, col counted
    # from the region's first pixel centre.
    meta = {"source": "HST ACS stars of the StarNet paper (true_hubble_m2.npz), "
                      "r flux > 1000 electrons"}
    return _catalog(locs[:, 1] * 100 - 0.5 + border,
                    locs[:, 0] * 100 - 0.5 + border, flux, meta)


def load_m2(*, border=0, psf="kl"):
    """
    Load the StarNet paper's M2 image (r and i bands) and its HST truth.

    The image is built from the bundled SDSS frames with
    `~starnet.datasets.load_sdss_frame` (electrons, sky included; the i band
    resampled onto the r pixels with the WCSs).

    Parameters
    ----------
    border : int, optional
        Pixels added on each side of the 100 x 100 region (frame rows
        630:730, columns 310:410). The paper used 3 (a 106 x 106 image) so
        that the encoder sees the stars' surroundings, cataloguing the whole
        image and evaluating inside the region only.
    psf : {'powerlaw', 'image', 'kl'}, optional
        ``'powerlaw'``: `~starnet.psf.PowerLawPSF` from the psField file.
        ``'image'``: the bundled 25 x 25 PSF images of the field, normalised
        to unit sum, as `~photutils.psf.ImagePSF`; they are SDSS's KL PSF
        at frame row 600, column 500 (80 rows and 140 columns from the
        region's centre). ``'kl'`` (the default, the PSF the bundled
        ``sdss-m2`` model was trained with): SDSS's KL PSF at the centre
        of the region (frame row 679.5, column 359.5 in r; see
        `~starnet.psf.kl_psf_from_psfield`), of unit sum, as
        `~photutils.psf.ImagePSF`; in i, blurred by the bilinear resampling
        of the i frame onto the r pixels
        (`~starnet.datasets.sdss.resampled_psf`). In this field the i-band
        KL PSF does not vary with position; in r, ``'image'`` and ``'kl'``
        differ by 0.35 % of the light (half the L1 difference).

    Returns
    -------
    image : `~astropy.nddata.NDData`
        As from `~starnet.datasets.load_sdss_frame`; ``meta`` also holds
        ``'region'``, the ``(slice, slice)`` of the 100 x 100 region in this
        image, and ``'evaluation'``, the paper's metric settings:
        ``{'nelec_per_nmgy': 856.09845, 'border_pad': 5}`` (magnitudes are
        ``22.5 - 2.5 log10(flux / nelec_per_nmgy)``; sources within
        ``border_pad`` pixels of the region's edge are not scored).
    truth : `~astropy.table.QTable`
        The paper's 1114 HST stars (r flux above 1000 electrons, strictly
        inside the region) with columns ``x``, ``y`` (pixels of ``image``),
        ``flux_r`` (electrons; the HST magnitude times the r frame's
        electrons per nanomaggy at column 0, 847.52) and ``mag_r`` (the
        paper's magnitude, see ``'evaluation'``). There is no i flux.

    Examples
    --------
    >>> from starnet.datasets import load_m2
    >>> image, truth = load_m2(border=3)
    >>> image.data.shape, len(truth)
    ((2, 106, 106), 1114)
    >>> image.meta['region']
    (slice(3, 103, None), slice(3, 103, None))
    """
    border = _check_border(border)
    if not isinstance(psf, str) or psf not in ("powerlaw", "image", "kl"):
        raise ValueError(f"psf must be 'powerlaw', 'image' or 'kl'; got {psf!r}")
    rows, cols = (slice(s.start - border, s.stop + border) for s in M2_REGION)
    image = load_sdss_frame(*_FIELD, ("r", "i"), cutout=(rows, cols),
                            psf="kl" if psf == "kl" else "powerlaw")
    if psf == "image":
        image.meta["psf"] = [_psf_image(b) for b in image.meta["bands"]]
    image.meta["region"] = (slice(border, border + 100),) * 2
    image.meta["evaluation"] = {"nelec_per_nmgy": M2_NELEC_PER_NMGY,
                                "border_pad": 5}
    return image, _hst_truth(border)


def load_m2_hst(*, full=True, border=0):
    """
    Load all the HST stars of the M2 region, without the paper's flux cut.

    Parameters
    ----------
    full : bool, optional
        `True`: all 6048 stars. `False`: only those brighter than the
        paper's limit, ``flux_r > 1000`` electrons (this list's magnitudes
        come from another HST column than the paper's, ~0.15 mag brighter,
        so the selection differs from the paper's 1114 stars).
    border : int, optional
        The ``border`` of the `load_m2` image the coordinates refer to.

    Returns
    -------
    stars : `~astropy.table.QTable`
        Columns ``x``, ``y`` (pixels of the ``load_m2(border=border)``
        image), ``flux_r`` (electrons, ``10**((22.5 - mag_r) / 2.5) *
        856.09845``) and ``mag_r`` (the HST magnitude, presumably F606W, as
        used by Portillo et al. 2017). Some stars lie up to half a pixel
        outside the region.

    Examples
    --------
    >>> from starnet.datasets import load_m2_hst
    >>> stars = load_m2_hst()
    >>> len(stars)
    6048
    """
    border = _check_border(border)
    x, y, counts = np.loadtxt(_DATA_DIR / "sdss0921_true.txt.gz", unpack=True)
    # Back to the catalogue's magnitude, then to electrons as the paper did.
    flux = counts * _NMGY_PER_COUNT_R * M2_NELEC_PER_NMGY
    meta = {"source": "HST ACS stars of the region (Portillo et al. 2017, "
                      "sdss0921_true.txt)"}
    stars = _catalog(x + border, y + border, flux, meta)
    if not full:
        stars = stars[stars["flux_r"] > 1000 * u.electron]
    return stars


def _median_offset(x, y, ref_x, ref_y, *, radius):
    """Median (dx, dy) from each source to its nearest reference within radius."""
    dist, index = cKDTree(np.column_stack([ref_x, ref_y])).query(
        np.column_stack([x, y]), distance_upper_bound=radius)
    found = np.isfinite(dist)
    return (float(np.median(ref_x[index[found]] - x[found])),
            float(np.median(ref_y[index[found]] - y[found])))


def load_m2_daophot(*, border=0):
    """
    Load the published DAOPHOT catalogue of the M2 region (An et al. 2008).

    The 356 stars of An et al.'s SDSS DAOPHOT catalogue inside the region,
    as distributed by Feder et al. (2020). Their pixel origin differs from
    SDSS's by about a pixel in y, so, as the StarNet paper did, the catalogue
    is shifted by the median offset of its bright stars (flux above
    ``10**4.5`` electrons) to the nearest bright HST star of `load_m2`'s
    truth within 3 pixels (about dx = -0.03, dy = -1.09 pixels). Matched to
    the 1114 HST stars it gives the paper's DAOPHOT row (TPR 0.20, PPV 0.63
    to 0.65). This is a substitute for the exact catalogue the paper used.

    Parameters
    ----------
    border : int, optional
        The ``border`` of the `load_m2` image the coordinates refer to.

    Returns
    -------
    stars : `~astropy.table.QTable`
        Columns ``x``, ``y`` (pixels of the ``load_m2(border=border)``
        image), ``flux_r`` (electrons, ``10**((22.5 - mag_r) / 2.5) *
        856.09845``, the paper's conversion) and ``mag_r`` (DAOPHOT r
        magnitude). ``meta['offset']`` is the ``(dx, dy)`` shift applied.

    Examples
    --------
    >>> from starnet.datasets import load_m2_daophot
    >>> stars = load_m2_daophot()
    >>> len(stars)
    356
    """
    border = _check_border(border)
    x, y, counts = np.loadtxt(_DATA_DIR / "idR-002583-2-0136-tru.txt",
                              usecols=(0, 1, 2), unpack=True)
    flux = counts * _NMGY_PER_COUNT_R * M2_NELEC_PER_NMGY
    truth = _hst_truth(0)
    bright_min = 10**4.5
    bright = flux > bright_min
    ref = truth[truth["flux_r"].value > bright_min]
    dx, dy = _median_offset(x[bright], y[bright], ref["x"].value,
                            ref["y"].value, radius=3.0)
    meta = {"source": "DAOPHOT catalogue of An et al. (2008) in the region "
                      "(Feder et al. 2020, idR-002583-2-0136-tru.txt)",
            "offset": (dx, dy)}
    return _catalog(x + dx + border, y + dy + border, flux, meta)
