"""Checks of user input: images, their metadata and training settings.

Every check raises an error (or, where the input may still be right, issues a
warning) that says what was wrong and what was expected, before any work starts.
"""

import numbers
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from astropy.nddata import NDData
from scipy.ndimage import uniform_filter

__all__ = ["BackgroundMismatchWarning", "check_image_meta", "check_image_data", "check_mask",
           "check_background", "check_positive_int", "check_training_settings",
           "check_range", "check_seed", "check_writable", "check_shape", "check_memory",
           "memory_limit", "MemoryLimitError", "check_draws_memory"]

#: Below this z (pixel minus background, in units of the background's Poisson noise)
#: lies the 16th percentile of an image whose declared background is too high (a
#: sparse field whose background is declared 20 % too high reaches it; a sky-subtracted
#: image is near -25).
_LEVEL_TOO_LOW = -6.0
#: Above this z lies the 16th percentile of an image whose declared background is
#: far too low (crowded fields of 0.2 stars per pixel reach 35).
_LEVEL_TOO_HIGH = 60.0
#: Below this the spread (50th minus 16th percentile of z) is too small for
#: Poisson noise on the declared background: not electrons, or a smoothed image.
_NOISE_TOO_LOW = 0.3
#: The level checks read a regular subsample of at most about this many pixels per
#: band: their percentiles are then known to better than 0.01 sigma.
_MAX_SAMPLED = 250_000
#: The dark-pixel checks read a block of at most this many pixels a side. (A smaller
#: block moves their statistics: the noise of SDSS's resampled i band lies below
#: Poisson noise in sparse sky, 0.3 of it at the top-left 500 x 500 pixels of the M2
#: frame, and is raised by star light in the crowded 1000 x 1000.)
_DARK_SIDE = 1000
#: The darkest pixels: this fraction of the pixels with the lowest mean of their 8
#: neighbours. Their level and noise estimate the sky, independently of the declared
#: background (`_dark_pixels`).
_DARK_FRACTION = 0.1
#: Below this ratio of the dark pixels' variance to their level, their noise is the
#: Poisson noise of the sky (above it, star light varies among them: a crowded field).
_SKY_ONLY = 1.5
#: Above this ratio of the dark pixels' level to the declared background, the
#: background is too low: in a field whose dark pixels are sky, and in a crowded one
#: (where they hold star light too: up to 2.6 at 0.2 stars per pixel, 1.4 on M2).
_DARK_TOO_HIGH = (1.6, 3.0)
#: Below this ratio of the dark pixels' variance to their level, the noise is far
#: below Poisson noise in electrons (0.6 on M2's resampled i band; 0.36 and 0.12 for
#: M2 in ADU).
_DARK_NOISE_TOO_LOW = 0.4
#: The dark-pixel checks need this many pixels in a band (at most a block of
#: ``_DARK_SIDE`` pixels a side is read).
_MIN_DARK = 1000


class BackgroundMismatchWarning(UserWarning):
    """The pixels of an image contradict its declared background."""


class MemoryLimitError(ValueError, MemoryError):
    """A request would need more memory than `memory_limit` (raised before allocating).

    A ValueError (the request is what is wrong) and a MemoryError."""


