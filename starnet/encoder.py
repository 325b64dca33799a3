"""The convolutional encoder: image -> parameters of the tiled variational posterior."""

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from .posterior import TiledPosterior, cell_means

__all__ = ["StarNetEncoder", "normalize_image", "conditioning_map"]


def normalize_image(image, background, mask=None):
    """The encoder's input: a fixed per-pixel function of the image and its background.

    Two channels per band: ``asinh((x - b) / sqrt(b))`` (the signal-to-noise ratio,
    compressed for bright stars) and ``log1p(max(x - b, 0)) / 5`` (the scale of the
    star light in electrons). No statistic of the batch or of the image is used, so a
    pixel's input depends only on its own value and background. With a ``mask``, the
    masked pixels' channels are zero and a third channel per band flags them (1 where
    masked), so that a missing pixel is not read as empty sky.

    Parameters
    ----------
    image, background : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
        Electrons; ``background`` may be any shape that broadcasts.
    mask : `torch.Tensor` of bool, optional
        True where a pixel is missing (masked or saturated); broadcasts to ``image``.

    Returns
    -------
    `torch.Tensor`, shape (n_images, 2 n_bands (3 n_bands with a mask), rows, cols)
        The ``asinh`` channels of all bands, then the ``log1p`` channels, then the mask
        channels.

    Examples
    --------
    >>> import torch
    >>> from starnet.encoder import normalize_image
    >>> image = torch.tensor([[[[700.0, 800.0]]]])
    >>> x = normalize_image(image, torch.tensor(700.0), mask=torch.tensor([[[[False, True]]]]))
    >>> x.shape, x[0, :, 0, 1].tolist()
    (torch.Size([1, 3, 1, 2]), [0.0, 0.0, 1.0])
    """
    excess = image - background
    channels = torch.cat([_asinh(excess / background.sqrt()),
                          torch.log1p(excess.clamp(min=0)) / 5], dim=1)
    if mask is None:
        return channels
    mask = torch.as_tensor(mask, dtype=torch.bool).expand_as(image)
    channels = channels.masked_fill(torch.cat([mask, mask], dim=1), 0.0)
    return torch.cat([channels, mask.to(channels.dtype)], dim=1)


def _asinh(z):
    """``asinh(z)`` (to float32 rounding) as ``log1p(m + m^2 / (1 + sqrt(1 + m^2)))``
    with ``m = |z|`` and its sign: 2-3 times faster than `torch.asinh` on a CPU, exact
    for small ``z`` and without overflow (``m`` capped at 1e30)."""
    m = z.abs().clamp(max=1e30)
    return torch.copysign(torch.log1p(m + m * (m / (1 + torch.hypot(m, m.new_ones(()))))), z)


def conditioning_map(tiles, decided, log_flux_offset):
    """Tile-resolution input that shows the encoder the catalogs of decided tiles.

    Channels: a flag for decided tiles; the one-hot count; for each slot (stars sorted
    by flux in the first band, brightest first), a presence flag, the within-tile
    position minus 0.5 and the log flux (minus ``log_flux_offset``, over 3) in each
    band. Everything is zero on undecided tiles.

    Parameters
    ----------
    tiles : `~starnet.tiles.TileCatalog`
    decided : `torch.Tensor` of bool, shape (n_images, tile_rows, tile_cols)
    log_flux_offset : float
        Subtracted from the natural log of the fluxes (electrons).

    Returns
    -------
    `torch.Tensor`, shape (n_images, channels, tile_rows, tile_cols)
        ``channels = 2 + max_sources (4 + n_bands)`` (`conditioning_channels`).
    """
    max_sources = tiles.locs.shape[-2]
    present = torch.arange(max_sources, device=tiles.counts.device) < tiles.counts[..., None]
    # brightest first, as in the training targets (a posterior draw's slots are unordered)
    brightness = torch.where(present, tiles.fluxes[..., 0], -1.0)
    order = torch.argsort(brightness, dim=-1, descending=True)
    locs = tiles.locs.gather(-2, order[..., None].expand_as(tiles.locs))
    fluxes = tiles.fluxes.gather(-2, order[..., None].expand_as(tiles.fluxes))
    present = present.float()
    parts = [torch.ones_like(present[..., :1]),
             F.one_hot(tiles.counts, max_sources + 1).float(), present,
             ((locs - 0.5) * present[..., None]).flatten(-2),
             ((torch.log(fluxes) - log_flux_offset) / 3 * present[..., None]).flatten(-2)]
    channels = torch.cat(parts, dim=-1) * decided[..., None].float()
    return channels.permute(0, 3, 1, 2)


