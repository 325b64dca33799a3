"""Pictures to check a catalog: the stars over the image, the residual, the star count.

Astronomers judge a PSF fit by its residual image, the pixels minus the light of the
catalog's stars minus the background: pure noise where the catalog explains the image,
a ring or a dipole where a star is missing, split or misplaced.

* `plot_catalog`: the image with each star as an ellipse whose half-axes are the
  posterior standard deviations of its position, coloured by its detection probability;
* `residual_image`: ``data - render(catalog) - background``, in electrons;
* `plot_count_posterior`: the posterior of the number of stars with its mean and 90 %
  interval;
* `quicklook`: the three in one PNG file (``starnet catalog ... --quicklook FILE.png``).

The plotting functions need matplotlib (a dependency of starnet), imported when they
are called.
"""

import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.nddata import NDData

from .background import choose_background
from .images import read_image
from .model_files import write_atomically

__all__ = ["plot_catalog", "residual_image", "plot_count_posterior", "quicklook"]

#: Columns of a catalog that `plot_catalog` draws.
_CATALOG_COLUMNS = ("x_fit", "y_fit", "x_err", "y_err", "detection_prob")


def plot_catalog(image, catalog, *, band=0, ax=None):
    """The image with the catalog's stars as ellipses of their position uncertainty.

    The image is shown with an asinh stretch (`~astropy.visualization.AsinhStretch`
    between its 0.5 and 99.5 % percentiles), pixel ``(x, y)`` = (column, row) at
    ``(x, y)`` with the origin at the lower left. Each star is an ellipse centred on
    ``(x_fit, y_fit)`` with half-axes ``x_err`` and ``y_err`` (the posterior standard
    deviations), its colour the detection probability (colour bar from 0 to 1).

    Parameters
    ----------
    image : `~astropy.nddata.NDData` or `numpy.ndarray`
        The image, (bands, rows, cols) or (rows, cols).
    catalog : `~astropy.table.QTable`
        A catalog of `~starnet.StarNetDeblender`: columns ``x_fit``, ``y_fit``,
        ``x_err``, ``y_err`` and ``detection_prob``.
    band : int or str, optional
        The band shown: its index, or its name in ``image.meta['bands']``.
    ax : `matplotlib.axes.Axes`, optional
        Where to draw; default: the current axes of pyplot.

    Returns
    -------
    ax : `matplotlib.axes.Axes`
        The axes; ``ax.collections[0]`` holds the ellipses (an
        `~matplotlib.collections.EllipseCollection`, one per star).

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import QTable
    >>> from matplotlib.figure import Figure
    >>> from starnet.visualization import plot_catalog
    >>> catalog = QTable({"x_fit": [3.0, 7.2], "y_fit": [4.0, 5.5], "x_err": [0.1, 0.4],
    ...                   "y_err": [0.2, 0.3], "detection_prob": [0.99, 0.6]})
    >>> ax = plot_catalog(np.random.default_rng(0).normal(size=(10, 12)), catalog,
    ...                   ax=Figure().subplots())
    >>> len(ax.collections[0].get_offsets())
    2
    """
    from matplotlib.collections import EllipseCollection
    from astropy.visualization import AsinhStretch, ImageNormalize, PercentileInterval

    missing = [name for name in _CATALOG_COLUMNS if name not in catalog.colnames]
    if missing:
        raise ValueError(f"the catalog lacks the columns {missing}: plot_catalog draws a "
                         f"catalog of StarNetDeblender, with columns {list(_CATALOG_COLUMNS)}")
    data, name = _band_image(image, band)
    ax = _axes(ax)
    norm = ImageNormalize(data, interval=PercentileInterval(99.0), stretch=AsinhStretch())
    ax.imshow(data, origin="lower", cmap="gray", norm=norm, interpolation="nearest")
    xy = np.column_stack([np.asarray(catalog["x_fit"], float),
                          np.asarray(catalog["y_fit"], float)])
    ellipses = EllipseCollection(2 * np.asarray(catalog["x_err"], float),
                                 2 * np.asarray(catalog["y_err"], float),
                                 np.zeros(len(catalog)), units="xy", offsets=xy,
                                 offset_transform=ax.transData, facecolors="none",
                                 cmap="plasma", clim=(0.0, 1.0), linewidths=1.0)
    ellipses.set_array(np.asarray(catalog["detection_prob"], float))   # edge colours
    ax.add_collection(ellipses, autolim=False)
    ax.figure.colorbar(ellipses, ax=ax, label="detection probability")
    ax.set(xlabel="x (column, pixels)", ylabel="y (row, pixels)",
           title=f"{len(catalog)} stars, band {name}")
    return ax


