"""Fitting the background of an image given its catalog (the 'wake' step of wake-sleep)."""

import numpy as np
import torch
from astropy.nddata import NDData
from astropy.table import QTable

from .simulate import StarFieldRenderer

__all__ = ["fit_background"]


def fit_background(deblender, nddata, *, n_iterations=4, model="plane", edge=4):
    """Fit the background of an image by alternating cataloging and a least-squares fit.

    Each iteration catalogs the image with the current background, renders the modal
    catalog through the model's PSFs, and fits the background to the residual image
    (data minus rendered stars) per band: a constant (the mean residual) or a plane in
    the pixel coordinates (ordinary least squares). Everything the catalog does not
    explain, such as the light of stars fainter than the prior's ``f_min``, becomes
    background, as the generative model requires. Only the image is used; pixels within
    ``edge`` pixels of the border (lit by stars outside the image) are left out of the
    fit. The encoder should have been trained with a ``background_range`` that covers
    the fitted values.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    nddata : `~astropy.nddata.NDData`
        The image, with a first guess of the background in ``meta['background']``.
    n_iterations : int, optional
        Number of catalog-and-fit rounds.
    model : {'plane', 'constant'}, optional
        Background model per band.
    edge : int, optional
        Border width in pixels left out of the fit.

    Returns
    -------
    image : `~astropy.nddata.NDData`
        A copy of ``nddata`` whose ``meta['background']`` is the fitted background map
        (bands, rows, cols).
    history : `~astropy.table.QTable`
        Per iteration: the mean background of each band (``background_<band>``) and the
        number of stars in the modal catalog (``n_stars``).
    """
    if model not in ("plane", "constant"):
        raise ValueError(f"model must be 'plane' or 'constant', got {model!r}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be at least 1, got {n_iterations}")
    data = np.asarray(nddata.data, dtype=float)
    n_bands, rows, cols = data.shape
    if min(rows, cols) <= 2 * edge + 3:
        raise ValueError(f"image of {rows} x {cols} pixels is too small for edge={edge}")
    renderer = StarFieldRenderer(deblender.psfs, stamp_size=deblender.stamp_size)
    inner = (slice(edge, rows - edge), slice(edge, cols - edge))
    y, x = np.mgrid[0:rows, 0:cols]
    design = np.stack([np.ones(rows * cols), (x.ravel() - cols / 2) / cols,
                       (y.ravel() - rows / 2) / rows], axis=1)
    if model == "constant":
        design = design[:, :1]
    fit_rows = np.zeros((rows, cols), dtype=bool)
    fit_rows[inner] = True
    fit_rows = fit_rows.ravel()

    meta = dict(nddata.meta)
    history = []
    for iteration in range(n_iterations):
        current = NDData(nddata.data, mask=nddata.mask, wcs=nddata.wcs, unit=nddata.unit,
                         meta=meta)
        catalog = deblender(current)
        locs = torch.tensor(np.stack([catalog["x_fit"], catalog["y_fit"]], axis=-1)[None],
                            dtype=torch.float32).reshape(1, -1, 2)
        fluxes = torch.tensor(np.stack([catalog[f"flux_{b}"].value for b in deblender.bands],
                                       axis=-1)[None], dtype=torch.float32)
        fluxes = fluxes.reshape(1, -1, n_bands)
        stars = renderer.render(locs, fluxes, torch.ones(locs.shape[:2], dtype=bool),
                                (rows, cols))[0].double().numpy()
        background = np.empty_like(data)
        for band in range(n_bands):
            residual = (data[band] - stars[band]).ravel()
            coefficients = np.linalg.lstsq(design[fit_rows], residual[fit_rows], rcond=None)[0]
            background[band] = (design @ coefficients).reshape(rows, cols)
        meta = dict(meta, background=background)
        history.append({"iteration": iteration + 1, "n_stars": len(catalog),
                        **{f"background_{b}": float(background[i].mean())
                           for i, b in enumerate(deblender.bands)}})
    meta["background_fit"] = {"model": model, "n_iterations": n_iterations, "edge": edge}
    image = NDData(nddata.data, mask=nddata.mask, wcs=nddata.wcs, unit=nddata.unit, meta=meta)
    return image, QTable(rows=history, names=list(history[0]))
