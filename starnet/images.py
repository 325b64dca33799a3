"""Images as starnet reads them: astropy NDData in electrons, with PSF, background and noise.

An image is an `~astropy.nddata.NDData` (bands, rows, cols) whose ``meta`` holds
``'bands'`` (band names), ``'psf'`` (one PSF per band; or the NDData's own ``psf``)
and ``'background'`` (per band: a number or a map, in the image's unit unless a
Quantity). Its unit is electrons, or converts to electrons: ADU with ``meta['gain']``
(electrons per ADU), rates (per second) with ``meta['exptime']`` (seconds); FITS header
names (``GAIN``, ``EXPTIME``) are read too. An ``uncertainty`` is the total noise of
each pixel (`read_image`). `StarFieldImage` is such an image that can be sliced and
`cutout` cuts one out with `~astropy.nddata.Cutout2D`, both keeping a background map in
step with the pixels.
"""

import warnings
from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.nddata import Cutout2D, NDData, NDDataRef, VarianceUncertainty

from .validation import check_image_data, check_image_meta, check_mask

__all__ = ["StarFieldImage", "as_background", "cutout", "electrons_per_unit", "image_psfs",
           "read_image", "ElectronImage", "saturation_levels", "with_changes"]


#: The largest excess of an uncertainty's variance over the Poisson variance of the
#: pixels (the read-noise-like term of `read_image`), in units of the pixels' median
#: value: a noise 100 times the Poisson noise.
_MAX_EXCESS = 1e4


class StarFieldImage(NDDataRef):
    """An image whose slices keep its background map, PSF and meta in step with the pixels.

    Slicing works as on the data array: ``image[:, 10:60, 20:80]`` (all bands) or
    ``image[10:60, 20:80]`` for a one-band (rows, cols) image. The mask, uncertainty and
    WCS are sliced by astropy (`~astropy.nddata.NDSlicingMixin`); a background map in
    ``meta['background']`` is sliced with them, and ``meta['origin']`` records where the
    slice starts in the parent image, ``(row, col)``.

    Examples
    --------
    >>> from starnet import simulate_starfield, StarFieldPrior, PowerLawPSF
    >>> psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    >>> image, _ = simulate_starfield((40, 60), prior=StarFieldPrior(mu=0.01, bands=["r"]),
    ...                               psf=psf, background=700.0, seed=0)
    >>> part = image[:, 5:25, 10:40]
    >>> part.data.shape, part.meta["origin"]
    ((1, 20, 30), (5, 10))
    """

    def _slice_wcs(self, item):
        # a celestial (2-D) WCS of a (bands, rows, cols) image: slice rows and columns
        if self.wcs is not None and self.wcs.pixel_n_dim == 2 and np.ndim(self.data) == 3:
            item = _spatial(item, 3)
        return super()._slice_wcs(item)

    def _slice(self, item):
        kwargs = super()._slice(item)
        data = np.asarray(self.data)
        meta = dict(self.meta)
        background = meta.get("background")
        if background is not None and np.ndim(background) == data.ndim:   # a map
            meta["background"] = np.broadcast_to(background, data.shape, subok=True)[item]
        row_item, col_item = _spatial(item, data.ndim)
        if isinstance(row_item, slice) and isinstance(col_item, slice):
            rows = np.arange(data.shape[-2])[row_item]
            cols = np.arange(data.shape[-1])[col_item]
            if rows.size and cols.size:
                origin = meta.get("origin", (0, 0))
                meta["origin"] = (int(origin[0] + rows[0]), int(origin[1] + cols[0]))
        kwargs["meta"] = meta
        kwargs["psf"] = self.psf
        return kwargs


def _spatial(item, ndim):
    """The row and column parts of an index ``item`` of an array of ``ndim`` dimensions."""
    items = item if isinstance(item, tuple) else (item,)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (ndim - len(items) + 1) + items[at + 1:]
    items = items + (slice(None),) * (ndim - len(items))
    return items[-2], items[-1]


def cutout(nddata, position, size, *, mode="trim"):
    """A part of an image cut out by `~astropy.nddata.Cutout2D`, all bands, in step.

    Parameters
    ----------
    nddata : `~astropy.nddata.NDData`
        The image (bands, rows, cols) or (rows, cols).
    position : tuple or `~astropy.coordinates.SkyCoord`
        Centre of the cut-out: ``(x, y)`` in pixels, or a sky position (the image needs
        a WCS).
    size : int, tuple or `~astropy.units.Quantity`
        As for `~astropy.nddata.Cutout2D`: ``(ny, nx)`` pixels or angles.
    mode : {'trim', 'strict'}, optional
        As for `~astropy.nddata.Cutout2D` ('partial' would invent pixels).

    Returns
    -------
    image : `StarFieldImage`
        Pixels, mask, uncertainty, background map and WCS of the cut-out;
        ``meta['origin']`` is its first pixel in the parent, ``(row, col)``.
    """
    if mode not in ("trim", "strict"):
        raise ValueError(f"mode must be 'trim' or 'strict', got {mode!r}")
    data = np.asarray(nddata.data)
    box = Cutout2D(np.zeros(data.shape[-2:], dtype=bool), position, size, wcs=nddata.wcs,
                   mode=mode)
    image = nddata if isinstance(nddata, StarFieldImage) else with_changes(
        nddata, cls=StarFieldImage)
    part = image[(slice(None),) * (data.ndim - 2) + box.slices_original]
    if nddata.wcs is not None:
        part = with_changes(part, wcs=box.wcs)
    return part


