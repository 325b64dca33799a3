"""Inference on tensors: an image's posterior, its modal catalog, draws and star counts.

The path from an image to what `~starnet.StarNetDeblender` returns, without a
deblender object: every function takes the encoder (`~starnet.encoder.StarNetEncoder`)
and tensors, and returns tensors or numpy arrays. The deblender chooses the background
(`starnet.background.choose_background`), calls these functions and makes tables of
their results (`starnet.catalogs`).

1. `prepare_image` reads an `~astropy.nddata.NDData` into an `EncoderInput`: the
   tensors the encoder is called with (the image and its background, in electrons),
   checked against the model (bands, sky level, PSF), and the image's meta.
2. `encode_blocks` (independent tiles, block by block, so that memory stays that of a
   block) and `encode` (the whole image: the posterior of independent tiles, or the
   tile features of a checkerboard model) are the only calls of the network: in
   evaluation mode, without gradients, with denormal numbers flushed and progress
   reported (`starnet.progress`). `chunk_tiles` sets the size of the blocks.
3. `modal_catalog` gives the rows of the modal catalog and the posterior pmf of the
   number of stars; `draw_catalogs` catalogs drawn from the posterior (`modal` and
   `draw` for a posterior already encoded); `count_pmfs` the posterior pmfs of the
   number of stars in regions of the image (`region_tiles`).

The inputs beside the pixels. An encoder may read a mask of missing pixels and PSF
descriptors (the ``mask`` and ``psf`` arguments of `~starnet.encoder.StarNetEncoder`;
in training, `starnet.training.TrainingBatch` carries them). In inference they are
fields of `EncoderInput`, filled by `prepare_image` for the encoder they are for (the
mask from the image's masked, non-finite and saturated pixels; descriptors of its PSFs,
a map where a `~photutils.psf.GriddedPSFModel` varies, by
`starnet.psf_family.image_descriptors`) and handed to the network by `encode` and
`encode_blocks`, its only two calls (`EncoderInput.network_inputs`).

The device. `encode` and `encode_blocks` run the network where its weights are
(`starnet.devices.on_device` puts them on a GPU for a call): the inputs go there, and
the posteriors come back to the CPU, where the rest of this module reads them. (The
tile features of a checkerboard model stay on the device, with the network that
decides its tiles.)
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .denormals import flush_denormals
from .devices import autocast
from .images import image_psfs, read_image
from .posterior import (TiledPosterior, _full_pmf, contract_counts, convolve_counts,
                        pair_covariance, side_correlations)
from .progress import progress_callback
from .psf import as_psf, pixel_stamps
from .psf_family import image_descriptors
from .tiles import TileCatalog, TileGrid, inside_image
from .validation import check_background

__all__ = ["EncoderInput", "prepare_image", "check_psfs", "chunk_tiles", "encode",
           "encode_blocks", "modal", "draw", "modal_catalog", "draw_catalogs", "count_pmfs",
           "region_tiles"]

_GAUSS_HERMITE = np.polynomial.hermite_e.hermegauss(32)


@dataclass
class EncoderInput:
    """What the encoder sees of an image (`prepare_image`).

    Attributes
    ----------
    image : `torch.Tensor`, shape (1, bands, rows, cols)
        Pixels in electrons, background included; masked or non-finite pixels hold the
        background.
    background : `torch.Tensor`, shape (1, bands, 1, 1) or (1, bands, rows, cols)
        Background in electrons.
    meta : dict
        The image's meta, with ``background_median`` (per band, electrons),
        ``pedestal``, ``electrons_per_unit`` (`starnet.images.read_image`) and
        ``saturated_pixels`` (a (rows, cols) map of the pixels saturated in any band,
        or None) and ``saturated_light`` (the band, x, y and recorded light above the
        background, electrons, of each saturated pixel, or None).
    mask : `torch.Tensor` of bool, shape (1, bands, rows, cols), optional
        The missing pixels (masked, non-finite or saturated), for an encoder with
        ``mask_channel``.
    psf : `torch.Tensor`, optional
        The PSF descriptors of each band (`starnet.psf_family.image_descriptors`), for
        an encoder with ``psf_features``.
    prior : `torch.Tensor`, shape (1, prior_features), optional
        The descriptor of the prior the image is read under
        (`starnet.prior.StarFieldPrior.descriptor`), for an encoder with
        ``prior_features``.
    """

    image: torch.Tensor
    background: torch.Tensor
    meta: dict
    mask: torch.Tensor = None
    psf: torch.Tensor = None
    prior: torch.Tensor = None

    @property
    def network_inputs(self):
        """The keyword arguments of the encoder beside the image and background."""
        return {"mask": self.mask, "psf": self.psf, "prior": self.prior}

    def to(self, device):
        """The same input with its tensors on ``device`` (the meta stays).

        Parameters
        ----------
        device : `torch.device`

        Returns
        -------
        `EncoderInput`
        """
        if self.image.device == device:
            return self
        return EncoderInput(self.image.to(device), self.background.to(device), self.meta,
                            *(None if t is None else t.to(device)
                              for t in (self.mask, self.psf, self.prior)))

    @property
    def shape(self):
        """``(rows, cols)`` of the image."""
        return tuple(self.image.shape[-2:])


def prepare_image(nddata, *, bands, psfs, stamp_size, encoder=None, prior=None, checks=True):
    """The encoder's input from an image, checked against the model.

    Parameters
    ----------
    nddata : `~astropy.nddata.NDData`
        The image, as `~starnet.StarNetDeblender.__call__` takes it.
    bands : list of str
        The model's bands.
    psfs : list
        The model's PSFs, one per band (see `check_psfs`).
    stamp_size : int
        The model's stamp width (see `check_psfs`).
    encoder : `~starnet.encoder.StarNetEncoder`, optional
        The network the input is for: one with ``mask_channel`` is given the mask of
        missing pixels, one with ``psf_features`` the descriptors of the image's PSFs
        (`starnet.psf_family.image_descriptors`) instead of a check of them against the
        model's.
    prior : `~starnet.StarFieldPrior`, optional
        The prior the image is read under; required by an encoder with
        ``prior_features``, which is told its descriptor.
    checks : bool, optional
        Check the pixels against the declared background
        (`starnet.validation.check_background`) and the image's PSFs against the
        model's, and warn of the pixels replaced (False: the background fit, which
        precedes a call that does these).

    Returns
    -------
    inputs : `EncoderInput`
        Pixels and background in electrons (`starnet.images.read_image`); masked,
        non-finite or saturated pixels are replaced by the background (with a warning
        unless the encoder reads the mask).
    """
    image = read_image(nddata, bands)
    data, background, bad = image.data, image.background, image.bad
    if checks:
        check_background(data, background, bands, bad=bad)
    reads_mask = encoder is not None and encoder.mask_channel
    mask = torch.from_numpy(np.ascontiguousarray(bad))[None] if reads_mask else None
    if bad.any():
        if checks and not reads_mask:
            warnings.warn(f"{int(bad.sum())} masked, non-finite or saturated pixels are "
                          "replaced by the background; stars there are not detected",
                          UserWarning)
        data = np.where(bad, background, data)
    del bad
    psf = None
    if encoder is not None and encoder.psf_features:
        psf = image_descriptors(image_psfs(nddata, len(bands)), data.shape[1:],
                                tile_size=encoder.tile_size)
    elif checks:
        check_psfs(image_psfs(nddata, len(bands)), psfs, bands=bands, stamp_size=stamp_size)
    prior_inputs = None
    if encoder is not None and encoder.prior_features:
        if prior is None:
            raise ValueError("this model reads the prior the image is read under: give "
                             "prior (a StarFieldPrior)")
        if list(prior.bands) != list(bands):
            raise ValueError(f"the prior's bands {list(prior.bands)} are not the model's "
                             f"{list(bands)}")
        prior_inputs = prior.descriptor()
    saturated = None if image.saturated is None else image.saturated.any(axis=0)
    saturated_light = None
    if saturated is not None and saturated.any():
        band, row, col = np.nonzero(image.saturated)
        excess = (image.data[band, row, col].astype(float)
                  - np.broadcast_to(image.background, image.data.shape)[band, row, col])
        saturated_light = (band, col, row, np.where(np.isfinite(excess), excess, 0.0).clip(0))
    with warnings.catch_warnings():
        # the caller's arrays may be read-only; they are only read
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        medians = np.median(background.reshape(len(bands), -1), axis=1)
        meta = dict(image.meta, background_median=[float(m) for m in medians],
                    pedestal=image.pedestal, electrons_per_unit=image.electrons_per_unit,
                    saturated_pixels=saturated if saturated is not None and saturated.any()
                    else None, saturated_light=saturated_light)
        return EncoderInput(torch.from_numpy(data)[None], torch.from_numpy(background)[None],
                            meta, mask, psf, prior_inputs)


def check_psfs(psfs, model_psfs, *, bands, stamp_size):
    """Warn when an image's PSFs place more than 2 % of the light differently from the
    model's.

    Parameters
    ----------
    psfs : PSF or list of PSF
        The image's PSFs (one for all bands, or one per band).
    model_psfs : list
        The model's PSFs, one per band.
    bands : list of str
        The model's bands.
    stamp_size : int
        The model's stamp width; the PSFs are compared on stamps of at most 15 pixels.
    """
    psfs = list(psfs) if isinstance(psfs, (list, tuple)) else [psfs] * len(bands)
    if len(psfs) != len(bands):
        raise ValueError(f"meta['psf'] has {len(psfs)} PSFs for {len(bands)} bands")
    for band, model_psf, image_psf in zip(bands, model_psfs, psfs):
        size = min(stamp_size, 15)
        ours = pixel_stamps(model_psf, size, [0.0], [0.0])[0]
        theirs = pixel_stamps(as_psf(image_psf), size, [0.0], [0.0])[0]
        ours, theirs = ours / ours.sum(), theirs / theirs.sum()
        difference = np.abs(ours - theirs).sum() / 2
        # 3.4 % (r) and 4.9 % (i) between the SDSS power law and KL PSFs of M2
        # biased the count by +40 % (docs/psf.rst)
        if difference > 0.02:
            warnings.warn(f"the image's PSF in band {band} differs from the PSF the model "
                          f"was trained with ({difference:.1%} of the light is placed "
                          "differently; 3 to 5 % made the count 40 % too high on "
                          "simulated M2 images); results may be biased", UserWarning)


def chunk_tiles(shape, *, chunk_size, tile_size):
    """Side of the blocks in tiles for an image of ``shape``, or None (one block).

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` of the image.
    chunk_size : int
        Images larger than this many pixels on a side are encoded in square blocks of
        this size.
    tile_size : int
        Side of a tile in pixels.

    Returns
    -------
    int or None
    """
    if max(shape) > chunk_size:
        return max(chunk_size // tile_size, 1)
    return None


@torch.no_grad()
def encode(encoder, inputs, *, chunk_tiles=None, progress=False, dtype=torch.float32):
    """The whole image through the network.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
    inputs : `EncoderInput`
    chunk_tiles : int, optional
        Compute in square blocks of this many tiles (same result, bounded memory).
    progress : bool, optional
        Show a progress bar over the blocks.
    dtype : `torch.dtype`, optional
        Of the network's convolutions (`starnet.devices.as_precision`); the heads and
        the posterior stay float32.

    Returns
    -------
    state : `~starnet.posterior.TiledPosterior` or `torch.Tensor`
        The posterior of every tile (independent tiles), or the tile features of a
        checkerboard model, decided later by `modal` or `draw`.
    """
    encoder.eval()
    inputs = inputs.to(_device(encoder))
    with flush_denormals(), progress_callback(progress, "encoding blocks") as report, \
            autocast(dtype, _device(encoder)):
        if encoder.n_colors == 1:
            return encoder(inputs.image, inputs.background, chunk_tiles=chunk_tiles,
                           progress=report, **inputs.network_inputs).to("cpu")
        return encoder.features(inputs.image, inputs.background, chunk_tiles=chunk_tiles,
                                progress=report, **inputs.network_inputs)


def encode_blocks(encoder, inputs, *, chunk_tiles=None, progress=False,
                  dtype=torch.float32):
    """The posterior of independent tiles, block by block.

    See `~starnet.encoder.StarNetEncoder.blocks`: the result equals `encode`'s, while
    memory stays that of a block beside the image.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
        With ``n_colors`` = 1.
    inputs : `EncoderInput`
    chunk_tiles : int, optional
        Side of the blocks in tiles (default: one block).
    progress : bool, optional
        Show a progress bar over the blocks.
    dtype : `torch.dtype`, optional
        As for `encode`.

    Yields
    ------
    block : tuple
        ``(rows, cols, posterior)`` as `~starnet.encoder.StarNetEncoder.blocks` yields
        them: the block's slices of the tile grid and its tiles' posterior.
    """
    encoder.eval()
    inputs = inputs.to(_device(encoder))
    with torch.no_grad(), flush_denormals(), \
            progress_callback(progress, "encoding blocks") as report:
        blocks = encoder.blocks(inputs.image, inputs.background, chunk_tiles,
                                progress=report, **inputs.network_inputs)
        while True:
            # autocast is global: entered per block, it stays out of the caller's code
            with autocast(dtype, _device(encoder)):
                block = next(blocks, None)
            if block is None:
                return
            rows, cols, posterior = block
            yield rows, cols, posterior.to("cpu")


@torch.no_grad()
def modal(encoder, state, *, chunk_tiles=None):
    """The posterior of every tile and the modal catalog, from `encode`'s ``state``.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
    state : `~starnet.posterior.TiledPosterior` or `torch.Tensor`
        From `encode`.
    chunk_tiles : int, optional
        As for `encode`.

    Returns
    -------
    posterior : `~starnet.posterior.TiledPosterior`
        For a checkerboard model, each tile's given the modal choices before it.
    mode : `~starnet.tiles.TileCatalog`
    """
    if isinstance(state, TiledPosterior):
        return state, state.mode()
    with flush_denormals():
        return encoder.decide(state, lambda q: q.mode(), chunk_tiles=chunk_tiles)


@torch.no_grad()
def draw(encoder, state, n_samples, *, generator, chunk_tiles=None, progress=False):
    """Catalogs drawn from the posterior of `encode`'s ``state``, as tile variables.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
    state : `~starnet.posterior.TiledPosterior` or `torch.Tensor`
        From `encode`.
    n_samples : int
        Number of catalogs.
    generator : `torch.Generator`
        Source of the draws.
    chunk_tiles : int, optional
        As for `encode`.
    progress : bool, optional
        Show a progress bar over the draws.

    Returns
    -------
    draws : `~starnet.tiles.TileCatalog`
        One image of tile variables per draw.
    """
    def sample(q):
        return q.sample(generator=generator)

    n_tiles = state.count_logits[0, ..., 0].numel() if isinstance(
        state, TiledPosterior) else state.shape[-2] * state.shape[-1]
    batch = int(np.clip(2_000_000 // n_tiles, 1, 64))
    draws = []
    with flush_denormals(), progress_callback(progress, "posterior draws") as report:
        for start in range(0, n_samples, batch):
            size = min(batch, n_samples - start)
            if isinstance(state, TiledPosterior):
                draws.append(sample(state.expand(size)))
            else:
                expanded = state.expand(size, *state.shape[1:])
                draws.append(encoder.decide(expanded, sample, chunk_tiles=chunk_tiles)[1])
            report(start + size, n_samples)
    return TileCatalog.concatenate(draws)


def modal_catalog(encoder, inputs, *, chunk_tiles=None, progress=False,
                  dtype=torch.float32, counts=True):
    """The modal catalog of an image and the posterior of its number of stars.

    The modal catalog holds the most probable count in each tile, with the modes of
    the positions and fluxes. Independent tiles are encoded block by block
    (`encode_blocks`): only the rows and the count pmf of each block are kept.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
    inputs : `EncoderInput`
    chunk_tiles, dtype : optional
        As for `encode`.
    progress : bool, optional
        Show a progress bar over the blocks.
    counts : bool, optional
        Also compute the count posterior (False: ``offset`` and ``pmf`` are None).

    Returns
    -------
    rows : dict of `numpy.ndarray`
        The stars inside the image, by tile then slot: ``locs`` (n, 2) pixel ``(x,
        y)``, ``sd`` (n, 2) their posterior standard deviations, ``fluxes`` (n, bands)
        electrons, ``flux_sd`` (n, bands) the standard deviations of the log fluxes,
        ``detection`` (n,) the posterior probability that the tile holds at least as
        many stars as the star's rank by flux in the tile.
    offset : int
        The smallest count of ``pmf``.
    pmf : `numpy.ndarray`
        ``pmf[k]`` = q(N = ``offset`` + k); for a checkerboard model, given the modal
        choices of the tiles decided before each tile.
    """
    grid = _grid(encoder)
    shape = inputs.shape
    if encoder.n_colors == 1:
        parts, block_pmfs = [], []
        pairs = _PairTerms(encoder, grid.grid_shape(shape))
        for rows, cols, posterior in encode_blocks(encoder, inputs, chunk_tiles=chunk_tiles,
                                                   progress=progress, dtype=dtype):
            parts.append(_modal_rows(grid, posterior, posterior.mode(),
                                     (rows.start, cols.start), shape))
            if counts:
                block_pmfs.extend(posterior.count_parts())
                pairs.add(rows, cols, posterior)
        offset, pmf = pairs.contract(*convolve_counts(block_pmfs)) if counts else (None, None)
    else:
        state = encode(encoder, inputs, chunk_tiles=chunk_tiles, progress=progress,
                       dtype=dtype)
        posterior, mode = modal(encoder, state, chunk_tiles=chunk_tiles)
        parts = [_modal_rows(grid, posterior, mode, (0, 0), shape)]
        offset, pmf = 0, posterior.count_pmf()
        del state, posterior, mode
    rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.argsort(rows.pop("key"), kind="stable")   # by tile, as one-shot
    rows = {key: value[order] for key, value in rows.items()}
    if not counts:
        return rows, None, None
    if not encoder.count_tail:     # (a count tail may go beyond max_sources per tile)
        n_tiles = int(np.prod(grid.grid_shape(shape)))
        pmf = pmf[:max(n_tiles * grid.max_sources + 1 - offset, 0)]
    return rows, offset, pmf / pmf.sum()


def draw_catalogs(encoder, inputs, n_samples, *, generator, chunk_tiles=None,
                  progress=False, dtype=torch.float32):
    """Whole catalogs drawn from the posterior of an image.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
    inputs : `EncoderInput`
    n_samples, generator, chunk_tiles
        As for `draw`.
    progress : bool, optional
        Show progress bars over the blocks and the draws.
    dtype : `torch.dtype`, optional
        As for `encode`.

    Returns
    -------
    catalogs : list of tuple
        One ``(locs, fluxes)`` per draw: the pixel ``(x, y)`` (n, 2) and fluxes (n,
        bands; electrons) of its stars inside the image, as `numpy.ndarray`.
    """
    state = encode(encoder, inputs, chunk_tiles=chunk_tiles, progress=progress, dtype=dtype)
    draws = draw(encoder, state, n_samples, generator=generator, chunk_tiles=chunk_tiles,
                 progress=progress)
    all_locs, all_fluxes, all_masks = _grid(encoder).from_tiles(draws)
    catalogs = []
    for locs, fluxes, mask in zip(all_locs, all_fluxes, all_masks):
        keep = mask & inside_image(locs, inputs.shape)
        catalogs.append((locs[keep].double().numpy(), fluxes[keep].double().numpy()))
    return catalogs


def count_pmfs(encoder, inputs, regions=None, *, chunk_tiles=None, progress=False,
               n_samples=200, dtype=torch.float32):
    """Posterior pmfs of the number of stars in the image or in regions of it.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
    inputs : `EncoderInput`
    regions : sequence of array of bool, shape (rows, cols), optional
        Pixels of each region (see `region_tiles`); default: the whole image.
    chunk_tiles : int, optional
        As for `encode`.
    progress : bool, optional
        Show a progress bar over the blocks.
    n_samples : int, optional
        Posterior draws behind the pmfs of a checkerboard model.
    dtype : `torch.dtype`, optional
        As for `encode`.

    Returns
    -------
    pmfs : list of `numpy.ndarray`
        One per region: ``pmf[k]`` = q(N = k), exact for independent tiles (the
        convolution of the tiles' count distributions, or of their density cells'
        mixtures, block by block: `~starnet.posterior.TiledPosterior.count_parts`),
        contracted by the covariances of the region's side pairs where the encoder gives
        pair correlations (`~starnet.posterior.contract_counts`); the frequencies of
        ``n_samples`` posterior draws for a checkerboard model.
    """
    grid = _grid(encoder)
    shape = inputs.shape
    tile_maps = [None] if regions is None else [
        region_tiles(region, shape, tile_size=grid.tile_size) for region in regions]
    if encoder.n_colors != 1:
        state = encode(encoder, inputs, chunk_tiles=chunk_tiles, progress=progress,
                       dtype=dtype)
        return _sampled_count_pmfs(encoder, state, tile_maps, n_samples, chunk_tiles)
    # the pmf of a region is the convolution of those of its parts in the blocks
    parts = [[] for _ in tile_maps]
    pairs = _PairTerms(encoder, grid.grid_shape(shape))
    for rows, cols, posterior in encode_blocks(encoder, inputs, chunk_tiles=chunk_tiles,
                                               progress=progress, dtype=dtype):
        pairs.add(rows, cols, posterior)
        for part, tiles in zip(parts, tile_maps):
            part.extend(posterior.count_parts(None if tiles is None else tiles[rows, cols]))
    n_tiles = int(np.prod(grid.grid_shape(shape)))
    pmfs = []
    for part, tiles in zip(parts, tile_maps):
        n_selected = n_tiles if tiles is None else int(tiles.sum())
        offset, pmf = pairs.contract(*convolve_counts(part), tiles)
        pmfs.append(_full_pmf(offset, pmf,
                              max(n_selected * grid.max_sources + 1, offset + len(pmf))))
    return pmfs


class _PairTerms:
    """The count variances and pair correlations of a whole tile grid, gathered block by
    block, to contract the count pmf of a region by its pairs' covariances (pairs across
    blocks included); nothing to do for an encoder without pair correlations."""

    def __init__(self, encoder, grid_shape):
        self.active = encoder.pair_correlations
        self.correlation = None
        if self.active:
            self.variance = np.zeros(grid_shape)
            self.weights = torch.zeros(1, *grid_shape, 4, dtype=torch.float64)

    def add(self, rows, cols, posterior):
        if self.active:
            self.variance[rows, cols] = posterior.count_variance[0].double().numpy()
            self.weights[0, rows, cols] = posterior.pair_weights[0].double()

    def contract(self, offset, pmf, tiles=None):
        if not self.active:
            return offset, pmf
        if self.correlation is None:        # once all blocks are in
            self.correlation = side_correlations(self.weights)[0].numpy()
        return contract_counts(offset, pmf,
                               2 * pair_covariance(self.variance, self.correlation, tiles))


def region_tiles(region, shape, *, tile_size):
    """Boolean map of the tiles whose central pixel a pixel region holds.

    Parameters
    ----------
    region : array of bool, shape (rows, cols)
        Pixels of the region.
    shape : tuple of int
        ``(rows, cols)`` of the image.
    tile_size : int
        Side of a tile in pixels; the central pixel of a tile of even size is the one
        above and left of its centre.

    Returns
    -------
    tiles : `numpy.ndarray` of bool, shape (tile_rows, tile_cols)
    """
    if region.dtype != bool or region.shape != tuple(shape):
        raise ValueError(f"region must be a boolean array of the image's shape "
                         f"{tuple(shape)} (or a stack of them), got {region.dtype} "
                         f"{region.shape}")
    rows = np.minimum(np.arange(0, shape[0], tile_size) + (tile_size - 1) // 2, shape[0] - 1)
    cols = np.minimum(np.arange(0, shape[1], tile_size) + (tile_size - 1) // 2, shape[1] - 1)
    return region[np.ix_(rows, cols)]


def _device(encoder):
    """The device of ``encoder``'s weights."""
    return next(encoder.parameters()).device


def _grid(encoder):
    return TileGrid(tile_size=encoder.tile_size, max_sources=encoder.max_sources)


def _sampled_count_pmfs(encoder, state, tile_maps, n_samples, chunk_tiles):
    """Posterior pmfs of a checkerboard model's number of stars in the tiles of each
    boolean tile map (None: all tiles), from ``n_samples`` draws."""
    generator = torch.Generator().manual_seed(0)
    counts = draw(encoder, state, n_samples, generator=generator,
                  chunk_tiles=chunk_tiles).counts
    pmfs = []
    for tiles in tile_maps:
        selected = counts if tiles is None else counts[:, torch.from_numpy(tiles)]
        totals = selected.reshape(n_samples, -1).sum(dim=1).numpy()
        pmfs.append(np.bincount(totals, minlength=int(totals.max()) + 1) / len(totals))
    return pmfs


def _modal_rows(grid, posterior, mode, origin, shape):
    """Catalog rows (numpy arrays) of the modal catalog ``mode`` of the tiles of
    ``posterior``, a block of the tile grid starting at tile ``origin`` (row, col)
    of an image of ``shape``: the stars inside the image, with ``key``, their rank
    in the one-shot catalog's order (by tile, then slot)."""
    locs, fluxes, mask = grid.from_tiles(mode, origin)
    loc_mean, loc_sd, _, flux_sd = (
        p.reshape(1, -1, p.shape[-1]) for p in posterior.row_parameters(mode.counts))
    # detection probability of the k-th brightest star of a tile: q(count >= k)
    at_least = torch.flip(torch.cumsum(torch.flip(posterior.count_probs, [-1]), -1), [-1])
    slot = torch.arange(grid.max_sources)
    brightness = mode.fluxes[..., 0].masked_fill(slot >= mode.counts[..., None], -1.0)
    rank = torch.argsort(torch.argsort(-brightness, dim=-1), dim=-1)
    detection = at_least[..., 1:].gather(-1, rank).reshape(1, -1)
    keep = mask[0] & inside_image(locs[0], shape)
    tile_rows, tile_cols = mode.counts.shape[-2:]
    grid_cols = grid.grid_shape(tuple(shape))[1]
    tile = ((torch.arange(origin[0], origin[0] + tile_rows)[:, None] * grid_cols
             + torch.arange(origin[1], origin[1] + tile_cols)[None, :]))
    key = (tile[..., None] * grid.max_sources + slot).reshape(-1)[keep]
    if keep.any():
        sd = _sigmoid_sd(loc_mean[0][keep].double().numpy(),
                         loc_sd[0][keep].double().numpy()) * grid.tile_size
    else:
        sd = np.zeros((0, 2))
    return {"key": key.numpy(), "locs": locs[0][keep].double().numpy(),
            "fluxes": fluxes[0][keep].double().numpy(), "sd": sd,
            "flux_sd": flux_sd[0][keep].double().numpy(),
            "detection": detection[0, keep].double().numpy()}


def _sigmoid_sd(mean, sd):
    """Standard deviation of sigmoid(z), z ~ Normal(mean, sd^2), by Gauss-Hermite quadrature."""
    nodes, weights = _GAUSS_HERMITE
    weights = weights / weights.sum()
    values = 1 / (1 + np.exp(-(mean[..., None] + sd[..., None] * nodes)))
    first = (values * weights).sum(-1)
    second = (values**2 * weights).sum(-1)
    return np.sqrt(np.clip(second - first**2, 0, None))
