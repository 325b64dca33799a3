"""The convolutional encoder: image -> parameters of the tiled variational posterior."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .posterior import TiledPosterior

__all__ = ["StarNetEncoder", "normalize_image"]


def normalize_image(image, background):
    """The encoder's input: a fixed per-pixel function of the image and its background.

    Two channels per band: ``asinh((x - b) / sqrt(b))`` (the signal-to-noise ratio,
    compressed for bright stars) and ``log1p(max(x - b, 0)) / 5`` (the scale of the
    star light in electrons). No statistic of the batch or of the image is used, so a
    pixel's input depends only on its own value and background.

    Parameters
    ----------
    image, background : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
        Electrons; ``background`` may be any shape that broadcasts.
    """
    excess = image - background
    return torch.cat([torch.asinh(excess / background.sqrt()),
                      torch.log1p(excess.clamp(min=0)) / 5], dim=1)


class StarNetEncoder(nn.Module):
    """Fully convolutional network whose output grid is the tile grid.

    Three 3 x 3 convolutions at pixel resolution, a ``tile_size`` x ``tile_size``
    convolution with stride ``tile_size`` onto the tile grid, two 3 x 3 and one 1 x 1
    convolution between tiles, and a 1 x 1 head. Each tile therefore sees a window of
    ``7 + (tile_size - 1) + 4 tile_size`` pixels centred on it (16 pixels for tiles of
    2 pixels: a padding of 7 pixels around the tile), computed once per image without
    cutting patches. An image whose size is not a multiple of ``tile_size`` is padded
    on the bottom and right; outside the image the normalised input is zero, the value
    of empty sky, which is what the network is trained with at image edges.

    Parameters
    ----------
    n_bands : int
        Number of bands of the images.
    tile_size : int
        Side of a tile in pixels.
    max_sources : int
        Largest number of stars per tile.
    hidden : int
        Channels at pixel resolution.
    tile_hidden : int
        Channels at tile resolution.
    log_flux_offset : float
        Added to the network's log-flux output (a starting point near the faint end
        of the prior helps training).
    """

    def __init__(self, *, n_bands, tile_size=2, max_sources=3, hidden=32, tile_hidden=128,
                 log_flux_offset=math.log(3000.0)):
        super().__init__()
        self.n_bands = n_bands
        self.tile_size = tile_size
        self.max_sources = max_sources
        self.n_slots = max_sources * (max_sources + 1) // 2
        self.log_flux_offset = log_flux_offset
        n_out = max_sources + 1 + self.n_slots * (4 + 2 * n_bands)
        self.pixel_layers = nn.Sequential(
            nn.Conv2d(2 * n_bands, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, tile_hidden, tile_size, stride=tile_size), nn.ReLU())
        self.tile_layers = nn.Sequential(
            nn.Conv2d(tile_hidden, tile_hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(tile_hidden, tile_hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(tile_hidden, tile_hidden, 1), nn.ReLU())
        self.head = nn.Conv2d(tile_hidden, n_out, 1)

    @property
    def receptive_field(self):
        """Width in pixels of the window each tile sees."""
        return 7 + (self.tile_size - 1) + 4 * self.tile_size

    def forward(self, image, background, *, chunk_tiles=None):
        """Posterior of the catalogs of ``image`` (n_images, n_bands, rows, cols).

        With ``chunk_tiles``, the network runs on square blocks of that many tiles, each
        with a halo wider than the receptive field, so that memory is bounded and the
        result equals the one-shot computation.

        Returns
        -------
        `~starnet.posterior.TiledPosterior`
        """
        if image.ndim != 4 or image.shape[1] != self.n_bands:
            raise ValueError(f"expected images of shape (n_images, {self.n_bands}, rows, cols),"
                             f" got {tuple(image.shape)}")
        x = normalize_image(image, background)
        rows, cols = x.shape[-2:]
        x = F.pad(x, (0, -cols % self.tile_size, 0, -rows % self.tile_size))
        out = self._network(x) if chunk_tiles is None else self._chunked(x, int(chunk_tiles))
        return self._posterior(out)

    def _network(self, x):
        return self.head(self.tile_layers(self.pixel_layers(x)))

    def _chunked(self, x, chunk_tiles):
        if chunk_tiles < 1:
            raise ValueError(f"chunk_tiles must be positive, got {chunk_tiles}")
        size = self.tile_size
        tile_rows, tile_cols = x.shape[-2] // size, x.shape[-1] // size
        # every layer pads by one unit: 3 pixels, then 2 tiles; a halo of that many tiles
        # plus one keeps the chunk edges out of reach of the kept tiles
        halo = -(-3 // size) + 3
        rows = []
        for r0 in range(0, tile_rows, chunk_tiles):
            r1 = min(r0 + chunk_tiles, tile_rows)
            h0, h1 = max(r0 - halo, 0), min(r1 + halo, tile_rows)
            row = []
            for c0 in range(0, tile_cols, chunk_tiles):
                c1 = min(c0 + chunk_tiles, tile_cols)
                w0, w1 = max(c0 - halo, 0), min(c1 + halo, tile_cols)
                out = self._network(x[..., h0 * size:h1 * size, w0 * size:w1 * size])
                row.append(out[..., r0 - h0:r1 - h0, c0 - w0:c1 - w0])
            rows.append(torch.cat(row, dim=-1))
        return torch.cat(rows, dim=-2)

    def _posterior(self, out):
        out = out.permute(0, 2, 3, 1)
        n_count = self.max_sources + 1
        count_logits = out[..., :n_count]
        params = out[..., n_count:].reshape(*out.shape[:-1], self.n_slots, 4 + 2 * self.n_bands)
        b = self.n_bands
        return TiledPosterior(
            count_logits=count_logits,
            loc_mean=params[..., 0:2],
            loc_sd=torch.exp(params[..., 2:4].clamp(-8, 3)),
            log_flux_mean=params[..., 4:4 + b] + self.log_flux_offset,
            log_flux_sd=torch.exp(params[..., 4 + b:4 + 2 * b].clamp(-8, 3)))
