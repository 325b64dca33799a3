"""Estimating the background of an image by amortized inference.

The model's background is known only up to a factor (the SDSS sky, for instance, leaves
out the light of unresolved stars). A deblender trained with a ``background_range`` has
seen images whose background is its nominal background times a factor ``s`` drawn
uniformly from that range, the same factor in every band. A small convolutional network,
`BackgroundEncoder`, is fitted on such simulated images, by the same forward KL as the
catalog encoder, to give the posterior of ``log s`` from each cell of the image; the cells'
posteriors are combined into one factor per image (`fit_background`).
`choose_background` gives an image the background that a deblender's ``background``
option asks for.
"""

import math
import time
import warnings

import numpy as np
import torch
from astropy.table import QTable
from scipy.ndimage import gaussian_filter
from torch import nn
from torch.nn import functional as F

from .encoder import normalize_image
from .images import with_changes
from .inference import prepare_image
from .prior import _seed_int
from .progress import progress_bar
from .validation import check_positive_int, keep_finite

__all__ = ["BackgroundEncoder", "train_background_encoder", "fit_background",
           "choose_background", "combine_cells"]

#: Width (pixels) of the window over which the background factor of an image larger
#: than 256 pixels is smoothed when it is fitted (`choose_background`).
_FIT_SMOOTHING = 64.0


HALO_CELLS = 3
"""Cells read beyond each strip by `BackgroundEncoder.forward_in_strips`."""