def memory_limit():
    """Bytes that one request may allocate: half of the machine's physical memory (8 GiB
    where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):
        return 8 * 2**30


def check_memory(n_bytes, what, *, advice=""):
    """Raise `MemoryLimitError` if ``what`` needs more than `memory_limit` bytes.

    >>> check_memory(10**15, "the image")
    Traceback (most recent call last):
    ...
    starnet.validation.MemoryLimitError: the image would need 931323 GiB of memory, more ...
    """
    limit = memory_limit()
    if n_bytes > limit:
        raise MemoryLimitError(f"{what} would need {n_bytes / 2**30:.0f} GiB of memory, more "
                               f"than the {limit / 2**30:.0f} GiB allowed (half of this "
                               f"machine's memory){'; ' + advice if advice else ''}")


def check_draws_memory(n_samples, image_shape, *, tile_size, max_sources, n_bands):
    """Refuse (`MemoryLimitError`) ``n_samples`` posterior catalogs of an image of
    ``image_shape`` (..., rows, cols) whose tile variables would not fit in memory:
    per tile and draw, a count and ``max_sources`` positions and fluxes (8 bytes each,
    twice: drawn, then gathered into the table).

    >>> check_draws_memory(100, (2, 100, 100), tile_size=2, max_sources=3, n_bands=2)
    """
    rows, cols = image_shape[-2:]
    n_tiles = -(-rows // tile_size) * -(-cols // tile_size)
    per_draw = n_tiles * (1 + max_sources * (2 + n_bands)) * 8 * 2
    check_memory(n_samples * per_draw, f"{n_samples} posterior catalogs of an image of "
                 f"{rows} x {cols} pixels", advice="draw fewer, or in several calls with "
                 "different seeds")


def check_shape(shape, name="shape"):
    """``shape`` as ``(rows, cols)``, two positive integers.

    >>> check_shape([20, 30])
    (20, 30)
    """
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2
            and all(isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_))
                    and n >= 1 for n in shape)):
        raise ValueError(f"{name} must be (rows, cols), two positive integers, got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_image_meta(nddata):
    """The meta of an image, checked to hold 'bands', 'background' and a PSF ('psf', or
    the NDData's own ``psf``)."""
    if not isinstance(nddata, NDData):
        raise TypeError(f"expected an astropy NDData image, got {type(nddata).__name__}")
    meta = nddata.meta
    missing = [key for key in ("bands", "psf", "background") if key not in meta
               and not (key == "psf" and getattr(nddata, "psf", None) is not None)]
    if missing:
        raise ValueError(f"the image's meta lacks {missing}: it needs 'bands' (band names), "
                         "'psf' (one PSF per band, or NDData(psf=...)) and 'background' "
                         "(per band, in the image's unit)")
    return meta


def check_image_data(data, n_bands):
    """``data`` as a float32 array (bands, rows, cols) of a model with ``n_bands`` bands.

    A 2-D image is taken as one band. Byte order is made native.

    >>> check_image_data(np.zeros((3, 4), dtype=">f8"), 1).shape
    (1, 3, 4)
    """
    data = np.asarray(data)
    if data.dtype == bool or not np.issubdtype(data.dtype, np.number) \
            or np.issubdtype(data.dtype, np.complexfloating):
        raise TypeError(f"image data must be real numbers (electrons), got dtype {data.dtype}")
    if data.ndim == 2 and n_bands == 1:
        data = data[None]
    if data.ndim != 3 or data.shape[0] != n_bands:
        raise ValueError(f"image data must have shape (bands={n_bands}, rows, cols), "
                         f"got {data.shape}")
    if min(data.shape[1:]) == 0:
        raise ValueError(f"the image has no pixels: shape {data.shape}")
    return np.asarray(data, dtype=np.float32)


def check_mask(mask, shape):
    """An NDData mask as a boolean array broadcast to ``shape`` (bands, rows, cols)."""
    mask = np.asarray(mask, dtype=bool)
    try:
        return np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(f"the image's mask has shape {mask.shape}; expected the image's "
                         f"shape {shape} or (rows, cols) = {shape[1:]}") from None


def check_background(data, background, bands, *, bad=None):
    """Check that the pixels agree with the declared background, band by band.

    The pixels of an image are its background plus stars (which only add light) plus
    noise with the variance of the Poisson noise of the light. So the lower part of
    the distribution of ``z = (pixel - background) / sqrt(background)`` lies near
    ``N(0, 1)`` in a sparse field and above it in a crowded one. A constant image is
    an error. Its 16th percentile below -6 (the declared background is too high:
    say, a sky-subtracted image with the sky declared), far above any crowded field
    (the declared background is far too low), or a spread (50th minus 16th
    percentile) below 0.3 (noise too low for electrons on this background: another
    unit, or a smoothed image) give a `BackgroundMismatchWarning` that says which.

    On images of at least 1000 pixels, the darkest pixels give a second opinion that
    does not rely on the declared background: the tenth of the pixels whose 8
    neighbours are darkest, their level ``L`` (their neighbours' median) and their
    variance ``V`` (robust, of each pixel less its neighbours' mean). In electrons
    ``V`` is about ``L`` where these pixels hold only sky (a 2 x too high ``V``, star
    light among them, marks a crowded field): ``V / L`` below 0.4 means a noise far
    below Poisson noise (ADU labelled as electrons, say); ``L`` above 1.6 times the
    declared background (3 times in a crowded field) means a background too low.

    Parameters
    ----------
    data : array, shape (bands, rows, cols)
        The image, electrons.
    background : array broadcastable to ``data``
        The declared background, electrons per pixel.
    bands : list of str
        Band names, for the messages.
    bad : array of bool, optional
        Pixels to leave out (masked or not finite).

    Examples
    --------
    >>> import warnings
    >>> rng = np.random.default_rng(0)
    >>> image = rng.normal(700, 700 ** 0.5, size=(1, 50, 50))
    >>> check_background(image, np.full((1, 1, 1), 700.0), ["r"])   # fine: no warning
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     check_background(image - 700, np.full((1, 1, 1), 700.0), ["r"])
    >>> "below the declared background" in str(caught[0].message)
    True
    """
    background = np.broadcast_to(background, data.shape)
    # a regular subsample of at most about _MAX_SAMPLED pixels per band, without copies
    step = max(1, int(np.ceil(np.sqrt(data[0].size / _MAX_SAMPLED))))
    for b, band in enumerate(bands):
        pixels, sky = data[b, ::step, ::step], background[b, ::step, ::step]
        if bad is not None:
            use = ~bad[b, ::step, ::step]
            pixels, sky = pixels[use], sky[use]
        pixels, sky = np.ravel(pixels), np.ravel(sky)
        if pixels.size and np.ptp(pixels) == 0:
            raise ValueError(f"band {band} of the image is constant ({pixels[0]:g} in every "
                             "pixel): there is nothing to catalog")
        if pixels.size < 100:
            continue
        z16, z50 = np.percentile((pixels - sky) / np.sqrt(np.maximum(sky, 1.0)), [16, 50])
        level = np.median(pixels)
        declared = np.median(sky)
        if z16 < _LEVEL_TOO_LOW:
            _warn(band, f"its pixels lie below the declared background (median {level:.4g} "
                  f"against {declared:.4g} e-): a sky-subtracted image, or a background "
                  "too high? Pass the image with its sky in electrons, or estimate the "
                  "background with starnet.background.fit_background")
        elif z16 > _LEVEL_TOO_HIGH:
            _warn(band, f"its pixels lie far above the declared background (median "
                  f"{level:.4g} against {declared:.4g} e-), more than the stars of any "
                  "crowded field add: is the background too low? Estimate it with "
                  "starnet.background.fit_background")
        elif z50 - z16 < _NOISE_TOO_LOW:
            _warn(band, f"its noise ({np.percentile(pixels, 50) - np.percentile(pixels, 16):.3g}"
                  f") is far below the Poisson noise of the declared background "
                  f"({np.sqrt(max(declared, 1.0)):.3g} e-): is the image in electrons?")
        else:
            _check_dark_pixels(data[b], background[b], None if bad is None else bad[b], band)


def _check_dark_pixels(data, background, bad, band):
    """The checks of `check_background` on the darkest pixels of a band."""
    side = _DARK_SIDE
    data = np.asarray(data[:side, :side], dtype=np.float64)
    background = np.asarray(background[:side, :side], dtype=np.float64)
    usable = np.ones(data.shape, bool) if bad is None else ~bad[:side, :side]
    usable = uniform_filter(usable.astype(np.float64), 3, mode="constant") > 1 - 1e-6
    if usable.sum() < _MIN_DARK:
        return
    neighbours = (uniform_filter(data, 3, mode="nearest") * 9 - data) / 8
    dark = usable & (neighbours <= np.quantile(neighbours[usable], _DARK_FRACTION))
    residual = (data - neighbours)[dark]
    variance = (1.4826 * np.median(np.abs(residual - np.median(residual)))) ** 2 / (1 + 1 / 8)
    level = np.median(neighbours[dark])
    declared = np.median(background[dark])
    if level > 0 and variance < _DARK_NOISE_TOO_LOW * level:
        _warn(band, f"the noise of its darkest pixels ({np.sqrt(variance):.3g}) is far below "
              f"the Poisson noise of their level ({np.sqrt(level):.3g} e-, at "
              f"{level:.4g}): is the image in electrons (ADU need a gain)?")
    elif level > _DARK_TOO_HIGH[int(variance > _SKY_ONLY * level)] * declared:
        _warn(band, f"its darkest pixels lie at {level:.4g} e-, {level / declared:.2g} times "
              f"the declared background ({declared:.4g} e-): is the background too low? "
              "Estimate it with starnet.background.fit_background")


def _warn(band, message):
    warnings.warn(f"band {band}: {message}", BackgroundMismatchWarning, stacklevel=4)


def check_positive_int(value, name):
    """``value`` as an int, checked to be a positive integer (not a bool or a string).

    >>> check_positive_int(3, "batch_size")
    3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(seed, name="seed"):
    """``seed`` checked to be what numpy's `numpy.random.default_rng` takes as a seed
    here: None (fresh entropy), an integer >= 0 (a Python or numpy integer, not a bool)
    or a `numpy.random.Generator` (drawn from). A float is refused rather than
    truncated, so that seeds 1.5 and 1 do not give the same draws.

    Raises
    ------
    TypeError
        If ``seed`` is of another type.
    ValueError
        If it is a negative integer.

    Examples
    --------
    >>> check_seed(7)
    7
    >>> check_seed(1.5)
    Traceback (most recent call last):
    ...
    TypeError: seed must be an integer >= 0, a numpy Generator or None, got float 1.5
    """
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 0, a numpy Generator or None, got "
                        f"{type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"{name} must be an integer >= 0, a numpy Generator or None, got "
                         f"{seed!r}")
    return int(seed)


def check_writable(path, what):
    """Raise before any work if the file ``path`` (``what``, for the message) could not
    be written: its folder does not exist or is not writable, or it is a folder.

    >>> check_writable("no_such_folder/fit.ckpt", "checkpoint")
    Traceback (most recent call last):
    ...
    FileNotFoundError: the folder no_such_folder of the checkpoint fit.ckpt does not exist
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"the {what} {path} is a folder; expected a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} of the {what} {path.name} does "
                                "not exist")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"the folder {path.parent} of the {what} {path.name} is not "
                              "writable")
    return path


