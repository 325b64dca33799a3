"""StarNet catalogs: their tables, quality flags, and photutils' column names.

`modal_table` and `samples_table` make the tables of
`~starnet.StarNetDeblender.__call__` and `~starnet.StarNetDeblender.sample` (units,
magnitudes, flags, meta) from the rows that `starnet.inference` computes.

A StarNet catalog names positions as photutils does (``x_fit``, ``y_fit``, ``x_err``,
``y_err``) but holds one flux per band (``flux_<band>``, ``flux_<band>_err``).
`to_photutils` gives the table of one band under the names of a
`~photutils.psf.PSFPhotometry` result (``flux_fit``, ``flux_err``), for code written
for photutils. `~starnet.match_catalogs` reads both kinds of table as they are.

The ``flags`` column holds the bits of `CATALOG_FLAGS` (their meanings are StarNet's,
not those of `photutils.psf.decode_psf_flags`); `decode_flags` names them.
"""

import warnings

import numpy as np
from astropy import units as u
from astropy.table import QTable, vstack
from photutils.utils.exceptions import NoDetectionsWarning
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from . import __version__
from .validation import check_mask

__all__ = ["CATALOG_FLAGS", "decode_flags", "modal_table", "samples_table", "to_photutils"]

#: Bits of the ``flags`` column of a StarNet catalog: value -> (name, meaning).
CATALOG_FLAGS = {
    1: ("edge", "the window of pixels that the network sees for the star's tile (its "
                "receptive field) reaches beyond the image, where it sees zeros"),
    2: ("bad_pixels", "a masked or non-finite pixel (replaced by the background) lies "
                      "within one PSF FWHM of the position"),
    4: ("low_detection", "detection probability (column detection_prob) below 0.5"),
    8: ("blend", "another star of the catalog at least as bright (in the first band) "
                 "lies within one PSF FWHM: its light overlaps the star's core, which "
                 "widens the star's posterior"),
    16: ("saturated", "a saturated pixel (at or above meta['saturation'], or marked in "
                      "meta['saturated'], in some band) lies within one PSF FWHM: light "
                      "is missing, so the flux is a lower limit; where the band has "
                      "saturated pixels within one FWHM, flux_<band>_q05 is at most the "
                      "light they recorded, which bounds the flux of a star whose light "
                      "they hold"),
}

_BIT = {name: bit for bit, (name, _) in CATALOG_FLAGS.items()}

#: The 95 % quantile of the standard normal.
_Z95 = 1.6448536269514722


def decode_flags(flags):
    """Names of the `CATALOG_FLAGS` bits set in each value of a ``flags`` column.

    Examples
    --------
    >>> from starnet.catalogs import decode_flags
    >>> decode_flags([0, 5, 8])
    [[], ['edge', 'low_detection'], ['blend']]
    """
    values = np.asarray(flags, dtype=np.int64).reshape(-1)
    return [[name for bit, (name, _) in CATALOG_FLAGS.items() if value & bit]
            for value in values.tolist()]