class BackgroundEncoder(nn.Module):
    """Posterior of the background factor, one normal on ``log s`` per cell of the image.

    Three 3 x 3 convolutions at pixel resolution, a ``cell_size`` x ``cell_size``
    convolution with that stride, two 3 x 3 convolutions between cells and a 1 x 1 head
    that gives the mean and log standard deviation of ``log s``. The input is the
    catalog encoder's (`~starnet.encoder.normalize_image`) computed with the nominal
    background, so the network sees the image only.

    Parameters
    ----------
    n_bands : int
    cell_size : int
        Side of a cell in pixels.
    hidden : int
        Channels at pixel resolution (twice as many between cells).
    """

    def __init__(self, *, n_bands, cell_size=8, hidden=16):
        super().__init__()
        self.n_bands = n_bands
        self.cell_size = cell_size
        self.hidden = hidden
        self.layers = nn.Sequential(
            nn.Conv2d(2 * n_bands, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * hidden, cell_size, stride=cell_size), nn.ReLU(inplace=True),
            nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * hidden, 2, 1))
        # channels-last convolutions are 2-3 times faster here on a CPU (oneDNN)
        self.to(memory_format=torch.channels_last)

    def forward(self, image, nominal):
        """Mean and standard deviation of ``log s`` per cell, each (n_images, rows, cols).

        ``image`` is (n_images, n_bands, rows, cols) electrons; ``nominal`` the nominal
        background, broadcastable to it. Images are padded with zeros to whole cells.
        """
        x = normalize_image(image, nominal)
        rows, cols = x.shape[-2:]
        x = F.pad(x, (0, -cols % self.cell_size, 0, -rows % self.cell_size))
        out = self.layers(x.contiguous(memory_format=torch.channels_last))
        return out[:, 0], torch.exp(out[:, 1].clamp(-6, 2))

    def forward_in_strips(self, image, nominal, *, strip_cells=32):
        """`forward` on strips of ``strip_cells`` rows of cells at a time, with the same
        result: each strip is read with a margin of `HALO_CELLS` cells above and below,
        more than the network's reach (3 pixels, then 2 cells), so its pixel-resolution
        layers never hold more than a strip of a large image.
        """
        cell = self.cell_size
        n_rows = -(-image.shape[-2] // cell)
        means, sds = [], []
        for start in range(0, n_rows, strip_cells):
            stop = min(start + strip_cells, n_rows)
            low, high = max(start - HALO_CELLS, 0), min(stop + HALO_CELLS, n_rows)
            mean, sd = self(image[..., low * cell:high * cell, :], nominal)
            means.append(mean[:, start - low:stop - low])
            sds.append(sd[:, start - low:stop - low])
        return torch.cat(means, dim=1), torch.cat(sds, dim=1)


def train_background_encoder(encoder, batches, *, n_steps=2000, batch_size=16,
                             learning_rate=1e-3, final_learning_rate=1e-5, seed=0,
                             progress=True):
    """Fit ``encoder`` by the forward KL: mean of ``-log q(log s | cell)`` on simulated images.

    Parameters
    ----------
    encoder : `BackgroundEncoder`
        Trained in place.
    batches : `~starnet.training.SimulatedBatches`
        The generative model, with the ``background_range`` to learn.
    n_steps, batch_size : int
        Gradient steps and images per step.
    learning_rate, final_learning_rate : float
        Adam's rate decays from the first to the second by a cosine over the steps.
    seed : int
        Seed of the simulated images.
    progress : bool
        Show a progress bar.

    Returns
    -------
    history : `~astropy.table.QTable`
        One row per tenth of the steps: ``step``, ``loss`` (mean over those steps),
        ``seconds``.

    Raises
    ------
    ValueError
        If ``n_steps`` or ``batch_size`` is not a positive integer.
    RuntimeError
        If the loss or the weights become non-finite (the encoder keeps the weights
        of the step before: `starnet.validation.keep_finite`).
    """

    n_steps = check_positive_int(n_steps, "n_steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    optimizer = torch.optim.Adam(encoder.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, n_steps,
                                                          eta_min=final_learning_rate)
    generator = torch.Generator().manual_seed(_seed_int(seed))
    nominal = batches.background.reshape(1, -1, 1, 1)
    encoder.train()
    history, losses, started = [], [], time.perf_counter()
    report_every = max(n_steps // 10, 1)
    for step in progress_bar(range(1, n_steps + 1), enabled=progress):
        images, background, _ = batches.draw(batch_size, generator=generator)
        log_scale = torch.log(background[:, 0, 0, 0] / nominal[0, 0, 0, 0])
        with keep_finite(encoder, f"step {step}", learning_rate) as check:
            mean, sd = encoder(images, nominal)
            loss = check((0.5 * ((log_scale[:, None, None] - mean) / sd) ** 2
                          + torch.log(sd)).mean())
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % report_every == 0 or step == n_steps:
            history.append({"step": step, "loss": float(np.mean(losses)),
                            "seconds": time.perf_counter() - started})
            losses = []
    encoder.eval()
    return QTable(rows=history, names=["step", "loss", "seconds"])


def combine_cells(mean, sd):
    """Combine the cells' normal posteriors of ``log s`` by their precisions.

    Returns ``(log_scale, log_scale_sd)``: the precision-weighted mean and the standard
    deviation of the product of the normals. Cells' windows overlap, so the cells are
    not independent and the standard deviation is a lower bound.

    >>> mean, sd = combine_cells([0.1, 0.3], [0.1, 0.1])
    >>> print(f"{mean:.3f} {sd:.4f}")
    0.200 0.0707
    """
    precision = 1 / np.asarray(sd, dtype=float) ** 2
    total = precision.sum()
    return float((np.asarray(mean) * precision).sum() / total), float(1 / math.sqrt(total))


def _log_shape(given, rows, cols, bands):
    """The shape of a given background (bands, rows or 1, cols or 1): per pixel, the mean
    over the bands of the log of the map relative to its median, (rows, cols) float32;
    zero for a constant background. Warns when the bands' shapes differ by more than
    5 %, which the mean shape drops."""
    given = np.asarray(given, dtype=np.float32)      # float32 logs: errors of 1e-7
    if given.shape[-2:] == (1, 1):
        return np.zeros((rows, cols), dtype=np.float32)
    median = np.median(given.reshape(len(given), -1), axis=1).astype(np.float32)
    per_band = np.log(given / median[:, None, None])
    shape = per_band.mean(axis=0, dtype=np.float32)
    spread = float(np.abs(per_band - shape).max())
    if spread > 0.05:
        warnings.warn(f"the given background maps of bands {bands} differ in shape (by up "
                      f"to {np.expm1(spread):.0%}); the fitted background is a factor on "
                      "their mean shape, the same in every band as in training: the "
                      "difference is dropped", UserWarning)
    return np.broadcast_to(shape, (rows, cols)).astype(np.float32)


def _bilinear_to_pixels(cell_map, cell, rows, cols):
    """Linear interpolation of a map of cells (cell k's centre at pixel ``(k + 0.5) *
    cell - 0.5``) to every pixel, constant beyond the outer centres; float32, one axis at
    a time (the same as ``map_coordinates(order=1, mode='nearest')`` without its
    coordinate grids, which cost 16 bytes a pixel)."""
    def weights(n_pixels, n_cells):
        position = np.clip((np.arange(n_pixels) + 0.5) / cell - 0.5, 0, n_cells - 1)
        lower = np.minimum(np.floor(position).astype(int), n_cells - 1)
        upper = np.minimum(lower + 1, n_cells - 1)
        return lower, upper, (position - lower).astype(np.float32)

    cell_map = cell_map.astype(np.float32)
    lower, upper, w = weights(rows, cell_map.shape[0])
    by_row = (1 - w)[:, None] * cell_map[lower] + w[:, None] * cell_map[upper]
    lower, upper, w = weights(cols, cell_map.shape[1])
    return (1 - w) * by_row[:, lower] + w * by_row[:, upper]


@torch.no_grad()
def fit_background(deblender, nddata, *, smoothing=None):
    """The image with its background replaced by the deblender's estimate from the pixels.

    The `BackgroundEncoder` of ``deblender`` (see
    `~starnet.StarNetDeblender.fit_background_encoder`) gives each whole 8 x 8 pixel
    cell a posterior of the background factor ``s`` (the pixels of a partial last row
    or column of cells are left out). By default the cells are combined by
    `combine_cells` into one factor, the same for every band as in training, and the
    background becomes ``s`` times the model's nominal background. With ``smoothing``,
    the factor varies over the image: at each cell, the precision-weighted mean of the
    cells' ``log s`` under a Gaussian window of ``smoothing`` pixels (standard
    deviation), interpolated linearly between cell centres; use it for fields whose
    unresolved light varies, such as a whole frame across a cluster. The level of
    ``meta['background']`` is not used, but the shape of a map is: the background
    becomes the fitted factor times the map relative to its median (in each cell, the
    map's mean ``log`` ratio to its median, over the bands, is taken out of the cell's
    ``log s`` before the cells are combined), so that a map with a gradient keeps it;
    maps whose shapes differ between bands by more than 5 % are given their mean shape,
    with a warning. Factors (on the map's shape) are clipped to the range the
    deblender was trained on, with a warning.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    nddata : `~astropy.nddata.NDData`
        The image (bands, rows, cols) in electrons, in the form the deblender takes.
    smoothing : float, optional
        Width in pixels of the window of a spatially varying background; by default one
        factor for the whole image.

    Returns
    -------
    image : `~astropy.nddata.NDData`
        A copy of ``nddata`` with the fitted background map (bands, rows, cols; in the
        image's unit) in ``meta['background']`` and the fit in
        ``meta['background_fit']``: ``scale``
        (the factor; with ``smoothing``, its median over the image), ``scale_sd`` (a
        lower bound on the standard deviation of the single factor; None with
        ``smoothing``) and ``smoothing``.
    cells : `~astropy.table.QTable`
        One row per cell: ``x``, ``y`` (cell centre, pixels), ``scale`` (``exp`` of the
        mean of ``log s``) and ``log_scale_sd``.

    Examples
    --------
    >>> from starnet import StarNetDeblender
    >>> from starnet.datasets import load_m2
    >>> deblender = StarNetDeblender.pretrained("sdss-m2")
    >>> image, truth = load_m2()
    >>> fitted, cells = fit_background(deblender, image)
    >>> print(f"{fitted.meta['background_fit']['scale']:.2f}")   # times the SDSS sky
    1.29
    """
    encoder = deblender.background_encoder
    if encoder is None:
        raise ValueError("this model has no background encoder; train one with "
                         "deblender.fit_background_encoder()")
    if smoothing is not None and not smoothing > 0:
        raise ValueError(f"smoothing must be a positive width in pixels, got {smoothing}")
    # the given background's level is what we estimate; its shape we keep
    inputs = prepare_image(nddata, bands=deblender.bands, psfs=deblender.psfs,
                           stamp_size=deblender.stamp_size, checks=False)
    image, given, read = inputs.image, inputs.background, inputs.meta
    del inputs
    nominal = torch.as_tensor(np.asarray(deblender.background, dtype=np.float32))
    cell = encoder.cell_size
    rows, cols = image.shape[-2:]
    if min(rows, cols) < cell:
        raise ValueError(f"the image ({rows} x {cols} pixels) is smaller than one cell of "
                         f"the background encoder ({cell} x {cell})")
    # whole cells only: a partial cell would be padded with pixels at exactly the nominal
    # background, which the network reads as evidence
    whole = image[..., :rows - rows % cell, :cols - cols % cell]
    mean, sd = encoder.forward_in_strips(whole, nominal.reshape(1, -1, 1, 1))
    mean, sd = mean[0].double().numpy(), sd[0].double().numpy()
    log_shape = _log_shape(given[0].numpy(), rows, cols, deblender.bands)
    n_rows, n_cols = mean.shape
    cell_shape = log_shape[:n_rows * cell, :n_cols * cell].reshape(
        n_rows, cell, n_cols, cell).mean(axis=(1, 3))
    relative = mean - cell_shape    # log of the factor on the given map's shape
    if smoothing is None:
        log_scale, log_scale_sd = combine_cells(relative, sd)
        level = np.full((rows, cols), np.exp(log_scale), dtype=np.float32)
    else:
        precision = 1 / sd ** 2
        width = smoothing / cell
        log_map = (gaussian_filter(relative * precision, width, mode="nearest")
                   / gaussian_filter(precision, width, mode="nearest"))
        level = np.exp(_bilinear_to_pixels(log_map, cell, rows, cols))
    low, high = deblender.training_settings.background_range
    if np.any((level < low) | (level > high)):
        warnings.warn(f"estimated background factors from {level.min():.3f} to "
                      f"{level.max():.3f} lie outside the range the model was trained on "
                      f"({low} to {high}); clipped", UserWarning)
        level = np.clip(level, low, high)
    scale = level * np.exp(log_shape)
    background = scale[None] * np.asarray(deblender.background, dtype=scale.dtype)[:, None, None]
    scale_sd = None if smoothing is not None else float(np.exp(log_scale) * log_scale_sd)
    fit = {"scale": float(np.median(scale)), "smoothing": smoothing, "scale_sd": scale_sd}
    # in the image's unit, less the noise pedestal that reading the image adds back
    # (starnet.images.read_image), as meta['background'] is read
    pedestal = read["pedestal"].astype(background.dtype)[:, None, None]
    background = ((background - pedestal)
                  / read["electrons_per_unit"].astype(background.dtype)[:, None, None])
    fitted = with_changes(nddata, meta=dict(nddata.meta, background=background,
                                            background_fit=fit))
    y, x = np.mgrid[0:mean.shape[0], 0:mean.shape[1]]
    cells = QTable({"x": (x.ravel() + 0.5) * cell - 0.5, "y": (y.ravel() + 0.5) * cell - 0.5,
                    "scale": np.exp(mean.ravel()), "log_scale_sd": sd.ravel()})
    return fitted, cells


def choose_background(deblender, nddata, background):
    """The image with the background that a deblender's ``background`` option asks for.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    nddata : `~astropy.nddata.NDData`
        The image.
    background : {None, 'fit', 'given'}
        As for `~starnet.StarNetDeblender.__call__`: 'fit' replaces the background by
        `fit_background`'s (smoothed over 64 pixels on images larger than 256
        pixels), 'given' keeps ``meta['background']``, None fits when the deblender
        has a background encoder.

    Returns
    -------
    image : `~astropy.nddata.NDData`
        ``nddata`` itself ('given'), or a copy with the fitted background and
        ``meta['background_used']`` = 'fitted'.
    """
    if background is None:
        background = "fit" if deblender.background_encoder is not None else "given"
    if background == "given":
        return nddata
    if background != "fit":
        raise ValueError(f"background must be 'fit', 'given' or None (fit when the "
                         f"model can), got {background!r}")
    if deblender.background_encoder is None:
        raise ValueError("background='fit' needs a model with a background encoder "
                         "(see fit_background_encoder); this one has none: use "
                         "background='given'")
    smoothing = _FIT_SMOOTHING if max(np.shape(nddata.data)[-2:]) > 256 else None
    with warnings.catch_warnings():
        # said once, when the image is catalogued
        for repeated in (".*masked or non-finite pixels", "the image's PSF in band"):
            warnings.filterwarnings("ignore", repeated)
        fitted, _ = fit_background(deblender, nddata, smoothing=smoothing)
    return with_changes(fitted, meta=dict(fitted.meta, background_used="fitted"))