def conditioning_channels(max_sources, n_bands):
    """Number of channels of `conditioning_map`.

    Parameters
    ----------
    max_sources : int
        Largest number of stars per tile.
    n_bands : int
        Number of bands.

    Returns
    -------
    int
        ``2 + max_sources (4 + n_bands)``.
    """
    return 2 + max_sources * (4 + n_bands)


def pool_cells(features, cell):
    """Mean and maximum of ``features`` over square cells of ``cell`` pixels.

    Cells start at the top left; where the side is not a whole number of cells, the
    last cells are partial and their mean and maximum are over the pixels they hold,
    so that they read the density of stars as whole cells do (padding them instead
    read them as emptier sky: the sdss model counted 20 to 30 % too few stars in the
    bottom and right 20 pixels of 100 x 100 fields at 0.2 stars per pixel).

    Parameters
    ----------
    features : `torch.Tensor`, shape (n_images, channels, rows, cols)
    cell : int

    Returns
    -------
    mean, maximum : `torch.Tensor`, shape (n_images, channels, ceil(rows / cell), ceil(cols / cell))

    Examples
    --------
    >>> import torch
    >>> from starnet.encoder import pool_cells
    >>> mean, maximum = pool_cells(torch.arange(6.0).reshape(1, 1, 1, 6), 4)
    >>> mean.flatten().tolist(), maximum.flatten().tolist()
    ([1.5, 4.5], [3.0, 5.0])
    """
    rows, cols = features.shape[-2:]
    pad = (0, -cols % cell, 0, -rows % cell)
    return cell_means(features, cell), F.max_pool2d(F.pad(features, pad, value=-math.inf), cell)