def residual_image(deblender, nddata, catalog, *, background=None):
    """The image minus the light of the catalog's stars minus the background.

    The light is `~starnet.StarNetDeblender.render`'s, through the model's PSFs; the
    image and its background are in electrons (`starnet.images.read_image`). Where the
    catalog and the background explain the image, the residual is its noise: mean 0
    and standard deviation ``sqrt(background + light)`` (Poisson), ``sqrt(background)``
    away from the stars.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
        The model whose PSFs and bands render the catalog.
    nddata : `~astropy.nddata.NDData`
        The image, as `~starnet.StarNetDeblender` takes it.
    catalog : `~astropy.table.QTable`
        Positions (``x_fit``, ``y_fit`` or ``x``, ``y``) and ``flux_<band>`` for the
        model's bands: a catalog of the deblender, a posterior draw or a true catalog.
    background : {None, 'fit', 'given'}, optional
        The background subtracted: 'given' is ``meta['background']``, 'fit' the model's
        estimate from the pixels (`starnet.background.fit_background`). Default: the one
        the catalog was made with (``catalog.meta['background_source']``), else 'given'.

    Returns
    -------
    residual : `~astropy.nddata.NDData`
        ``data`` (bands, rows, cols) in electrons, NaN at bad pixels (masked or
        non-finite), which ``mask`` marks; the image's WCS; ``meta['bands']`` and
        ``meta['background_source']`` ('given' or 'fitted').

    Examples
    --------
    The residual of a simulated image for its true catalog is its noise:

    >>> import numpy as np
    >>> from starnet import StarNetDeblender, simulate_starfield
    >>> from starnet.visualization import residual_image
    >>> deblender = StarNetDeblender.pretrained("sdss-m2")
    >>> image, truth = simulate_starfield((40, 40), psf=deblender.psfs,
    ...                                   background=deblender.background, seed=0)
    >>> residual = residual_image(deblender, image, truth)
    >>> print(residual.data.shape, residual.unit)
    (2, 40, 40) electron
    >>> noise = np.sqrt(deblender.background[:, None, None] + deblender.render(truth, (40, 40)))
    >>> print(np.round((residual.data / noise).std(axis=(1, 2)), 1))   # Poisson noise
    [1. 1.]
    """
    if background is None:
        background = "fit" if catalog.meta.get("background_source") == "fitted" else "given"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*masked or non-finite pixels")   # said before
        image = choose_background(deblender, nddata, background)
    electrons = read_image(image, deblender.bands)
    light = deblender.render(catalog, electrons.data.shape[1:])
    residual = np.asarray(electrons.data, dtype=float) - light - electrons.background
    residual[electrons.bad] = np.nan
    return NDData(residual, unit=u.electron, mask=electrons.bad,
                  wcs=getattr(nddata, "wcs", None),
                  meta={"bands": deblender.bands,
                        "background_source": image.meta.get("background_used", "given")})


def plot_count_posterior(pmf, *, truth=None, ax=None):
    """The posterior of the number of stars, with its mean and 90 % interval.

    Parameters
    ----------
    pmf : array_like
        ``pmf[k]``: the posterior probability of ``k`` stars, as
        `~starnet.StarNetDeblender.count_posterior` returns it.
    truth : int, optional
        A true count to mark (of a simulated image).
    ax : `matplotlib.axes.Axes`, optional
        Where to draw; default: the current axes of pyplot.

    Returns
    -------
    ax : `matplotlib.axes.Axes`
        One bar per count from the 0.1 % to the 99.9 % quantile, the 90 % interval
        shaded, the mean (and ``truth``) as vertical lines.

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> from scipy.stats import poisson
    >>> from starnet.visualization import plot_count_posterior
    >>> ax = plot_count_posterior(poisson.pmf(range(200), 100), truth=104,
    ...                           ax=Figure().subplots())
    >>> print(ax.get_title())
    number of stars: 100.0 (84, 117)
    """
    pmf = np.asarray(pmf, dtype=float)
    if pmf.ndim != 1 or not np.all(np.isfinite(pmf) & (pmf >= 0)) \
            or not np.isclose(pmf.sum(), 1.0, atol=1e-3):
        raise ValueError("pmf must be the probabilities of 0, 1, 2, ... stars: one "
                         "dimension, non-negative, summing to 1 (as count_posterior "
                         f"returns them); got shape {pmf.shape} summing to {pmf.sum():.4g}")
    counts = np.arange(len(pmf))
    cdf = np.cumsum(pmf)
    low, q05, q95, high = np.minimum(np.searchsorted(cdf, [0.001, 0.05, 0.95, 0.999]),
                                     len(pmf) - 1)
    mean = float(np.dot(counts, pmf))
    ax = _axes(ax)
    ax.bar(counts[low:high + 1], pmf[low:high + 1], width=1.0, color="0.6")
    ax.axvspan(q05 - 0.5, q95 + 0.5, color="C0", alpha=0.2,
               label=f"90 % interval ({q05}, {q95})")
    ax.axvline(mean, color="C0", label=f"mean {mean:.1f}")
    if truth is not None:
        ax.axvline(truth, color="C3", linestyle="--", label=f"truth {truth}")
    ax.set(xlabel="number of stars", ylabel="posterior probability",
           title=f"number of stars: {mean:.1f} ({q05}, {q95})")
    ax.legend(loc="upper right", fontsize="small")
    return ax