def with_changes(nddata, *, cls=None, **changes):
    """A new image like ``nddata`` (same class unless ``cls``) with some attributes
    (``data``, ``mask``, ``uncertainty``, ``wcs``, ``unit``, ``psf``, ``meta``) replaced."""
    attributes = {name: getattr(nddata, name, None)
                  for name in ("data", "mask", "uncertainty", "wcs", "unit", "psf", "meta")}
    attributes.update(changes)
    cls = cls or (type(nddata) if isinstance(nddata, NDData) else NDData)
    return cls(attributes.pop("data"), **attributes)


def electrons_per_unit(unit, meta):
    """Electrons per unit of an image, using ``meta['gain']`` and ``['exptime']``.

    A number, or one per band when the gain or exposure time is given per band.

    >>> from astropy import units as u
    >>> float(electrons_per_unit(u.adu / u.s, {"GAIN": 4.0, "EXPTIME": 90.0}))
    360.0
    """
    if unit is None or u.Unit(unit) == u.electron:
        return 1.0
    quantity = 1.0 * u.Unit(unit)
    if _is_rate(quantity.unit):
        exptime = _meta_value(meta, "exptime")
        if exptime is None:
            raise ValueError(f"the image's unit is the rate {unit}; give its exposure time "
                             "in meta['exptime'] (seconds) to convert it to electrons")
        quantity = quantity * u.Quantity(_positive(exptime, "exptime", "seconds"), u.s)
    gain = _meta_value(meta, "gain")
    if quantity.unit.is_equivalent(u.adu):
        if gain is None:
            raise ValueError(f"the image's unit is {unit}; give the gain in meta['gain'] "
                             "(electrons per ADU) to convert it to electrons")
        quantity = quantity.to(u.adu) * u.Quantity(
            _positive(gain, "gain", "electrons per ADU"), u.electron / u.adu)
    try:
        scale = quantity.to_value(u.electron)
    except u.UnitConversionError:
        raise ValueError(f"the image's unit {unit} does not convert to electrons: starnet "
                         "works in photo-electrons (or ADU with a gain, or their rates "
                         "with an exposure time)") from None
    return float(scale) if np.ndim(scale) == 0 else np.asarray(scale, dtype=float)


def _positive(value, name, unit):
    """``meta[name]`` (a number or one per band) as floats, checked to be positive and
    finite."""
    try:
        values = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"meta['{name}'] must be a number ({unit}) or one per band, "
                         f"got {value!r}") from None
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"meta['{name}'] must be positive and finite ({unit}), got "
                         f"{values.tolist()}")
    return values


def _per_band(value, n_bands, name):
    """A number or one per band, as an array of ``n_bands`` floats."""
    value = np.asarray(value, dtype=float).reshape(-1)
    if value.size not in (1, n_bands):
        raise ValueError(f"{name} has {value.size} values for {n_bands} bands")
    return np.broadcast_to(value, (n_bands,))


def _is_rate(unit):
    return (unit * u.s).is_equivalent(u.electron) or (unit * u.s).is_equivalent(u.adu)


def _meta_value(meta, name):
    for key in (name, name.upper()):
        if key in meta:
            return meta[key]
    return None


def image_psfs(nddata, n_bands):
    """One PSF per band: ``meta['psf']``, else the NDData's ``psf`` (an array or model
    for one band, or a sequence or (bands, h, w) array, one per band)."""
    psf = nddata.meta.get("psf")
    if psf is None:
        psf = getattr(nddata, "psf", None)
    if psf is None:
        raise ValueError("the image has no PSF: give one per band in meta['psf'] or as "
                         "NDData(psf=...)")
    if isinstance(psf, np.ndarray) and psf.ndim == 3:
        psf = list(psf)
    psfs = list(psf) if isinstance(psf, (list, tuple)) else [psf] * n_bands
    if len(psfs) != n_bands:
        raise ValueError(f"the image has {len(psfs)} PSFs for {n_bands} bands")
    return psfs