class StarNetEncoder(nn.Module):
    """Fully convolutional network whose output grid is the tile grid.

    Three 3 x 3 convolutions at pixel resolution, a ``tile_size`` x ``tile_size``
    convolution with stride ``tile_size`` onto the tile grid, two 3 x 3 and one 1 x 1
    convolution between tiles, and a 1 x 1 head. Each tile therefore sees a window of
    ``7 + (tile_size - 1) + 4 tile_size`` pixels centred on it (16 pixels for tiles of
    2 pixels: a padding of 7 pixels around the tile), computed once per image without
    cutting patches. Beyond the image edges the convolutions see zeros (an image whose
    size is not a multiple of ``tile_size`` is padded with zeros on the bottom and
    right too); training images are simulated with stars beyond their edges, so the
    network learns what edges look like.

    Four optional inputs tell the network where it is:

    - ``mask_channel``: a mask of missing pixels (`normalize_image`), so that a masked
      or saturated pixel widens the posterior instead of reading as empty sky.
    - ``psf_features``: a descriptor of each band's PSF (`starnet.psf_family.psf_descriptor`,
      ``psf_features`` numbers per band) per image or per tile, which scales and shifts
      the first pixel layer's and the tile layer's channels (feature-wise linear
      modulation); one network then reads stars through any PSF of its training family,
      and a PSF that varies over a frame is a map.
    - ``prior_features``: a descriptor of the flux distribution of the prior the image
      is read under (`starnet.prior.prior_descriptor`: its upper flux and Pareto
      index), which joins the PSF descriptor in the same modulation: the number of
      faint stars that the visible ones imply in a crowded field follows it.
    - ``context_cells``: a coarse branch over cells of ``context_cells`` x
      ``context_cells`` tiles, from a cheap 1 x 1 pixel projection pooled (mean and
      maximum) per cell and three 3 x 3 convolutions between cells, added to the tile
      features: each tile sees the light of a window ``context_field`` pixels wide (the
      local density of stars, the level of unresolved light) at a cost of a few
      operations per pixel. The count pmfs stay those of independent tiles.

    With ``density_cells``, a 1 x 1 head beside the main one gives each tile a
    ``spread`` (`softplus`), whose mean over a square cell of ``density_cells`` tiles is
    the standard deviation of a log-density offset that the cell's tiles share
    (`starnet.posterior.TiledPosterior`): the uncertainty of the density that they all
    read from the same light, which independent tiles leave out. Count pmfs are then
    mixtures per cell (by quadrature over the offset), streamed block by block.

    With ``pair_correlations``, another 1 x 1 head gives each tile weights on its four
    sides (a softmax over them and "none"): a star on a tile boundary is claimed in part
    by both tiles, whose counts then correlate by minus the smaller of their weights on
    the shared side (`starnet.posterior.side_correlations`), so that a region's count
    varies less than independent tiles say (`starnet.posterior.contract_counts`).

    With ``count_tail`` (and ``density_cells``), the count pmfs read a tile's top count
    as ``max_sources`` or more, the stars beyond following a Poisson tail at the density
    of its cell (`starnet.posterior.poisson_tail`): crowded tiles hold more stars than
    q can place. No weights are added.

    With ``n_colors`` > 1 the tiles are coloured in a checkerboard (2 colours:
    ``(i + j) mod 2``; 4 colours: ``2 (i mod 2) + (j mod 2)``) and decided colour by
    colour: the tiles of colour ``c`` see the catalogs already chosen for their
    neighbours of colours below ``c`` (`conditioning_map`, added to the tile features),
    so that two neighbouring tiles cannot both claim a star on their common boundary.
    The variational distribution is then ``q(z | x) = prod_c q(z_c | x, z_{<c})``.

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
    n_colors : {1, 2, 4}
        Number of checkerboard colours (1: independent tiles, as in the paper).
    log_flux_offset : float
        Added to the network's log-flux output (a starting point near the faint end
        of the prior helps training).
    mask_channel : bool
        Take a mask of missing pixels as input.
    psf_features : int
        Numbers per band of the PSF descriptor taken as input (0: none).
    prior_features : int
        Numbers of the prior descriptor taken as input (0: none;
        `starnet.prior.PRIOR_FEATURES`).
    context_cells : int
        Side in tiles of the context branch's cells (0: no context branch; else >= 4).
    context_hidden : int
        Channels of the context branch.
    density_cells : int
        Side in tiles of the cells that share a log-density offset (0: independent
        tiles); independent tiles only (``n_colors`` = 1).
    pair_correlations : bool
        Add the pair-correlation head; independent tiles only (``n_colors`` = 1).
    count_tail : bool
        Give the count pmfs a tail beyond ``max_sources`` per tile; needs
        ``density_cells``.

    Examples
    --------
    >>> import torch
    >>> from starnet.encoder import StarNetEncoder
    >>> encoder = StarNetEncoder(n_bands=1, hidden=8, tile_hidden=16, mask_channel=True,
    ...                          psf_features=4, context_cells=8)
    >>> image = 700.0 + 26.0 * torch.randn(1, 1, 40, 40)
    >>> q = encoder(image, torch.tensor(700.0), mask=image > 760.0, psf=torch.zeros(1, 4))
    >>> tuple(q.count_logits.shape)
    (1, 20, 20, 4)
    """

    def __init__(self, *, n_bands, tile_size=2, max_sources=3, hidden=32, tile_hidden=128,
                 n_colors=1, log_flux_offset=math.log(3000.0), mask_channel=False,
                 psf_features=0, prior_features=0, context_cells=0, context_hidden=32,
                 density_cells=0, pair_correlations=False, count_tail=False):
        super().__init__()
        if n_colors not in (1, 2, 4):
            raise ValueError(f"n_colors must be 1, 2 or 4, got {n_colors}")
        if density_cells and (n_colors != 1 or density_cells < 1):
            raise ValueError("density_cells must be 0, or a positive number of tiles with "
                             f"n_colors = 1; got {density_cells} with n_colors = {n_colors}")
        if pair_correlations and n_colors != 1:
            raise ValueError("pair_correlations needs independent tiles (n_colors = 1), "
                             f"got n_colors = {n_colors}")
        if count_tail and not density_cells:
            raise ValueError("count_tail needs density cells (density_cells > 0): the "
                             "density of a tile's cell sets its tail")
        if context_cells and context_cells < 4:
            raise ValueError(f"context_cells must be 0 or at least 4 tiles, got {context_cells}")
        self.n_bands = n_bands
        self.tile_size = tile_size
        self.max_sources = max_sources
        self.n_colors = n_colors
        self.n_slots = max_sources * (max_sources + 1) // 2
        self.log_flux_offset = log_flux_offset
        self.mask_channel = bool(mask_channel)
        self.psf_features = int(psf_features)
        self.prior_features = int(prior_features)
        self.context_cells = int(context_cells)
        self.density_cells = int(density_cells)
        self.pair_correlations = bool(pair_correlations)
        self.count_tail = bool(count_tail)
        n_in = (3 if mask_channel else 2) * n_bands
        n_out = max_sources + 1 + self.n_slots * (4 + 2 * n_bands)
        self.pixel_layers = nn.Sequential(
            nn.Conv2d(n_in, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, tile_hidden, tile_size, stride=tile_size), nn.ReLU(inplace=True))
        if self.psf_features or self.prior_features:
            self.psf_embedding = nn.Sequential(
                nn.Conv2d(n_bands * self.psf_features + self.prior_features, 64, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 2 * (hidden + tile_hidden), 1))
            # start as the identity modulation: the PSF and prior enter as training needs it
            nn.init.zeros_(self.psf_embedding[-1].weight)
            nn.init.zeros_(self.psf_embedding[-1].bias)
        if self.context_cells:
            self.context_pixels = nn.Sequential(nn.Conv2d(n_in, 8, 1), nn.ReLU(inplace=True))
            self.context_layers = nn.Sequential(
                nn.Conv2d(16, context_hidden, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(context_hidden, context_hidden, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(context_hidden, context_hidden, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(context_hidden, tile_hidden, 1))
        if n_colors > 1:
            self.condition = nn.Conv2d(conditioning_channels(max_sources, n_bands),
                                       tile_hidden, 1)
        self.tile_layers = nn.Sequential(
            nn.Conv2d(tile_hidden, tile_hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(tile_hidden, tile_hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(tile_hidden, tile_hidden, 1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(tile_hidden, n_out, 1)
        if self.density_cells:
            self.spread_head = nn.Conv2d(tile_hidden, 1, 1)
            nn.init.zeros_(self.spread_head.weight)
            nn.init.constant_(self.spread_head.bias, -3.5)    # spread 0.03 to begin with
        if self.pair_correlations:
            self.pair_head = nn.Conv2d(tile_hidden, 5, 1)    # right, lower, left, upper, none
            nn.init.zeros_(self.pair_head.weight)
            with torch.no_grad():                          # weights 0.002 to begin with
                self.pair_head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 6.0]))
        # channels-last convolutions are 10-30 % faster on a CPU (oneDNN), in training too
        self.to(memory_format=torch.channels_last)

    def config(self):
        """The constructor's arguments, to rebuild the same architecture.

        Returns
        -------
        dict
        """
        config = {"n_bands": self.n_bands, "tile_size": self.tile_size,
                  "max_sources": self.max_sources,
                  "hidden": self.pixel_layers[0].out_channels,
                  "tile_hidden": self.head.in_channels, "n_colors": self.n_colors,
                  "log_flux_offset": self.log_flux_offset}
        if self.mask_channel:
            config["mask_channel"] = True
        if self.psf_features:
            config["psf_features"] = self.psf_features
        if self.prior_features:
            config["prior_features"] = self.prior_features
        if self.context_cells:
            config.update(context_cells=self.context_cells,
                          context_hidden=self.context_layers[0].out_channels)
        if self.density_cells:
            config["density_cells"] = self.density_cells
        if self.pair_correlations:
            config["pair_correlations"] = True
        if self.count_tail:
            config["count_tail"] = True
        return config

    @property
    def receptive_field(self):
        """Width in pixels of the window whose pixels each tile's catalog is read from
        (the context branch, if any, sees `context_field` pixels)."""
        return 7 + (self.tile_size - 1) + 4 * self.tile_size

    @property
    def context_field(self):
        """Width in pixels of the window that a tile's context comes from (at most)."""
        if not self.context_cells:
            return self.receptive_field
        return (2 * self._context_halo() + 1) * self.tile_size

    def tile_colors(self, grid_shape, device=None):
        """Checkerboard colour of each tile, shape ``grid_shape``.

        Parameters
        ----------
        grid_shape : tuple of int
            ``(tile_rows, tile_cols)``.
        device : str or `torch.device`, optional
            Where the result lives (default: the CPU).

        Returns
        -------
        `torch.Tensor` of int64, shape (tile_rows, tile_cols)
            Colour ``0 .. n_colors - 1`` of each tile.
        """
        row = torch.arange(grid_shape[0], device=device)[:, None]
        col = torch.arange(grid_shape[1], device=device)[None, :]
        if self.n_colors == 4:
            return 2 * (row % 2) + col % 2
        return (row + col) % self.n_colors

    def forward(self, image, background, *, mask=None, psf=None, prior=None,
                conditioning=None, chunk_tiles=None, progress=None):
        """Posterior of the catalogs of ``image`` (n_images, n_bands, rows, cols).

        ``conditioning`` (a `conditioning_map`) is required when ``n_colors`` > 1: it
        gives the catalogs of the tiles decided so far. With ``chunk_tiles``, the
        network runs on square blocks of that many tiles, each with a halo wider than
        the receptive field, so that memory is bounded and the result equals the
        one-shot computation; ``progress``, if given, is called with the number of
        blocks done and the number in all after each block.

        Parameters
        ----------
        image : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
            Electrons, background included.
        background : `torch.Tensor` broadcasting to ``image``
            Electrons.
        mask : `torch.Tensor` of bool, optional
            Missing pixels, broadcasting to ``image``; for an encoder with
            ``mask_channel`` (default: none missing).
        psf : `torch.Tensor`, optional
            PSF descriptors, shape (n_images, n_bands psf_features) for one PSF per image
            or (n_images, n_bands psf_features, tile_rows, tile_cols) for a map; required
            by an encoder with ``psf_features``.
        prior : `torch.Tensor`, shape (n_images, prior_features), optional
            Prior descriptors (`starnet.prior.prior_descriptor`); required by an encoder
            with ``prior_features``.
        conditioning : `torch.Tensor`, optional
            `conditioning_map` of the decided tiles; required when ``n_colors`` > 1.
        chunk_tiles : int, optional
            Side of the blocks in tiles (default: the whole image at once).
        progress : callable, optional
            Called as ``progress(done, total)`` after each block.

        Returns
        -------
        `~starnet.posterior.TiledPosterior`
        """
        if self.n_colors == 1 and chunk_tiles is not None:
            # the whole network block by block: neither the network's input nor the tile
            # features of a large image are held at once
            blocks = self.blocks(image, background, chunk_tiles, mask=mask, psf=psf,
                                 prior=prior, progress=progress)
            rows = [TiledPosterior.concatenate([q for _, _, q in row], dim=2)
                    for _, row in itertools.groupby(blocks, key=lambda block: block[0].start)]
            return TiledPosterior.concatenate(rows, dim=1)
        features = self.features(image, background, mask=mask, psf=psf, prior=prior,
                                 chunk_tiles=chunk_tiles, progress=progress)
        return self.tile_posterior(features, conditioning, chunk_tiles=chunk_tiles)

    def _check_inputs(self, image, mask, psf, prior):
        """Check the inputs; return the modulation's input (the PSF descriptors and the
        prior's, at tile resolution or 1 x 1), or None."""
        if image.ndim != 4 or image.shape[1] != self.n_bands:
            raise ValueError(f"expected images of shape (n_images, {self.n_bands}, rows, cols),"
                             f" got {tuple(image.shape)}")
        if mask is not None and not self.mask_channel:
            raise ValueError("this encoder takes no mask (it was built without mask_channel)")
        if self.psf_features:
            n = self.n_bands * self.psf_features
            grid = (-(-image.shape[-2] // self.tile_size), -(-image.shape[-1] // self.tile_size))
            if psf is None:
                raise ValueError(f"this encoder reads the PSF: give psf, {n} descriptor values "
                                 "per image (starnet.psf_family.psf_descriptor of each band)")
            if psf.ndim == 2:
                psf = psf[..., None, None]
            if (psf.ndim != 4 or psf.shape[1] != n or psf.shape[0] not in (1, image.shape[0])
                    or tuple(psf.shape[-2:]) not in ((1, 1), grid)):
                raise ValueError(f"psf must have shape (n_images, {n}) or (n_images, {n}, "
                                 f"{grid[0]}, {grid[1]}), got {tuple(psf.shape)}")
        elif psf is not None:
            raise ValueError("this encoder takes no PSF (it was built without psf_features)")
        if not self.prior_features:
            if prior is not None:
                raise ValueError("this encoder takes no prior (it was built without "
                                 "prior_features)")
            return psf
        n = self.prior_features
        if prior is None or prior.ndim != 2 or prior.shape[1] != n \
                or prior.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"this encoder reads the prior: give prior, shape (n_images, {n})"
                             " (starnet.prior.prior_descriptor), got "
                             f"{None if prior is None else tuple(prior.shape)}")
        prior = prior.to(image.dtype)[..., None, None]
        if psf is None:
            return prior
        shape = (max(psf.shape[0], prior.shape[0]), -1, *psf.shape[-2:])
        return torch.cat([psf.expand(shape), prior.expand(shape[:1] + (n,) + shape[2:])], dim=1)

    def _input_window(self, image, background, mask, rows, cols):
        """The network's input on pixel rows ``rows`` and columns ``cols`` (``(start,
        stop)``) of the image padded with zeros to whole tiles (and beyond): a per-pixel
        function, so a window of it is computed from the same window of the image."""
        window = (..., slice(rows[0], min(rows[1], image.shape[-2])),
                  slice(cols[0], min(cols[1], image.shape[-1])))
        x = normalize_image(image[window], _window(background, rows, cols),
                            None if not self.mask_channel else
                            torch.zeros((), dtype=torch.bool) if mask is None
                            else _window(mask, rows, cols))
        x = F.pad(x, (0, cols[1] - cols[0] - x.shape[-1], 0, rows[1] - rows[0] - x.shape[-2]))
        return x.contiguous(memory_format=torch.channels_last)

    def _modulation(self, descriptors):
        """Scales and shifts of the pixel and tile layers from the PSF and prior
        descriptors (`_check_inputs`), at tile resolution (or 1 x 1); None for an encoder
        that reads neither."""
        if descriptors is None:
            return None
        hidden = self.pixel_layers[0].out_channels
        film = self.psf_embedding(descriptors)
        return torch.split(film, [hidden, hidden, self.head.in_channels,
                                  self.head.in_channels], dim=1)

    def _pixel_features(self, x, film):
        """Tile features from the input window ``x``, modulated by ``film`` (at tile
        resolution, cropped to the window's tiles)."""
        layers = self.pixel_layers
        h = _in_float32(layers[0], x)
        if film is not None:
            h = _modulate_pixels(h, film[0], film[1], self.tile_size)
        h = layers[5](layers[4](layers[3](layers[2](layers[1](h)))))
        h = layers[6](h)
        if film is not None:
            h = h * (1 + film[2]) + film[3]
        return layers[7](h)

    def _context(self, x):
        """The context branch on the input ``x`` of a window that starts on a cell
        boundary: a map at tile resolution covering the window's tiles."""
        with torch.autocast(x.device.type, enabled=False):    # float32 (`_in_float32`)
            p = self.context_pixels(x.float())
            pooled = torch.cat(pool_cells(p, self.context_cells * self.tile_size), dim=1)
            coarse = self.context_layers(pooled)
        n = self.context_cells
        return coarse.repeat_interleave(n, -2).repeat_interleave(n, -1)

    def blocks(self, image, background, chunk_tiles=None, *, mask=None, psf=None, prior=None,
               progress=None):
        """The posterior of independent tiles (``n_colors`` = 1) block by block.

        Blocks are square, of ``chunk_tiles`` tiles (rounded up to whole context and density
        cells),
        and come row of blocks by row of blocks. Each block's network input is made from
        the block's pixels and a halo wider than the receptive field (and, for the
        context branch, than the context field), so the result equals the one-shot
        computation while memory stays that of a block.

        Parameters
        ----------
        image : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
            Electrons, background included.
        background : `torch.Tensor` broadcasting to ``image``
            Electrons.
        chunk_tiles : int, optional
            Side of the blocks in tiles (default: one block for the whole grid).
        mask, psf, prior : `torch.Tensor`, optional
            As in `forward`.
        progress : callable, optional
            Called as ``progress(done, total)`` after each block.

        Yields
        ------
        rows, cols : slice
            Tile rows and columns of the block in the tile grid.
        posterior : `~starnet.posterior.TiledPosterior`
            The posterior of the block's tiles.
        """
        if self.n_colors != 1:
            raise ValueError("a checkerboard encoder decides its tiles colour by colour over "
                             "the whole image; use features and decide")
        descriptors = self._check_inputs(image, mask, psf, prior)
        size = self.tile_size
        n_rows, n_cols = -(-image.shape[-2] // size), -(-image.shape[-1] // size)
        chunk = max(n_rows, n_cols, 1) if chunk_tiles is None else int(chunk_tiles)
        if chunk < 1:
            raise ValueError(f"chunk_tiles must be positive, got {chunk}")
        cell = math.lcm(max(self.context_cells, 1), max(self.density_cells, 1))
        chunk = -(-chunk // cell) * cell
        halo = 0 if chunk_tiles is None else self._pixel_halo() + 3
        context_halo = 0 if chunk_tiles is None else self._context_halo()
        total = -(-n_rows // chunk) * -(-n_cols // chunk)
        done = 0
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            h0, h1 = max(r0 - halo, 0), min(r1 + halo, n_rows)
            for c0 in range(0, n_cols, chunk):
                c1 = min(c0 + chunk, n_cols)
                w0, w1 = max(c0 - halo, 0), min(c1 + halo, n_cols)
                x = self._input_window(image, background, mask, (h0 * size, h1 * size),
                                       (w0 * size, w1 * size))
                film = self._modulation(None if descriptors is None
                                        else _window(descriptors, (h0, h1), (w0, w1)))
                features = self._pixel_features(x, film)
                if self.context_cells:
                    k0, k1 = max(r0 - context_halo, 0), min(r1 + context_halo, n_rows)
                    j0, j1 = max(c0 - context_halo, 0), min(c1 + context_halo, n_cols)
                    x = self._input_window(image, background, mask, (k0 * size, k1 * size),
                                           (j0 * size, j1 * size))
                    context = self._context(x)[..., h0 - k0:h1 - k0, w0 - j0:w1 - j0]
                    features = features + context
                out = self._heads(self.tile_layers(features))
                out = out[..., r0 - h0:r1 - h0, c0 - w0:c1 - w0]
                done += 1
                if progress is not None:
                    progress(done, total)
                yield slice(r0, r1), slice(c0, c1), self._to_posterior(out)

    def _pixel_halo(self):
        # three pixel convolutions reach 3 pixels beyond a block: a halo of that many
        # tiles plus one keeps the block edges out of reach of the kept tiles
        return -(-3 // self.tile_size) + 1

    def _context_halo(self):
        # a tile's context cell, the three 3 x 3 convolutions between cells beyond it, and
        # the tile layers' reach of 2 tiles into the neighbouring cell (context_cells >= 4)
        return 4 * self.context_cells

    def features(self, image, background, *, mask=None, psf=None, prior=None,
                 chunk_tiles=None, progress=None):
        """Tile-resolution features of the images (the part that sees pixels).

        Parameters
        ----------
        image : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
            Electrons, background included.
        background : `torch.Tensor` broadcasting to ``image``
            Electrons.
        mask, psf, prior : `torch.Tensor`, optional
            As in `forward`.
        chunk_tiles : int, optional
            Compute in square blocks of this many tiles (same result, bounded memory).
        progress : callable, optional
            Called as ``progress(done, total)`` after each block.

        Returns
        -------
        `torch.Tensor`, shape (n_images, tile_hidden, tile_rows, tile_cols)
        """
        descriptors = self._check_inputs(image, mask, psf, prior)
        size = self.tile_size
        shape = [n + -n % size for n in image.shape[-2:]]
        x = self._input_window(image, background, mask, (0, shape[0]), (0, shape[1]))
        film = self._modulation(descriptors)
        if film is None or film[0].shape[-1] == 1:
            features = _chunked(lambda window: self._pixel_features(window, film), x,
                                chunk_tiles, self._pixel_halo(), size, progress=progress)
        else:   # a PSF map: the pixel layers see the whole map at once
            features = self._pixel_features(x, film)
            if progress is not None:
                progress(1, 1)
        if self.context_cells:
            features = features + self._context(x)[..., :features.shape[-2], :features.shape[-1]]
        return features

    def tile_posterior(self, features, conditioning=None, *, chunk_tiles=None):
        """Posterior from tile features and, with ``n_colors`` > 1, the conditioning map.

        Parameters
        ----------
        features : `torch.Tensor`, shape (n_images, tile_hidden, tile_rows, tile_cols)
            From `features`.
        conditioning : `torch.Tensor`, optional
            `conditioning_map` of the decided tiles; required when ``n_colors`` > 1.
        chunk_tiles : int, optional
            Compute in square blocks of this many tiles (same result, bounded memory).

        Returns
        -------
        `~starnet.posterior.TiledPosterior`
        """
        if self.n_colors > 1:
            if conditioning is None:
                raise ValueError("a checkerboard encoder needs the conditioning map of the "
                                 "decided tiles (see StarNetEncoder.decide)")
            features = features + self.condition(conditioning)

        def layers(x):
            return self._heads(self.tile_layers(x))

        return self._to_posterior(_chunked(layers, features, chunk_tiles, 3, 1))

    def _heads(self, h):
        """The head's output from the tile layers' ``h``, followed by the spread head's
        channel and the pair head's five where there are those; float32 (`_in_float32`)."""
        heads = [self.head] + ([self.spread_head] if self.density_cells else []) \
            + ([self.pair_head] if self.pair_correlations else [])
        return torch.cat([_in_float32(head, h) for head in heads], dim=1)

    def _to_posterior(self, out):
        out = out.permute(0, 2, 3, 1)
        n_count = self.max_sources + 1
        n_params = self.n_slots * (4 + 2 * self.n_bands)
        params = out[..., n_count:n_count + n_params].reshape(
            *out.shape[:-1], self.n_slots, 4 + 2 * self.n_bands)
        b = self.n_bands
        extra = n_count + n_params
        spread = F.softplus(out[..., extra]) if self.density_cells else None
        extra += bool(self.density_cells)
        pairs = (torch.softmax(out[..., extra:extra + 5], dim=-1)[..., :4]
                 if self.pair_correlations else None)
        return TiledPosterior(
            count_logits=out[..., :n_count],
            loc_mean=params[..., 0:2],
            loc_sd=torch.exp(params[..., 2:4].clamp(-8, 3)),
            log_flux_mean=params[..., 4:4 + b] + self.log_flux_offset,
            log_flux_sd=torch.exp(params[..., 4 + b:4 + 2 * b].clamp(-8, 3)),
            spread=spread, density_cells=self.density_cells or None, pair_weights=pairs,
            count_tail=self.count_tail)

    def decide(self, features, choose, *, chunk_tiles=None):
        """Choose the catalog colour by colour.

        Parameters
        ----------
        features : `torch.Tensor`
            From `features`.
        choose : callable
            Maps a `~starnet.posterior.TiledPosterior` to a
            `~starnet.tiles.TileCatalog`, e.g. ``lambda q: q.mode()``.
        chunk_tiles : int, optional
            Compute in square blocks of this many tiles (same result, bounded memory).

        Returns
        -------
        posterior : `~starnet.posterior.TiledPosterior`
            Each tile's distribution given the choices made for the tiles before it.
        tiles : `~starnet.tiles.TileCatalog`
            The choices.
        """
        if self.n_colors == 1:
            posterior = self.tile_posterior(features, chunk_tiles=chunk_tiles)
            return posterior, choose(posterior)
        colors = self.tile_colors(features.shape[-2:], features.device)[None].expand(
            features.shape[0], -1, -1)
        posterior = tiles = None
        for color in range(self.n_colors):
            conditioning = (features.new_zeros(features.shape[0], self.condition.in_channels,
                                               *features.shape[-2:]) if tiles is None else
                            conditioning_map(tiles, colors < color, self.log_flux_offset))
            step = self.tile_posterior(features, conditioning, chunk_tiles=chunk_tiles)
            chosen = choose(step)
            mine = colors == color
            posterior = step if posterior is None else step.where(mine, posterior)
            tiles = chosen if tiles is None else chosen.where(mine, tiles)
        return posterior, tiles

    def joint_log_prob(self, features, tiles):
        """``log q(tiles | image)`` per tile, each tile conditioned on the true catalogs
        of the tiles decided before it (for n_colors = 1, the plain tile densities).

        Parameters
        ----------
        features : `torch.Tensor`, shape (n_images, tile_hidden, tile_rows, tile_cols)
            From `features`.
        tiles : `~starnet.tiles.TileCatalog`
            The catalogs whose density is computed, as tile variables.

        Returns
        -------
        `torch.Tensor`, shape (n_images, tile_rows, tile_cols)
            Log density of each tile.
        """
        if self.n_colors == 1:
            return self.tile_posterior(features).log_prob(tiles)
        colors = self.tile_colors(features.shape[-2:], features.device)[None].expand(
            features.shape[0], -1, -1)
        total = 0.0
        for color in range(self.n_colors):
            conditioning = conditioning_map(tiles, colors < color, self.log_flux_offset)
            log_prob = self.tile_posterior(features, conditioning).log_prob(tiles)
            total = total + torch.where(colors == color, log_prob, 0.0)
        return total


def _in_float32(layer, x):
    """``layer(x)`` in float32, also under ``autocast`` (bfloat16 inference,
    `starnet.devices`). The layers that read the pixels (the first convolution), the
    density (the context branch) or give the posterior's parameters (the heads) run so:
    in bfloat16 they moved the count of ``sdss`` by +0.9 % at 0.12 stars per pixel on
    photutils fields, against +0.2 % with them in float32 (docs/scaling.rst)."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def _modulate_pixels(h, scale, shift, tile_size):
    """``h * (1 + scale) + shift`` with ``scale`` and ``shift`` given per tile (or 1 x 1)
    and ``h`` per pixel of those tiles, without copying the modulation to every pixel:
    a view of ``h`` as tiles of pixels, in its channels-last order."""
    if scale.shape[-1] == 1 and scale.shape[-2] == 1:
        return h * (1 + scale) + shift
    rows, cols = h.shape[-2] // tile_size, h.shape[-1] // tile_size
    pixels = h.permute(0, 2, 3, 1).unflatten(2, (cols, tile_size)).unflatten(1, (rows, tile_size))
    scale, shift = (f.permute(0, 2, 3, 1)[:, :, None, :, None, :] for f in (scale, shift))
    out = torch.addcmul(shift, pixels, 1 + scale)
    return out.flatten(3, 4).flatten(1, 2).permute(0, 3, 1, 2)


def _window(tensor, rows, cols):
    """Rows ``rows`` and columns ``cols`` (``(start, stop)``) of the last two axes of a
    tensor that broadcasts over them (an axis of length 1 is kept whole)."""
    index = [slice(None)] * tensor.ndim
    for axis, bounds in ((-2, rows), (-1, cols)):
        if tensor.ndim >= -axis and tensor.shape[axis] != 1:
            index[axis] = slice(*bounds)
    return tensor[tuple(index)]


def _chunked(function, x, chunk, halo, scale, *, progress=None):
    """Apply a convolutional ``function`` that maps ``x`` (..., rows, cols) to a grid
    ``scale`` times coarser, block by block: blocks of ``chunk`` output cells, each
    computed with ``halo`` cells of context on every side. ``progress(done, total)`` is
    called after each block."""
    if chunk is None:
        return function(x)
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk_tiles must be positive, got {chunk}")
    out_rows, out_cols = x.shape[-2] // scale, x.shape[-1] // scale
    total = -(-out_rows // chunk) * -(-out_cols // chunk)
    done = 0
    rows = []
    for r0 in range(0, out_rows, chunk):
        r1 = min(r0 + chunk, out_rows)
        h0, h1 = max(r0 - halo, 0), min(r1 + halo, out_rows)
        row = []
        for c0 in range(0, out_cols, chunk):
            c1 = min(c0 + chunk, out_cols)
            w0, w1 = max(c0 - halo, 0), min(c1 + halo, out_cols)
            out = function(x[..., h0 * scale:h1 * scale, w0 * scale:w1 * scale])
            row.append(out[..., r0 - h0:r1 - h0, c0 - w0:c1 - w0])
            done += 1
            if progress is not None:
                progress(done, total)
        rows.append(torch.cat(row, dim=-1))
    return torch.cat(rows, dim=-2)