def quicklook(deblender, nddata, catalog, path, *, band=0, residual=None, pmf=None,
              overwrite=False):
    """Write one PNG of the catalog over the image, the residual and the star count.

    Panels: `plot_catalog`; the residual image (`residual_image`) on a linear scale of
    +-5 times its robust standard deviation (blue below zero, red above); and
    `plot_count_posterior`. The background is the one the catalog was made with.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    nddata : `~astropy.nddata.NDData`
        The image the catalog was made from.
    catalog : `~astropy.table.QTable`
        The deblender's catalog of the image.
    path : str or path-like
        The PNG file to write (atomically).
    band : int or str, optional
        The band of the image and residual panels: its index or name.
    residual : `~astropy.nddata.NDData`, optional
        `residual_image`'s result, when it was computed already.
    pmf : array_like, optional
        `~starnet.StarNetDeblender.count_posterior`'s result, when it was computed
        already (otherwise the image is encoded again for it).
    overwrite : bool, optional
        Replace ``path`` if it exists.

    Returns
    -------
    figure : `matplotlib.figure.Figure`
        The figure written.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false (checked before any work).

    Examples
    --------
    >>> import os, tempfile
    >>> from starnet import StarNetDeblender, simulate_starfield
    >>> from starnet.visualization import quicklook
    >>> deblender = StarNetDeblender.pretrained("sdss-m2")
    >>> image, truth = simulate_starfield((40, 40), psf=deblender.psfs,
    ...                                   background=deblender.background, seed=0)
    >>> catalog = deblender(image, background="given")
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "quicklook.png")
    ...     figure = quicklook(deblender, image, catalog, path)
    ...     print(os.path.getsize(path) > 0, len(figure.axes))
    True 5
    """
    from matplotlib.figure import Figure

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    background = "fit" if catalog.meta.get("background_source") == "fitted" else "given"
    if residual is None:
        residual = residual_image(deblender, nddata, catalog, background=background)
    if pmf is None:
        with warnings.catch_warnings():   # said when the image was catalogued
            for repeated in (".*masked or non-finite pixels", "the image's PSF in band"):
                warnings.filterwarnings("ignore", repeated)
            pmf = deblender.count_posterior(nddata, background=background, progress=False)
    figure = Figure(figsize=(16, 5), layout="constrained")
    image_ax, residual_ax, count_ax = figure.subplots(1, 3)
    plot_catalog(nddata, catalog, band=band, ax=image_ax)
    _plot_residual(residual, band, residual_ax)
    plot_count_posterior(pmf, ax=count_ax)
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=100),
                     overwrite=overwrite)
    return figure


def _plot_residual(residual, band, ax):
    """The residual image on +-5 robust standard deviations, with a colour bar."""
    data, name = _band_image(residual, band)
    finite = data[np.isfinite(data)]
    sigma = 1.4826 * np.median(np.abs(finite - np.median(finite))) if finite.size else 1.0
    shown = ax.imshow(data, origin="lower", cmap="RdBu_r", vmin=-5 * sigma, vmax=5 * sigma,
                      interpolation="nearest")
    ax.figure.colorbar(shown, ax=ax, label="electrons")
    ax.set(xlabel="x (column, pixels)", ylabel="y (row, pixels)",
           title=f"residual, band {name} (robust sd {sigma:.0f} e-)")


def _band_image(image, band):
    """The (rows, cols) pixels of ``band`` (index or name) of an image, and the band's
    name (or index, for an image without band names)."""
    data = np.asarray(getattr(image, "data", image), dtype=float)
    bands = list(getattr(image, "meta", {}).get("bands", []))
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"the image must be (bands, rows, cols) or (rows, cols); got "
                         f"shape {data.shape}")
    if isinstance(band, str):
        if band not in bands:
            raise ValueError(f"band {band!r} is not one of the image's bands {bands}")
        band = bands.index(band)
    if not -data.shape[0] <= band < data.shape[0]:
        raise ValueError(f"band {band} is out of range for an image of {data.shape[0]} "
                         "band(s)")
    return data[band], bands[band] if bands else band


def _axes(ax):
    """``ax``, or pyplot's current axes."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt
    return plt.gca()
