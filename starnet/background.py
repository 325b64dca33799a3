"""Fitting the background level of an image to its catalog (the 'wake' step)."""

import warnings

import numpy as np
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.utils.exceptions import NoDetectionsWarning

from .simulate import as_background

__all__ = ["fit_background"]


def fit_background(deblender, nddata, *, n_iterations=8, edge=4, bounds=(0.9, 1.6)):
    """Scale the background of each band until the catalog leaves a residual of zero median.

    Under the model, data minus the star light of the true catalog minus the
    background is noise of median zero. This finds, band by band, the factor ``s``
    applied to the first guess in ``meta['background']`` for which the residual of the
    modal catalog cataloged with that background, ``data - render(catalog) - s * b``,
    has zero median over the image, by bisection within ``bounds`` (all bands at once:
    the encoder sees them together). The median makes the fit insensitive to the flux
    errors of the bright stars, which hold most of the light of a crowded field. Light
    the model does not hold as stars, such as that of stars fainter than the prior's
    ``f_min``, ends up in the background, as the generative model requires. Only the
    image is used; pixels within ``edge`` pixels of the border (lit by stars outside the
    image) are left out. The encoder must have been trained with a ``background_range``
    that covers ``bounds`` (the bundled SDSS model: 0.9 to 1.6 times the SDSS sky).

    This is a heuristic, and a biased one. On 106 x 106 images simulated from the
    bundled SDSS M2 model at its own background, the r-band residual median crosses
    zero at 1.2 to 1.27 times the true background, not at 1, and in i it stays near
    -0.1 of the background for factors 0.9 to 1.6, so the i factor is not identified
    (``benchmarks/bench_background.py`` prints the fitted factors: 0.90 to 1.60 over 5
    images). On M2 it gives 1.25 (r) and 1.31 (i) times the SDSS sky.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    nddata : `~astropy.nddata.NDData`
        The image, with a first guess of the background in ``meta['background']``.
    n_iterations : int, optional
        Bisection rounds (the interval shrinks by 2 each round).
    edge : int, optional
        Border width in pixels left out.
    bounds : tuple of float, optional
        Range of the factors.

    Returns
    -------
    image : `~astropy.nddata.NDData`
        A copy of ``nddata`` whose ``meta['background']`` is the fitted background map
        (bands, rows, cols).
    history : `~astropy.table.QTable`
        One row per round: the factors tried (``scale_<band>``), the mean background
        (``background_<band>``, electrons), the median residual over the mean
        background (``misfit_<band>``) and the number of stars cataloged.
    """
    data = np.asarray(nddata.data, dtype=float)
    n_bands, rows, cols = data.shape
    if min(rows, cols) <= 2 * edge + 3:
        raise ValueError(f"image of {rows} x {cols} pixels is too small for edge={edge}")
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be increasing positive factors, got {bounds}")
    first = as_background(nddata.meta["background"], n_bands, (rows, cols))
    if first.ndim == 1:
        first = np.broadcast_to(first[:, None, None], data.shape)
    inner = (slice(None), slice(edge, rows - edge), slice(edge, cols - edge))
    level = first[inner].mean(axis=(1, 2))
    bad = ~np.isfinite(data)
    if nddata.mask is not None:
        bad |= np.broadcast_to(np.asarray(nddata.mask, dtype=bool), data.shape)
    bands = deblender.bands

    def image_with(scales):
        meta = dict(nddata.meta, background=first * scales[:, None, None])
        return NDData(nddata.data, mask=nddata.mask, wcs=nddata.wcs, unit=nddata.unit,
                      meta=meta)

    low = np.full(n_bands, float(bounds[0]))
    high = np.full(n_bands, float(bounds[1]))
    history = []
    for iteration in range(n_iterations):
        scales = (low + high) / 2
        image = image_with(scales)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoDetectionsWarning)
            catalog = deblender(image)
        residual = data - deblender.render(catalog, (rows, cols)) - image.meta["background"]
        residual[bad] = np.nan     # masked and non-finite pixels do not count
        misfit = np.nanmedian(residual[inner], axis=(1, 2)) / (level * scales)
        history.append({"iteration": iteration + 1, "n_stars": len(catalog),
                        **{f"scale_{b}": float(s) for b, s in zip(bands, scales)},
                        **{f"background_{b}": float(v) for b, v in zip(bands, level * scales)},
                        **{f"misfit_{b}": float(m) for b, m in zip(bands, misfit)}})
        low = np.where(misfit > 0, scales, low)
        high = np.where(misfit > 0, high, scales)
    scales = (low + high) / 2
    image = image_with(scales)
    _warn_if_untrained(deblender, level * scales)
    image.meta["background_fit"] = {"scales": scales.tolist(), "edge": edge,
                                    "bounds": list(bounds), "rounds": n_iterations}
    return image, QTable(rows=history, names=list(history[0]))


def _warn_if_untrained(deblender, fitted):
    """Warn when a fitted mean background lies outside the range the encoder was trained on."""
    settings = deblender.training_settings
    if settings is None:
        return
    low = settings.background_range[0] * deblender.background
    high = settings.background_range[1] * deblender.background
    outside = (fitted < 0.99 * low) | (fitted > 1.01 * high)
    if np.any(outside):
        warnings.warn(f"the fitted background {np.round(fitted, 1).tolist()} lies outside the "
                      f"range the encoder was trained on ({np.round(low, 1).tolist()} to "
                      f"{np.round(high, 1).tolist()} e-); the catalog may be unreliable",
                      UserWarning)
