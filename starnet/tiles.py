"""Catalogs <-> tile variables (paper appendix A).

The image is cut into square tiles of ``tile_size`` pixels. Tile ``(i, j)`` covers
``i * R - 0.5 <= y < (i + 1) * R - 0.5`` and ``j * R - 0.5 <= x < (j + 1) * R - 0.5``
(pixel centres at integers), so a star's tile is ``floor((y + 0.5) / R)``,
``floor((x + 0.5) / R)``, and its position within the tile is
``u = ((x + 0.5) - j R) / R`` in ``[0, 1)``. A tile holds at most ``max_sources``
stars; when more fall in one tile the brightest (in the first band) are kept and the
others are counted as dropped.
"""

import math
from dataclasses import dataclass

import torch

__all__ = ["TileGrid", "TileCatalog", "choose_tile_size"]


@dataclass
class TileCatalog:
    """Per-tile catalog variables of a batch of images.

    Attributes
    ----------
    counts : `torch.Tensor` of int64, shape (n_images, tile_rows, tile_cols)
        Number of stars in each tile (at most ``max_sources``).
    locs : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, max_sources, 2)
        Positions ``(u_x, u_y)`` within the tile in ``[0, 1)``, brightest first; padded
        slots are 0.5.
    fluxes : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, max_sources, n_bands)
        Fluxes in electrons; padded slots are 1.
    n_dropped : int
        Stars left out because their tile already held ``max_sources`` brighter stars.
    """

    counts: torch.Tensor
    locs: torch.Tensor
    fluxes: torch.Tensor
    n_dropped: int

    def to(self, device):
        """The same tile variables with their tensors on ``device``.

        Parameters
        ----------
        device : str or `torch.device`

        Returns
        -------
        `TileCatalog`
        """
        return TileCatalog(counts=self.counts.to(device), locs=self.locs.to(device),
                           fluxes=self.fluxes.to(device), n_dropped=self.n_dropped)

    def where(self, mask, other):
        """Tiles of ``self`` where ``mask`` is true and of ``other`` elsewhere.

        Parameters
        ----------
        mask : `torch.Tensor` of bool, shape (n_images, tile_rows, tile_cols)
            Tiles taken from ``self``.
        other : `TileCatalog`
            Tile catalog of the same shape, for the other tiles.

        Returns
        -------
        `TileCatalog`
            The merged tiles; ``n_dropped`` is the sum of both.
        """
        wide = mask[..., None, None]
        return TileCatalog(counts=torch.where(mask, self.counts, other.counts),
                           locs=torch.where(wide, self.locs, other.locs),
                           fluxes=torch.where(wide, self.fluxes, other.fluxes),
                           n_dropped=self.n_dropped + other.n_dropped)

    @staticmethod
    def concatenate(catalogs):
        """Join tile catalogs of several batches along the image axis.

        Parameters
        ----------
        catalogs : sequence of `TileCatalog`
            Catalogs with the same tile grid, ``max_sources`` and bands.

        Returns
        -------
        `TileCatalog`
            All images in order; ``n_dropped`` is the sum over ``catalogs``.
        """
        return TileCatalog(counts=torch.cat([c.counts for c in catalogs]),
                           locs=torch.cat([c.locs for c in catalogs]),
                           fluxes=torch.cat([c.fluxes for c in catalogs]),
                           n_dropped=sum(c.n_dropped for c in catalogs))