def catalog_flags(x, y, detection_prob, *, shape, tile_size, padding, fwhm, bad=None,
                  saturated=None, flux=None):
    """The ``flags`` column (`CATALOG_FLAGS`) of stars at pixel positions ``x``, ``y``.

    ``shape``: (rows, cols) of the image; the tiles of ``tile_size`` pixels start at
    pixel 0 and the network sees ``padding`` pixels around each; ``fwhm``: the PSF's
    FWHM in pixels; ``bad`` and ``saturated``: boolean (rows, cols) maps of the masked
    or non-finite pixels and of the saturated ones, or None; ``flux``: the stars'
    fluxes in the first band (None: every neighbour within the FWHM makes a blend).

    >>> import numpy as np
    >>> saturated = np.zeros((20, 20), dtype=bool)
    >>> saturated[10, 10] = True
    >>> catalog_flags([10.0, 16.0], [11.0, 10.0], [1.0, 1.0], shape=(20, 20), tile_size=2,
    ...               padding=0, fwhm=3.0, saturated=saturated).tolist()
    [16, 0]
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    flags = np.zeros(len(x), dtype=np.int64)
    for position, size in ((x, shape[1]), (y, shape[0])):
        tile = np.floor((position + 0.5) / tile_size)
        edge = (tile * tile_size - padding < 0) | ((tile + 1) * tile_size + padding > size)
        flags[edge] |= _BIT["edge"]
    xy = np.column_stack([x, y])
    for pixels, name in ((bad, "bad_pixels"), (saturated, "saturated")):
        if pixels is not None and pixels.any() and len(xy):
            flags[_near(pixels, x, y, fwhm)] |= _BIT[name]
    flags[np.asarray(detection_prob) < 0.5] |= _BIT["low_detection"]
    if len(xy) > 1:
        pairs = cKDTree(xy).query_pairs(fwhm, output_type="ndarray")
        pairs = pairs[np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T) < fwhm]
        if flux is None:
            blended = pairs.reshape(-1)
        else:     # the fainter star of each pair (both when they are as bright)
            flux = np.asarray(flux, dtype=float)
            first, second = pairs.T
            blended = np.concatenate([first[flux[second] >= flux[first]],
                                      second[flux[first] >= flux[second]]])
        flags[blended] |= _BIT["blend"]
    return flags


def _near(pixels, x, y, distance):
    """Which of the positions ``x``, ``y`` lie on or within ``distance`` pixels of a
    pixel of the boolean map ``pixels``."""
    # the nearest pixel of a region to a position outside it is on its boundary
    rows, cols = np.nonzero(pixels & ~binary_erosion(pixels))
    # bounded: a search that may stop at ``distance`` is fast even for far positions
    nearest, _ = cKDTree(np.column_stack([cols, rows])).query(
        np.column_stack([x, y]), distance_upper_bound=distance * (1 + 1e-9) + 1e-9)
    row = np.clip(np.round(y).astype(int), 0, pixels.shape[0] - 1)
    col = np.clip(np.round(x).astype(int), 0, pixels.shape[1] - 1)
    return (nearest <= distance) | pixels[row, col]


def saturated_light(pixels, locs, radius, n_bands):
    """Light recorded in the saturated pixels of each band within ``radius`` of each
    position: a lower limit of the flux of a star there whose light they hold, since a
    saturated pixel records at most the light that reaches it.

    Parameters
    ----------
    pixels : tuple of arrays
        ``(band, x, y, light)`` of each saturated pixel, the light above the background
        in electrons (`starnet.inference.EncoderInput`'s ``saturated_light``).
    locs : array, shape (n, 2)
        Pixel ``(x, y)`` of the stars.
    radius : float
        Pixels.
    n_bands : int

    Returns
    -------
    `numpy.ndarray`, shape (n, n_bands)
        Electrons; 0 where no saturated pixel of the band is within ``radius``.

    Examples
    --------
    >>> import numpy as np
    >>> from starnet.catalogs import saturated_light
    >>> pixels = (np.array([0, 0, 1]), np.array([5, 6, 5]), np.array([5, 5, 5]),
    ...           np.array([2e5, 1e5, 3e5]))
    >>> saturated_light(pixels, np.array([[5.2, 5.0], [20.0, 5.0]]), 2.0, 2).tolist()
    [[300000.0, 300000.0], [0.0, 0.0]]
    """
    band, x, y, light = (np.asarray(a) for a in pixels)
    result = np.zeros((len(locs), n_bands))
    for b in range(n_bands):
        mine = band == b
        if not mine.any() or not len(locs):
            continue
        tree = cKDTree(np.column_stack([x[mine], y[mine]]))
        for star, near in enumerate(tree.query_ball_point(np.asarray(locs), radius)):
            result[star, b] = light[mine][near].sum()
    return result


def modal_table(rows, offset, pmf, *, nddata, meta, bands, tile_size, max_sources, padding,
                fwhm):
    """The table of a modal catalog (`~starnet.StarNetDeblender.__call__` describes it).

    Parameters
    ----------
    rows : dict of `numpy.ndarray`
        The rows of `starnet.inference.modal_catalog`.
    offset : int
        The smallest count of ``pmf``.
    pmf : `numpy.ndarray`
        Posterior of the number of stars: ``pmf[k]`` = q(N = ``offset`` + k).
    nddata : `~astropy.nddata.NDData`
        The image (its shape, bad pixels and WCS).
    meta : dict
        The image's meta as `starnet.inference.prepare_image` gives it.
    bands : list of str
        The model's bands.
    tile_size, max_sources : int
        The model's tiles.
    padding : int
        Pixels the network sees around each tile (`catalog_flags`).
    fwhm : float
        PSF FWHM in pixels (`catalog_flags`).

    Returns
    -------
    catalog : `~astropy.table.QTable`
        With a `~photutils.utils.exceptions.NoDetectionsWarning` when it is empty.
    """
    locs, sd = rows["locs"], rows["sd"]
    table = QTable()
    table["id"] = np.arange(1, len(locs) + 1)
    table["x_fit"] = locs[:, 0]
    table["y_fit"] = locs[:, 1]
    table["x_err"] = sd[:, 0]
    table["y_err"] = sd[:, 1]
    zero_points = _zero_points(meta, bands)
    for b, band in enumerate(bands):
        flux = rows["fluxes"][:, b]
        s = rows["flux_sd"][:, b]
        table[f"flux_{band}"] = flux * u.electron
        table[f"flux_{band}_err"] = (flux * np.exp(s**2 / 2) * np.sqrt(np.expm1(s**2))
                                     * u.electron)
        # the 5 and 95 % quantiles of the log-normal: a usable error bar where the
        # standard deviation of a faint star's flux is far larger than the flux
        table[f"flux_{band}_q05"] = flux * np.exp(-_Z95 * s) * u.electron
        table[f"flux_{band}_q95"] = flux * np.exp(_Z95 * s) * u.electron
        table[f"mag_{band}"] = (zero_points[b] - 2.5 * np.log10(flux)) * u.mag
        table[f"mag_{band}_err"] = 2.5 / np.log(10) * s * u.mag
    table["detection_prob"] = rows["detection"]
    if "n_grids" in rows:
        table["n_grids"] = rows["n_grids"]
    table["flags"] = catalog_flags(
        locs[:, 0], locs[:, 1], rows["detection"], shape=nddata.data.shape[-2:],
        tile_size=tile_size, bad=bad_pixel_map(nddata), padding=padding, fwhm=fwhm,
        saturated=meta.get("saturated_pixels"), flux=rows["fluxes"][:, 0])
    if meta.get("saturated_light") is not None:
        flagged = (table["flags"] & _BIT["saturated"]) > 0
        light = saturated_light(meta["saturated_light"], locs[flagged], fwhm, len(bands))
        for b, band in enumerate(bands):
            column = table[f"flux_{band}_q05"]
            limit = np.where(light[:, b] > 0, light[:, b], np.inf) * u.electron
            column[flagged] = np.minimum(column[flagged], limit)
    if getattr(nddata, "wcs", None) is not None:
        table["sky_centroid"] = nddata.wcs.pixel_to_world(table["x_fit"], table["y_fit"])
    fit = meta.get("background_fit")
    cdf = np.cumsum(pmf)
    table.meta.update({
        "version": __version__, "bands": bands,
        "mag_zero_points": [float(z) for z in zero_points],
        "tile_size": tile_size, "max_sources": max_sources,
        "background_source": meta.get("background_used", "given"),
        "background": meta["background_median"],
        "background_fit": None if fit is None else fit["scale"],
        "n_stars_mean": float(np.dot(np.arange(offset, offset + len(pmf)), pmf)),
        "n_stars_q05": offset + int(np.searchsorted(cdf, 0.05)),
        "n_stars_q95": offset + int(np.searchsorted(cdf, 0.95))})
    if len(table) == 0:
        warnings.warn("the modal catalog holds no stars", NoDetectionsWarning)
    return table


def samples_table(catalogs, *, bands, seed):
    """The table of catalogs drawn from the posterior (`~starnet.StarNetDeblender.sample`).

    Parameters
    ----------
    catalogs : list of tuple
        ``(locs, fluxes)`` of each draw, from `starnet.inference.draw_catalogs`.
    bands : list of str
        The model's bands.
    seed : int or None
        The seed of the draws, recorded in ``meta``.

    Returns
    -------
    samples : `~astropy.table.QTable`
        Columns ``sample``, ``x_fit``, ``y_fit`` and ``flux_<band>`` (electrons).
    """
    tables = []
    for index, (locs, fluxes) in enumerate(catalogs):
        table = QTable()
        table["sample"] = np.full(len(locs), index)
        table["x_fit"] = locs[:, 0]
        table["y_fit"] = locs[:, 1]
        for b, band in enumerate(bands):
            table[f"flux_{band}"] = fluxes[:, b] * u.electron
        tables.append(table)
    samples = vstack(tables)
    samples.meta.update({"version": __version__, "n_samples": len(catalogs), "seed": seed})
    return samples


def _zero_points(meta, bands):
    """Magnitude zero points: 22.5 + 2.5 log10(nelec_per_nmgy), or 0 (instrumental)."""
    calibration = meta.get("nelec_per_nmgy")
    if calibration is None:
        return np.zeros(len(bands))
    calibration = np.asarray(calibration, dtype=float)
    if calibration.size not in (1, len(bands)):
        raise ValueError(f"meta['nelec_per_nmgy'] needs one value or one per band "
                         f"({len(bands)}: {bands}), got {calibration.size}")
    calibration = np.broadcast_to(calibration.reshape(-1), (len(bands),))
    if not np.all(np.isfinite(calibration) & (calibration > 0)):
        raise ValueError(f"meta['nelec_per_nmgy'] must be positive and finite, got "
                         f"{calibration.tolist()}")
    return 22.5 + 2.5 * np.log10(calibration)


def bad_pixel_map(nddata):
    """Boolean (rows, cols) map of the pixels masked or non-finite in any band of
    ``nddata``, or None when there is none."""
    data = np.asarray(nddata.data)
    bad = ~np.isfinite(data)
    if nddata.mask is not None:
        bad |= check_mask(nddata.mask, data.shape)
    bad = bad.reshape(-1, *data.shape[-2:]).any(axis=0)
    return bad if bad.any() else None


def to_photutils(catalog, *, band=None):
    """A StarNet catalog of one band under the column names of photutils PSF photometry.

    Parameters
    ----------
    catalog : `~astropy.table.QTable`
        A StarNet catalog (`~starnet.StarNetDeblender.__call__`).
    band : str, optional
        The band whose flux becomes ``flux_fit``; needed when the catalog has
        several bands.

    Returns
    -------
    table : `~astropy.table.QTable`
        Columns ``id``, ``x_fit``, ``y_fit``, ``flux_fit`` (electrons), ``x_err``,
        ``y_err``, ``flux_err`` (posterior standard deviations) and ``flags`` (the bits
        of `CATALOG_FLAGS`, not those of photutils), in photutils' order, then
        ``detection_prob`` and ``sky_centroid`` when the catalog has them. ``meta`` is
        the catalog's, with ``band``. photutils' fit-quality columns (``qfit``,
        ``cfit``, ``reduced_chi2``) have no counterpart and are absent.

    Raises
    ------
    ValueError
        If the band is missing or ambiguous.

    Examples
    --------
    >>> from astropy import units as u
    >>> from astropy.table import QTable
    >>> from starnet import to_photutils
    >>> catalog = QTable({'id': [1], 'x_fit': [3.2], 'y_fit': [4.1], 'x_err': [0.1],
    ...                   'y_err': [0.1], 'flux_r': [1500.0] * u.electron,
    ...                   'flux_r_err': [90.0] * u.electron, 'flux_i': [2100.0] * u.electron,
    ...                   'flux_i_err': [120.0] * u.electron, 'flags': [0]},
    ...                  meta={'bands': ['r', 'i']})
    >>> table = to_photutils(catalog, band='i')
    >>> table.colnames
    ['id', 'x_fit', 'y_fit', 'flux_fit', 'x_err', 'y_err', 'flux_err', 'flags']
    >>> print(table['flux_fit'][0])
    2100.0 electron
    """
    bands = list(catalog.meta.get("bands", [])) or [
        name[len("flux_"):-len("_err")] for name in catalog.colnames
        if name.startswith("flux_") and name.endswith("_err")]
    if band is None:
        if len(bands) != 1:
            raise ValueError(f"the catalog has the bands {bands}; pass band=... to choose "
                             "the one whose flux becomes flux_fit")
        band = bands[0]
    names = {"x_fit": "x_fit", "y_fit": "y_fit", "flux_fit": f"flux_{band}",
             "x_err": "x_err", "y_err": "y_err", "flux_err": f"flux_{band}_err",
             "flags": "flags"}
    missing = [name for name in names.values() if name not in catalog.colnames]
    if missing:
        raise ValueError(f"the catalog lacks the columns {missing} (band {band!r}; its "
                         f"bands: {bands}); it has {catalog.colnames}")
    table = QTable(meta={**catalog.meta, "band": band})
    table["id"] = (catalog["id"] if "id" in catalog.colnames
                   else np.arange(1, len(catalog) + 1))
    for name, source in names.items():
        table[name] = catalog[source]
    for name in ("detection_prob", "sky_centroid"):
        if name in catalog.colnames:
            table[name] = catalog[name]
    return table