def as_background(background, n_bands, shape=None, dtype=float):
    """Validate a background: scalar, one value per band, or a (n_bands, rows, cols) map.

    Returns an array of ``dtype`` (float64 by default; a map already of that type is not
    copied) of shape (n_bands,) or (n_bands, rows, cols), in electrons.
    """
    if isinstance(background, u.Quantity):
        background = background.to_value(u.electron)
    background = np.asarray(background, dtype=dtype)
    if background.ndim == 0:
        background = np.full(n_bands, float(background))
    if background.ndim == 1 and background.size != n_bands:
        raise ValueError(f"background has {background.size} values but there are {n_bands} "
                         "bands; give a scalar, one value per band or a (bands, rows, cols) map")
    if background.ndim == 3:
        wrong_size = shape is not None and background.shape[1:] != tuple(shape)
        if background.shape[0] != n_bands or wrong_size:
            raise ValueError(f"background map has shape {background.shape}, expected "
                             f"({n_bands}, rows, cols) matching the image {tuple(shape or ())}"
                             " (a part of an image needs the same part of its background "
                             "map: slice a starnet.images.StarFieldImage, or use "
                             "starnet.images.cutout)")
    elif background.ndim != 1:
        raise ValueError("background must be a scalar, one value per band or a "
                         f"(bands, rows, cols) map, got an array of shape {background.shape}")
    if not np.all(np.isfinite(background)) or np.any(background <= 0):
        raise ValueError("background must be finite and positive (electrons per pixel)")
    return background


@dataclass
class ElectronImage:
    """An image read by `read_image`: arrays in electrons, float32."""

    data: np.ndarray
    background: np.ndarray
    bad: np.ndarray
    pedestal: np.ndarray
    electrons_per_unit: np.ndarray
    meta: dict
    saturated: np.ndarray = None


def read_image(nddata, bands):
    """The pixels and background of an image in electrons, with its bad pixels.

    The data and a background without units are in the image's unit, converted by
    `electrons_per_unit`. An ``uncertainty`` gives the variance of each pixel; where it
    exceeds the pixel's Poisson variance (its value in electrons) by a read-noise-like
    term ``r2`` (the median of variance minus value, per band), ``r2`` is added to
    pixels and background alike: the noise is then the Poisson noise of the result, as
    in the images the model was trained on, and the mean is only shifted by what the
    background takes up. A variance below the Poisson one gets a warning. A pixel whose
    variance is infinite or NaN (an `~astropy.nddata.InverseVariance` of 0: no
    information) is bad, as a masked one. So is a saturated pixel: one at or above the
    saturation level of its band (`saturation_levels`: ``meta['saturation']`` or the
    FITS keyword ``SATURATE``, in the image's unit), or marked in ``meta['saturated']``
    (a boolean map, (rows, cols) or (bands, rows, cols)).

    Parameters
    ----------
    nddata : `~astropy.nddata.NDData`
    bands : list of str
        The bands the caller expects (a model's bands).

    Returns
    -------
    image : `ElectronImage`
        ``data`` (bands, rows, cols), ``background`` (bands, 1, 1) or (bands, rows,
        cols), ``bad`` (masked or non-finite pixels, or without a finite variance),
        ``pedestal`` and ``electrons_per_unit`` of the image's unit (bands,),
        ``meta``, and ``saturated`` (the saturated pixels, also bad; None without a
        saturation level).

    Raises
    ------
    ValueError
        If every pixel of a band is bad; if the gain or exposure time is not positive
        and finite; if the uncertainty holds negative variances or variances far above
        any noise of the pixels (`_MAX_EXCESS`).
    """
    meta = check_image_meta(nddata)
    if list(meta["bands"]) != list(bands):
        raise ValueError(f"the image has bands {list(meta['bands'])} but the model was "
                         f"trained for bands {list(bands)}")
    data = check_image_data(nddata.data, len(bands))
    if nddata.unit is None:
        warnings.warn("the image has no unit; its values are taken as electrons", UserWarning)
    scale = _per_band(electrons_per_unit(nddata.unit, meta), len(bands), "the gain")
    if np.any(scale != 1.0):
        data = data * scale.astype(np.float32)[:, None, None]
    background, factor = meta["background"], scale
    if isinstance(background, u.Quantity):
        factor = _per_band(electrons_per_unit(background.unit, meta), len(bands), "the gain")
        background = background.value
    if np.any(factor != 1.0):
        background = np.asarray(background, dtype=float)
        background = background * (factor if background.ndim <= 1 else factor[:, None, None])
    background = as_background(background, len(bands), data.shape[1:], dtype=np.float32)
    # one value per band stays (bands, 1, 1): it broadcasts, block by block
    background = background.reshape(len(bands), *(
        (1, 1) if background.ndim == 1 else background.shape[1:]))
    bad = ~np.isfinite(data)
    if nddata.mask is not None:
        bad |= check_mask(nddata.mask, data.shape)
    saturated = None
    levels = saturation_levels(meta, scale, len(bands))
    if levels is not None:
        with np.errstate(invalid="ignore"):
            saturated = data >= levels.astype(np.float32)[:, None, None]
    if meta.get("saturated") is not None:      # a map of them, such as SDSS's fpM SATUR
        marked = check_mask(meta["saturated"], data.shape)
        saturated = marked if saturated is None else saturated | marked
    if saturated is not None:
        bad |= saturated
    if nddata.uncertainty is not None:
        variance = _variance(nddata.uncertainty, scale[:, None, None], data.shape)
        bad |= ~np.isfinite(variance)    # zero inverse variance, NaN: no information
    _check_some_good(bad, bands)
    pedestal = np.zeros(len(bands), dtype=np.float32)
    if nddata.uncertainty is not None:
        pedestal = _pedestal(variance, data, bad, bands)
        data = data + pedestal[:, None, None]
        background = background + pedestal[:, None, None]
    return ElectronImage(data=data, background=background, bad=bad, pedestal=pedestal,
                         electrons_per_unit=np.asarray(scale, dtype=float), meta=meta,
                         saturated=saturated)