class TileGrid:
    """The tiling of an image and the conversion between catalogs and tile variables.

    Parameters
    ----------
    tile_size : int
        Side of a tile in pixels (paper for M2: 2).
    max_sources : int
        Largest number of stars a tile can hold (paper: 3).

    Examples
    --------
    >>> import torch
    >>> from starnet.tiles import TileGrid
    >>> grid = TileGrid(tile_size=2, max_sources=3)
    >>> grid.grid_shape((5, 6))
    (3, 3)
    >>> locs = torch.tensor([[[0.2, 0.1], [3.0, 2.4]]])     # (x, y) of two stars
    >>> tiles = grid.to_tiles(locs, torch.ones(1, 2, 1), torch.ones(1, 2, dtype=bool), (4, 4))
    >>> tiles.counts[0].tolist()
    [[1, 0], [0, 1]]
    """

    def __init__(self, *, tile_size=2, max_sources=3):
        if int(tile_size) != tile_size or tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {tile_size}")
        if int(max_sources) != max_sources or max_sources < 1:
            raise ValueError(f"max_sources must be a positive integer, got {max_sources}")
        self.tile_size = int(tile_size)
        self.max_sources = int(max_sources)

    def grid_shape(self, shape):
        """Number of tile rows and columns covering an image of ``shape = (rows, cols)``.

        Parameters
        ----------
        shape : tuple of int
            ``(rows, cols)`` of the image in pixels.

        Returns
        -------
        tuple of int
            ``(tile_rows, tile_cols)``, rounded up to cover partial tiles.
        """
        return tuple(math.ceil(n / self.tile_size) for n in shape)

    def to_tiles(self, locs, fluxes, mask, shape):
        """Tile variables of a batch of catalogs; stars outside the image are ignored.

        Parameters
        ----------
        locs : `torch.Tensor`, shape (n_images, n_stars, 2)
            ``(x, y)`` pixel positions.
        fluxes : `torch.Tensor`, shape (n_images, n_stars, n_bands)
        mask : `torch.Tensor` of bool, shape (n_images, n_stars)
        shape : tuple of int
            ``(rows, cols)`` of the image.

        Returns
        -------
        `TileCatalog`
        """
        n_images, n_stars, n_bands = fluxes.shape
        tile_rows, tile_cols = self.grid_shape(shape)
        n_tiles = tile_rows * tile_cols
        scaled = (locs + 0.5) / self.tile_size
        tile = scaled.floor()
        inside = (mask & (locs[..., 0] >= -0.5) & (locs[..., 0] < shape[1] - 0.5)
                  & (locs[..., 1] >= -0.5) & (locs[..., 1] < shape[0] - 0.5))
        tile_index = (tile[..., 1] * tile_cols + tile[..., 0]).long()
        device = locs.device
        key = torch.arange(n_images, device=device)[:, None] * n_tiles + tile_index
        key = torch.where(inside, key, n_images * n_tiles).reshape(-1)

        # sort stars by tile, brightest first within a tile
        by_flux = torch.argsort(-fluxes[..., 0].reshape(-1), stable=True)
        order = by_flux[torch.argsort(key[by_flux], stable=True)]
        sorted_key = key[order]
        first = torch.searchsorted(sorted_key, sorted_key, right=False)
        rank = torch.arange(sorted_key.numel(), device=device) - first
        valid = sorted_key < n_images * n_tiles
        keep = valid & (rank < self.max_sources)

        slots = n_images * n_tiles * self.max_sources
        slot = (sorted_key * self.max_sources + rank)[keep]
        counts = torch.zeros(n_images * n_tiles, dtype=torch.long, device=device)
        counts.scatter_add_(0, sorted_key[keep], torch.ones_like(slot))
        within = (scaled - tile).reshape(-1, 2)[order][keep]
        tile_locs = torch.full((slots, 2), 0.5, device=device)
        tile_locs[slot] = within.float()
        tile_fluxes = torch.ones(slots, n_bands, device=device)
        tile_fluxes[slot] = fluxes.reshape(-1, n_bands)[order][keep].float()

        grid = (n_images, tile_rows, tile_cols)
        return TileCatalog(
            counts=counts.reshape(grid),
            locs=tile_locs.reshape(*grid, self.max_sources, 2),
            fluxes=tile_fluxes.reshape(*grid, self.max_sources, n_bands),
            n_dropped=int((valid & ~keep).sum()))

    def to_pixels(self, tile_locs, origin=(0, 0)):
        """Pixel ``(x, y)`` of within-tile positions ``tile_locs`` (..., rows, cols, k, 2)
        of the tiles from tile ``origin`` (row, col) on.

        Parameters
        ----------
        tile_locs : `torch.Tensor`, shape (..., tile_rows, tile_cols, k, 2)
            Positions ``(u_x, u_y)`` within the tiles, in ``[0, 1)``.
        origin : tuple of int, optional
            ``(row, col)`` in the tile grid of the first tile of ``tile_locs``.

        Returns
        -------
        `torch.Tensor`, shape (..., tile_rows, tile_cols, k, 2)
            Pixel ``(x, y)`` in the image (pixel centres at integers).
        """
        tile_rows, tile_cols = tile_locs.shape[-4:-2]
        like = dict(dtype=tile_locs.dtype, device=tile_locs.device)
        col = torch.arange(origin[1], origin[1] + tile_cols, **like)[None, :, None]
        row = torch.arange(origin[0], origin[0] + tile_rows, **like)[:, None, None]
        x = (col + tile_locs[..., 0]) * self.tile_size - 0.5
        y = (row + tile_locs[..., 1]) * self.tile_size - 0.5
        return torch.stack([x, y], dim=-1)

    def from_tiles(self, tiles, origin=(0, 0)):
        """Flatten tile variables into padded per-image catalogs (of the tiles from tile
        ``origin`` (row, col) of the grid on, for a block of the grid).

        Parameters
        ----------
        tiles : `TileCatalog`
            Tile variables of ``n_images`` images (or of a block of their tile grid).
        origin : tuple of int, optional
            ``(row, col)`` in the tile grid of the first tile of ``tiles``.

        Returns
        -------
        locs : `torch.Tensor`, shape (n_images, n_slots, 2)
            Pixel ``(x, y)``; ``n_slots = tile_rows * tile_cols * max_sources``.
        fluxes : `torch.Tensor`, shape (n_images, n_slots, n_bands)
        mask : `torch.Tensor` of bool, shape (n_images, n_slots)
            `True` for the ``counts`` first slots of each tile.
        """
        n_images = tiles.counts.shape[0]
        slot = torch.arange(self.max_sources, device=tiles.counts.device)
        mask = (slot < tiles.counts[..., None]).reshape(n_images, -1)
        locs = self.to_pixels(tiles.locs, origin).reshape(n_images, -1, 2)
        fluxes = tiles.fluxes.reshape(n_images, -1, tiles.fluxes.shape[-1])
        return locs, fluxes, mask


