"""Quality flags of StarNet catalogs, and StarNet catalogs under photutils' column names.

A StarNet catalog (`~starnet.StarNetDeblender.__call__`) names positions as photutils
does (``x_fit``, ``y_fit``, ``x_err``, ``y_err``) but holds one flux per band
(``flux_<band>``, ``flux_<band>_err``). `to_photutils` gives the table of one band
under the names of a `~photutils.psf.PSFPhotometry` result (``flux_fit``,
``flux_err``), for code written for photutils. `~starnet.match_catalogs` reads both
kinds of table as they are.

The ``flags`` column holds the bits of `CATALOG_FLAGS` (their meanings are StarNet's,
not those of `photutils.psf.decode_psf_flags`); `decode_flags` names them.
"""

import numpy as np
from astropy.table import QTable
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from .validation import check_mask

__all__ = ["CATALOG_FLAGS", "decode_flags", "to_photutils"]

#: Bits of the ``flags`` column of a StarNet catalog: value -> (name, meaning).
CATALOG_FLAGS = {
    1: ("edge", "the window of pixels that the network sees for the star's tile (its "
                "receptive field) reaches beyond the image, where it sees zeros"),
    2: ("bad_pixels", "a masked or non-finite pixel (replaced by the background) lies "
                      "within one PSF FWHM of the position"),
    4: ("low_detection", "detection probability (column detection_prob) below 0.5"),
    8: ("blend", "another star of the catalog lies within one PSF FWHM"),
}

_BIT = {name: bit for bit, (name, _) in CATALOG_FLAGS.items()}


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


def catalog_flags(x, y, detection_prob, *, shape, tile_size, padding, fwhm, bad=None):
    """The ``flags`` column (`CATALOG_FLAGS`) of stars at pixel positions ``x``, ``y``.

    ``shape``: (rows, cols) of the image; the tiles of ``tile_size`` pixels start at
    pixel 0 and the network sees ``padding`` pixels around each; ``fwhm``: the PSF's
    FWHM in pixels; ``bad``: boolean (rows, cols) map of the masked or non-finite
    pixels, or None.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    flags = np.zeros(len(x), dtype=np.int64)
    for position, size in ((x, shape[1]), (y, shape[0])):
        tile = np.floor((position + 0.5) / tile_size)
        edge = (tile * tile_size - padding < 0) | ((tile + 1) * tile_size + padding > size)
        flags[edge] |= _BIT["edge"]
    xy = np.column_stack([x, y])
    if bad is not None and bad.any() and len(xy):
        # the nearest bad pixel of a star not on one is on the boundary of a bad region
        rows, cols = np.nonzero(bad & ~binary_erosion(bad))
        distance, _ = cKDTree(np.column_stack([cols, rows])).query(xy)
        row = np.clip(np.round(y).astype(int), 0, shape[0] - 1)
        col = np.clip(np.round(x).astype(int), 0, shape[1] - 1)
        flags[(distance <= fwhm) | bad[row, col]] |= _BIT["bad_pixels"]
    flags[np.asarray(detection_prob) < 0.5] |= _BIT["low_detection"]
    if len(xy) > 1:
        pairs = cKDTree(xy).query_pairs(fwhm, output_type="ndarray")
        close = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T) < fwhm
        flags[pairs[close].reshape(-1)] |= _BIT["blend"]
    return flags


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