def saturation_levels(meta, scale, n_bands):
    """The saturation level of each band in electrons, or None when the image gives none.

    The level is ``meta['saturation']`` (or the FITS keyword ``SATURATE`` or
    ``SATURATION`` copied into the meta): a number or one per band, in the image's unit
    (converted by ``scale`` electrons per unit) or a `~astropy.units.Quantity` in
    electrons. A pixel at or above it holds less light than fell on it.

    >>> saturation_levels({"saturation": [5e4, 6e4]}, 2.0, 2)
    array([100000., 120000.])
    """
    value = None
    for key in ("saturation", "SATURATE", "SATURATION"):
        if meta.get(key) is not None:
            value = meta[key]
            break
    if value is None:
        return None
    if isinstance(value, u.Quantity):
        value, scale = value.to_value(u.electron), 1.0
    levels = _per_band(_positive(value, "saturation", "the image's unit"), n_bands,
                       "meta['saturation']")
    return levels * scale


def _check_some_good(bad, bands):
    """Raise ValueError if every pixel of a band is bad."""
    for band, band_bad in zip(bands, bad):
        if band_bad.all():
            raise ValueError(f"band {band}: every pixel is masked, not finite or has no "
                             "valid uncertainty (zero inverse variance, or a NaN or infinite "
                             "variance): there is nothing to catalog")


def _variance(uncertainty, scale, shape):
    """The variance of each pixel in electrons^2, broadcast to ``shape``; infinite where
    the uncertainty says the pixel holds no information (zero inverse variance)."""
    try:
        with np.errstate(divide="ignore"):   # an inverse variance of 0: infinite
            variance = uncertainty.represent_as(VarianceUncertainty).array
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"the image's uncertainty ({type(uncertainty).__name__}) cannot "
                         "be read as a variance: use astropy's VarianceUncertainty, "
                         "StdDevUncertainty or InverseVariance") from error
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            variance = np.broadcast_to(np.asarray(variance, dtype=np.float64) * scale ** 2,
                                       shape)
        except ValueError:
            raise ValueError(f"the uncertainty has shape {np.shape(variance)}, expected the "
                             f"image's {shape}") from None
        if np.any(variance < 0):
            raise ValueError(f"the image's uncertainty ({type(uncertainty).__name__}) holds "
                             "negative variances; expected variances >= 0 (an inverse "
                             "variance of 0 marks a pixel without information)")
    return variance


def _pedestal(variance, data, bad, bands):
    """Per band, the median excess of the variance over the pixel value (electrons^2)."""
    pedestal = np.zeros(len(bands), dtype=np.float32)
    for b, band in enumerate(bands):
        good = ~bad[b]
        excess = float(np.median(variance[b][good] - data[b][good]))
        level = float(np.median(data[b][good]))
        if excess < -0.1 * level:
            warnings.warn(f"band {band}: the uncertainty's variance is below the Poisson "
                          f"variance of the pixels (median excess {excess:.0f} e-^2): a "
                          "variance of the sky alone, or a wrong gain? It is not used",
                          UserWarning)
        if excess > _MAX_EXCESS * max(level, 1.0):
            raise ValueError(f"band {band}: the uncertainty's variance exceeds the pixels' "
                             f"Poisson variance by {excess:.3g} e-^2 (median), a noise "
                             f"{np.sqrt(excess / max(level, 1.0)):.3g} times the Poisson "
                             "noise of the pixels: expected the total noise of each pixel "
                             "(read noise included), in the image's unit; is it in another "
                             "unit, or a standard deviation given as a variance?")
        pedestal[b] = max(excess, 0.0)
    return pedestal