def choose_tile_size(fwhm, mu, *, stars_per_tile=0.5):
    """Side in pixels of the tiles of a model for a PSF of ``fwhm`` at ``mu`` stars/px.

    A tile should be no wider than the PSF, so that close pairs fall in different
    tiles, and hold few stars, so that the count lost above ``max_sources`` is small:
    the largest whole number of pixels, at most the FWHM (and at least one), whose
    tiles hold ``stars_per_tile`` stars or fewer on average. SDSS around M2 (FWHM 2.6
    pixels, 0.12 stars per pixel) gets the paper's 2; a 4-pixel Gaussian at 0.02 stars
    per pixel gets 4.

    Parameters
    ----------
    fwhm : float
        FWHM of the narrowest band's PSF, pixels (`starnet.psf.psf_fwhm`).
    mu : float
        Stars per pixel of the prior.
    stars_per_tile : float, optional
        Largest mean number of stars per tile.

    Examples
    --------
    >>> from starnet.tiles import choose_tile_size
    >>> choose_tile_size(2.6, 0.12), choose_tile_size(4.0, 0.02), choose_tile_size(3.5, 0.05)
    (2, 4, 3)
    """
    if not (fwhm > 0 and mu > 0 and stars_per_tile > 0):
        raise ValueError(f"fwhm, mu and stars_per_tile must be positive; got {fwhm}, {mu} "
                         f"and {stars_per_tile}")
    size = max(1, int(math.floor(fwhm)))
    while size > 1 and mu * size ** 2 > stars_per_tile:
        size -= 1
    return size


def inside_image(locs, shape):
    """Which ``(x, y)`` positions ``locs`` (..., 2) lie on an image of ``shape``."""
    rows, cols = shape
    return ((locs[..., 0] >= -0.5) & (locs[..., 0] < cols - 0.5)
            & (locs[..., 1] >= -0.5) & (locs[..., 1] < rows - 0.5))
