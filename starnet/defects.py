"""What real frames contain besides stars: saturated cores with bleed trails, bad
columns, cosmic-ray hits and chip edges, simulated for training an encoder that sees a
mask of missing pixels (`starnet.encoder.StarNetEncoder` with ``mask_channel``).

A pixel that is masked is missing data: its value is not read (the encoder's input is
zero there and a mask channel says so), and the catalog's stars below it are still the
truth the encoder is fitted to, so that a masked region's posterior widens instead of
reading as empty sky.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .validation import check_range

__all__ = ["saturate", "FrameDefects"]


def saturate(images, level):
    """Clip images at a full-well ``level`` and let the excess charge bleed along columns.

    In each column, a run of pixels above the level keeps ``level`` per pixel and its
    excess charge spills, half up and half down, into the pixels beyond the run's ends,
    filling each to the level before moving on (the last one is filled in part): the
    column keeps its charge, as a CCD's bleed trail does (unless the trail runs off the
    image). Pixels at the level (the runs and the filled trails) are returned as a mask.

    Parameters
    ----------
    images : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
        Electrons.
    level : float or `torch.Tensor` broadcasting to (n_images, n_bands, 1, 1)
        Full-well level, electrons.

    Returns
    -------
    images : `torch.Tensor`
        The clipped images with their trails.
    saturated : `torch.Tensor` of bool
        True on saturated pixels and full trail pixels.

    Examples
    --------
    >>> import torch
    >>> from starnet.defects import saturate
    >>> column = torch.zeros(1, 1, 9, 1)
    >>> column[0, 0, 4, 0] = 700.0           # 700 e- in a pixel whose full well is 100
    >>> clipped, mask = saturate(column, 100.0)
    >>> clipped[0, 0, :, 0].tolist()         # 7 full pixels: the charge is kept
    [0.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 0.0]
    """
    level = torch.as_tensor(level, dtype=images.dtype).expand(*images.shape[:2], 1, 1)
    over = images > level
    out = images.clone()
    columns = torch.nonzero(over.any(dim=-2))
    for i, band, col in columns.tolist():
        full = float(level[i, band, 0, 0])
        values = out[i, band, :, col].tolist()
        flags = over[i, band, :, col].tolist()
        row = 0
        while row < len(values):
            if not flags[row]:
                row += 1
                continue
            end = row
            while end < len(values) and flags[end]:
                end += 1
            excess = sum(values[row:end]) - full * (end - row)
            values[row:end] = [full] * (end - row)
            for step, start in ((-1, row - 1), (1, end)):
                left, j = excess / 2, start
                while left > 0 and 0 <= j < len(values) and not flags[j]:
                    fill = min(full - values[j], left) if values[j] < full else 0.0
                    values[j] += fill
                    left -= fill
                    j += step
            row = end
        out[i, band, :, col] = torch.tensor(values, dtype=images.dtype)
    return out, out >= level


@dataclass
class FrameDefects:
    """Random defects added to training images, with the mask of the pixels they spoil.

    Attributes
    ----------
    saturation_range : tuple of float or None
        Each image's full-well level is drawn log-uniformly from this range (electrons)
        and applied by `saturate` (None: no saturation).
    unsaturated_probability : float
        Probability that an image is left unsaturated however bright its stars (a
        deeper full well, or a survey whose saturated pixels are not flagged), so that
        a network trained on these images also sees unclipped bright stars.
    bad_column_rate : float
        Expected bad columns per 1000 image columns (a random stretch of a column, its
        values replaced by garbage).
    cosmic_ray_rate : float
        Expected masked cosmic-ray hits per 10,000 pixels (1 to 3 pixels each).
    edge_probability : float
        Probability that an image has a masked strip along one of its edges (a chip
        edge), 1 to 12 pixels wide.

    Examples
    --------
    >>> import torch
    >>> from starnet.defects import FrameDefects
    >>> defects = FrameDefects(saturation_range=(2e5, 2e5), bad_column_rate=0.0,
    ...                        cosmic_ray_rate=0.0, edge_probability=0.0)
    >>> images = torch.full((1, 1, 8, 8), 700.0)
    >>> images[0, 0, 4, 4] = 9e5                 # bleeds one full pixel up and down
    >>> out, mask = defects.apply(images, generator=torch.Generator().manual_seed(0))
    >>> int(mask.sum()), round(float(out.max()))
    (3, 200000)
    """

    saturation_range: tuple = (1e5, 4e5)
    unsaturated_probability: float = 0.0
    bad_column_rate: float = 10.0
    cosmic_ray_rate: float = 2.0
    edge_probability: float = 0.1

    def __post_init__(self):
        if self.saturation_range is not None:
            self.saturation_range = check_range(self.saturation_range, "saturation_range",
                                                positive=True)
        for name in ("unsaturated_probability", "bad_column_rate", "cosmic_ray_rate",
                     "edge_probability"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        for name in ("unsaturated_probability", "edge_probability"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be <= 1, got {getattr(self, name)}")

    def apply(self, images, *, generator=None):
        """Defects on a batch of images.

        Parameters
        ----------
        images : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
            Electrons, noise included.
        generator : `torch.Generator`, optional

        Returns
        -------
        images : `torch.Tensor`
            With saturated cores, trails and garbage in the spoiled pixels.
        mask : `torch.Tensor` of bool
            True on every spoiled pixel (per band: saturation is per band; columns, hits
            and edges spoil every band).
        """
        n, bands, rows, cols = images.shape
        mask = torch.zeros(n, bands, rows, cols, dtype=torch.bool)
        if self.saturation_range is not None:
            low, high = np.log(self.saturation_range)
            level = torch.exp(low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator))
            if self.unsaturated_probability:
                unsaturated = torch.rand(n, 1, 1, 1, generator=generator) \
                    < self.unsaturated_probability
                level = torch.where(unsaturated, torch.inf, level)
            images, mask = saturate(images, level)
        spoiled = torch.zeros(n, 1, rows, cols, dtype=torch.bool)
        # bad columns: a random stretch (at least a quarter) of a random column
        n_columns = torch.poisson(torch.full((n,), self.bad_column_rate * cols / 1000),
                                  generator=generator).long()
        for i in range(n):
            for _ in range(int(n_columns[i])):
                col = int(torch.randint(cols, (1,), generator=generator))
                length = int(torch.randint(rows // 4, rows + 1, (1,), generator=generator))
                start = int(torch.randint(rows - length + 1, (1,), generator=generator))
                spoiled[i, 0, start:start + length, col] = True
        # cosmic rays: 1 to 3 pixels in a row or a column
        hits = torch.rand(n, 1, rows, cols, generator=generator) < self.cosmic_ray_rate / 1e4
        grow = torch.randint(0, 3, (n, 1, 1, 1), generator=generator)
        spoiled |= hits | ((grow >= 1) & F.pad(hits, (1, 0))[..., :cols]) \
            | ((grow >= 2) & F.pad(hits, (0, 0, 1, 0))[..., :rows, :])
        # chip edges
        edged = torch.rand(n, generator=generator) < self.edge_probability
        sides = torch.randint(4, (n,), generator=generator)
        widths = torch.randint(1, 13, (n,), generator=generator)
        for i in torch.nonzero(edged).flatten().tolist():
            width = int(widths[i])
            side = (slice(0, width), slice(None)), (slice(rows - width, rows), slice(None)), \
                (slice(None), slice(0, width)), (slice(None), slice(cols - width, cols))
            spoiled[(i, 0) + side[int(sides[i])]] = True
        garbage = images.mean() * 3 * torch.rand(images.shape, generator=generator)
        images = torch.where(spoiled, garbage, images)
        return images, mask | spoiled