def check_training_settings(settings):
    """Check a `~starnet.training.TrainingSettings`; raise ValueError naming the field.

    >>> from starnet.training import TrainingSettings
    >>> TrainingSettings(batch_size=0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be a positive integer, got 0
    """
    for name in ("batch_size", "batches_per_epoch", "n_epochs", "n_validation"):
        check_positive_int(getattr(settings, name), name)
    shape = settings.image_shape
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
        raise ValueError(f"image_shape must be (rows, cols), got {shape!r}")
    for size in shape:
        check_positive_int(size, "image_shape")
    if settings.n_steps is not None:
        check_positive_int(settings.n_steps, "n_steps")
    if settings.average_steps != 0:
        check_positive_int(settings.average_steps, "average_steps")
    for name in ("learning_rate", "weight_decay", "margin", "final_learning_rate",
                 "max_time", "count_score_weight"):
        value = getattr(settings, name)
        if value is None and name in ("final_learning_rate", "max_time"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not np.isfinite(value) or value < 0 or (name == "max_time" and value == 0):
            kind = "positive" if name == "max_time" else "non-negative"
            raise ValueError(f"{name} must be a {kind} number, got {value!r}")
    blocks = settings.count_blocks
    if not (isinstance(blocks, (tuple, list)) and blocks):
        raise ValueError(f"count_blocks must be a tuple of block sides in tiles, got {blocks!r}")
    for side in blocks:
        check_positive_int(side, "count_blocks")
    check_range(settings.background_range, "background_range", positive=True)
    check_range(settings.psf_variant_range, "psf_variant_range", positive=False)
    for name in ("density_range", "f_max_range", "alpha_range"):
        if getattr(settings, name) is not None:
            check_range(getattr(settings, name), name, positive=True)
    gradient = settings.density_gradient
    if isinstance(gradient, bool) or not isinstance(gradient, (int, float, np.floating)) \
            or not np.isfinite(gradient) or gradient < 0:
        raise ValueError(f"density_gradient must be a finite number >= 0, got {gradient!r}")
    if settings.seed is None or isinstance(settings.seed, np.random.Generator):
        raise ValueError(f"seed must be an integer >= 0 (saved with the model), got "
                         f"{settings.seed!r}")
    check_seed(settings.seed)


def check_range(value, name, *, positive):
    """``(low, high)`` as floats, checked to be finite with ``low <= high`` (and
    ``0 < low`` when ``positive``); ValueError naming ``name`` otherwise.

    >>> check_range([0.001, 0.2], "density_range", positive=True)
    (0.001, 0.2)
    """
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (low, high), got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low <= high) or (positive and low <= 0):
        raise ValueError(f"{name} must be (low, high) with {'0 < ' if positive else ''}"
                         f"low <= high, got {value!r}")
    return low, high


@contextmanager
def keep_finite(network, where, learning_rate):
    """Stop a training step that makes the loss or the weights of ``network`` non-finite.

    The block gets ``check(loss)``, which returns a finite loss and raises otherwise;
    after the block, the weights are checked. On a failure ``network`` is given back
    the weights it had before the step (the last finite ones) and a RuntimeError
    names the step (``where``) and the ``learning_rate``.
    """
    before = {name: value.detach().clone() for name, value in network.state_dict().items()}

    def check(loss):
        if not bool(torch.isfinite(loss)):
            fail(f"the loss is {loss.item()}")
        return loss

    def fail(what):
        network.load_state_dict(before)
        raise RuntimeError(f"training diverged at {where}: {what}. The network keeps the "
                           "weights of the step before (the last finite ones); lower the "
                           f"learning rate ({learning_rate:g}) and train again")

    yield check
    if not all(bool(torch.isfinite(p).all()) for p in network.parameters()):
        fail("the weights became non-finite")
