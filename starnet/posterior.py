"""The tiled variational posterior q(catalog | image).

Tiles are independent. In each tile the number of stars ``n`` follows a categorical
distribution on ``0 .. max_sources``. Given ``n``, the tile's stars are the ``n`` rows
of a triangular array of sources (row ``n`` has its own ``n`` sets of parameters):
source ``k`` has a position within the tile ``u = sigmoid(z)`` with
``z ~ Normal(loc_mean, loc_sd^2)`` per axis (logit-normal), and a flux per band
``f = exp(w)`` with ``w ~ Normal(log_flux_mean, log_flux_sd^2)`` (log-normal). A tile's
stars form an unordered set, so its density sums over the ``n!`` orderings of the
sources (paper appendix A); `TiledPosterior.log_prob` does this exactly with a
log-sum-exp.

With a density spread (an encoder built with ``density_cells``), the tiles of each
square cell of ``density_cells`` tiles also share an unknown log-density offset
``delta ~ Normal(-s**2 / 2, s**2)``, ``s`` the mean of the tiles' ``spread`` over the
cell, independent between cells: given ``delta``, a tile's count probabilities are
tilted by ``exp(delta n)`` (the exact effect of a density ``exp(delta)`` times higher
under a Poisson prior) and the tiles are independent. (The mean ``-s**2 / 2`` keeps the
mean density, ``E exp(delta) = 1``.) Positions and fluxes given the counts are
unchanged. This is the uncertainty of the density that a cell's tiles read from the
same light, which independent tiles leave out (`density_mixture`).

With pair correlations (an encoder built with ``pair_correlations``), each tile also
gives a weight in ``[0, 1]`` to each of its four sides, at most 1 in all: a star near
the boundary of two tiles is claimed in part by both, so that their counts err in
opposite directions, and two side neighbours' counts correlate by ``rho = -min(w, w')``,
their weights on their shared side (`side_correlations`). The count pmf of a region
(`count_pmf`) is then the pmf of independent tiles (or cells) contracted about its mean
(`contract_counts`) to the variance ``V + 2 sum rho_ij sqrt(v_i v_j)`` over the side
pairs inside the region (`pair_covariance`; weights that sum to at most 1 keep it
positive). Each tile's distribution, and the catalogs `sample` draws (independent
tiles), are unchanged.

A tile holds at most ``max_sources`` stars in q, as in the tiles that training scores
(the stars beyond are dropped from them), so q's top count stands for "``max_sources``
or more". With a count tail (an encoder built with ``count_tail``, which needs density
cells), the count pmfs (`TiledPosterior.count_parts`, `TiledPosterior.count_pmf`) give
that mass a Poisson tail at the density of the tile's cell (`poisson_tail`): the stars
that crowded tiles hold beyond ``max_sources``, which q cannot place but the count
should include. The catalogs q draws are unchanged.
"""

import functools
import itertools
import math

import numpy as np
import scipy.fft
import torch
from scipy.stats import poisson
from torch.nn import functional as F

from .tiles import TileCatalog

__all__ = ["TiledPosterior", "count_distribution", "density_mixture", "side_correlations",
           "pair_covariance", "contract_counts", "poisson_tail"]

_EPS = 1e-6


def triangle_slots(max_sources):
    """Slot indices of row ``n`` (``n = 1 .. max_sources``) of the triangular array.

    Parameters
    ----------
    max_sources : int
        Largest number of stars per tile.

    Returns
    -------
    list of list of int
        Item ``n - 1`` holds the ``n`` slot indices of row ``n``, in
        ``0 .. max_sources (max_sources + 1) / 2 - 1``.
    """
    return [list(range(n * (n - 1) // 2, n * (n + 1) // 2)) for n in range(1, max_sources + 1)]


class TiledPosterior:
    """The variational distribution of the catalogs of a batch of images.

    Parameters
    ----------
    count_logits : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, max_sources + 1)
        Unnormalised log probabilities of ``0 .. max_sources`` stars per tile.
    loc_mean, loc_sd : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, n_slots, 2)
        Normal parameters of the logit of the within-tile position ``(u_x, u_y)``;
        ``n_slots = max_sources (max_sources + 1) / 2`` is the size of the triangular array.
    log_flux_mean, log_flux_sd : `torch.Tensor`, shape (..., n_slots, n_bands)
        Normal parameters of the natural log of the flux (electrons) in each band.
    spread : `torch.Tensor`, shape (n_images, tile_rows, tile_cols), optional
        Each tile's share of the standard deviation of its cell's log-density offset
        (see the module docstring); default: none (independent tiles).
    density_cells : int, optional
        Side in tiles of the cells that share an offset, from the top left tile; required
        with ``spread``.
    pair_weights : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, 4), optional
        Each tile's weights on its right, lower, left and upper sides, summing to at most
        1 (see the module docstring and `side_correlations`); default: none.
    count_tail : bool, optional
        Give the count pmfs a Poisson tail beyond ``max_sources`` at the density of each
        tile's cell (see the module docstring and `poisson_tail`); needs ``density_cells``.
    """

    def __init__(self, count_logits, loc_mean, loc_sd, log_flux_mean, log_flux_sd,
                 spread=None, density_cells=None, pair_weights=None, count_tail=False):
        if (spread is None) != (density_cells is None):
            raise ValueError("spread and density_cells go together: give both or neither")
        if count_tail and density_cells is None:
            raise ValueError("count_tail needs density cells (the density of a tile's "
                             "cell sets its tail), and this posterior has none: give "
                             "spread and density_cells too (an encoder with count_tail "
                             "needs density_cells)")
        self.count_logits = count_logits
        self.loc_mean = loc_mean
        self.loc_sd = loc_sd
        self.log_flux_mean = log_flux_mean
        self.log_flux_sd = log_flux_sd
        self.spread = spread
        self.density_cells = density_cells
        self.pair_weights = pair_weights
        self.count_tail = bool(count_tail)
        self.max_sources = count_logits.shape[-1] - 1
        self._slots = triangle_slots(self.max_sources)

    _FIELDS = ("count_logits", "loc_mean", "loc_sd", "log_flux_mean", "log_flux_sd", "spread",
               "pair_weights")

    def _rebuild(self, function, others=()):
        """A posterior whose tensors are ``function(tensor of self, *tensors of others)``
        field by field (a missing ``spread`` or ``pair_weights`` stays missing)."""
        for other in others:
            if (other.spread is None) != (self.spread is None) \
                    or other.density_cells != self.density_cells \
                    or (other.pair_weights is None) != (self.pair_weights is None) \
                    or other.count_tail != self.count_tail:
                raise ValueError("posteriors with and without a density spread (or with "
                                 "other density cells, with and without pair "
                                 "correlations or a count tail) cannot be combined")
        return TiledPosterior(**{
            name: None if getattr(self, name) is None
            else function(getattr(self, name), *[getattr(q, name) for q in others])
            for name in self._FIELDS}, density_cells=self.density_cells,
            count_tail=self.count_tail)

    def where(self, mask, other):
        """Tiles of ``self`` where ``mask`` is true and of ``other`` elsewhere.

        Parameters
        ----------
        mask : `torch.Tensor` of bool, shape (n_images, tile_rows, tile_cols)
            Tiles taken from ``self``.
        other : `TiledPosterior`
            Posterior of the same shape, for the other tiles.

        Returns
        -------
        `TiledPosterior`
        """
        return self._rebuild(lambda mine, theirs: torch.where(
            mask.reshape(*mask.shape, *[1] * (mine.ndim - 3)), mine, theirs), [other])

    @staticmethod
    def concatenate(posteriors, dim):
        """The tiles of several posteriors side by side along ``dim`` (1: tile rows,
        2: tile columns).

        With a density spread, each posterior must start on a cell boundary (blocks of
        whole cells, as `~starnet.encoder.StarNetEncoder.blocks` makes them).

        Parameters
        ----------
        posteriors : sequence of `TiledPosterior`
            Posteriors whose shapes agree except along ``dim``.
        dim : int
            Axis of the tile grid to join along (1 or 2).

        Returns
        -------
        `TiledPosterior`
        """
        first, rest = posteriors[0], posteriors[1:]
        return first._rebuild(lambda *tensors: torch.cat(tensors, dim=dim), rest)

    def to(self, device):
        """The same posterior with its parameters on ``device``.

        Parameters
        ----------
        device : str or `torch.device`

        Returns
        -------
        `TiledPosterior`
        """
        return self._rebuild(lambda tensor: tensor.to(device))

    def expand(self, n_images):
        """The posterior of a single image repeated ``n_images`` times (no copy).

        Parameters
        ----------
        n_images : int
            Size of the image axis of the result.

        Returns
        -------
        `TiledPosterior`
            Parameters are views of ``self``'s, expanded along the first axis.
        """
        return self._rebuild(lambda tensor: tensor.expand(n_images, *tensor.shape[1:]))

    def image(self, index):
        """The posterior of image ``index`` of the batch (a batch of one).

        Parameters
        ----------
        index : int

        Returns
        -------
        `TiledPosterior`
        """
        index = range(len(self.count_logits))[index]     # negative indices, and checked
        return self._rebuild(lambda tensor: tensor[index:index + 1])

    def cell_spread(self):
        """Standard deviation of each cell's log-density offset: the mean of ``spread``
        over the cell's tiles (cells at the bottom and right edges may be partial).

        Returns
        -------
        `torch.Tensor`, shape (n_images, ceil(tile_rows / density_cells), ceil(tile_cols /
        density_cells)), or None without a density spread.
        """
        if self.spread is None:
            return None
        return cell_means(self.spread[:, None], self.density_cells)[:, 0]

    def count_parts(self, tiles=None):
        """Count pmfs of independent parts whose sum is the number of stars in ``tiles``:
        one for all tiles, or one per density cell (each mixed over its cell's offset,
        `density_mixture`).

        Parameters
        ----------
        tiles : array of bool, shape (tile_rows, tile_cols), optional
            The tiles counted (default: all); the posterior of one image.

        Returns
        -------
        list of ``(offset, values)``
            Each part's pmf as from `support`; their convolution (`convolve_counts`) is
            the pmf of the total (with a count tail, of stars beyond ``max_sources`` per
            tile too).
        """
        probs = self.tile_count_pmfs
        selected = (np.ones(probs.shape[:2], dtype=bool) if tiles is None
                    else np.asarray(tiles, dtype=bool))
        if self.spread is None:
            return [support(count_distribution(probs[selected]))]
        cell = self.density_cells
        spreads = self.cell_spread()[0].double().cpu().numpy()
        groups, group_spreads = [], []
        for i, row in enumerate(range(0, probs.shape[0], cell)):
            for j, col in enumerate(range(0, probs.shape[1], cell)):
                inside = selected[row:row + cell, col:col + cell]
                if inside.any():
                    groups.append(probs[row:row + cell, col:col + cell][inside])
                    group_spreads.append(spreads[i, j])
        if not groups:
            return [(0, np.ones(1))]
        return _cell_mixtures(groups, np.array(group_spreads))

    def count_pmf(self, tiles=None):
        """pmf of the number of stars in ``tiles`` of the (first) image: the convolution of
        `count_parts`, contracted by the pair correlations where there are some
        (`contract_counts`).

        Parameters
        ----------
        tiles : array of bool, shape (tile_rows, tile_cols), optional
            The tiles counted (default: all).

        Returns
        -------
        `numpy.ndarray`, shape (n_tiles max_sources + 1,)
            ``pmf[k]`` = q(N = k) for the ``n_tiles`` tiles counted (with a count tail,
            longer where the tail has mass beyond ``n_tiles max_sources``).
        """
        n_tiles = (self.count_logits[0, ..., 0].numel() if tiles is None
                   else int(np.count_nonzero(tiles)))
        offset, pmf = convolve_counts(self.count_parts(tiles))
        if self.pair_weights is not None:
            covariance = pair_covariance(
                self.count_variance[0].double().cpu().numpy(),
                side_correlations(self.pair_weights)[0].double().cpu().numpy(), tiles)
            offset, pmf = contract_counts(offset, pmf, 2 * covariance)
        return _full_pmf(offset, pmf, max(n_tiles * self.max_sources + 1, offset + len(pmf)))

    @functools.cached_property
    def tile_count_pmfs(self):
        """Count pmf of each tile of the first image, `numpy.ndarray` of shape (tile_rows,
        tile_cols, width): ``count_probs``, or with a count tail, 0 to ``max_sources - 1``
        stars as in ``count_probs`` and ``max_sources`` or more from its top count by
        `poisson_tail` at the Poisson mean whose count cut at ``max_sources`` has the
        mean of the tile's density cell (at most ``TAIL_RATE_LIMIT`` times
        ``max_sources``; each cell's tail cut at its own width, zeros beyond)."""
        probs = self.count_probs[0].double().cpu().numpy()
        if not self.count_tail:
            return probs
        cell_mean = cell_means(torch.from_numpy(probs @ np.arange(probs.shape[-1]))[None, None],
                               self.density_cells)[0, 0].numpy()
        cell = np.repeat(np.repeat(np.arange(cell_mean.size).reshape(cell_mean.shape),
                                   self.density_cells, axis=0),
                         self.density_cells, axis=1)[:probs.shape[0], :probs.shape[1]]
        largest = np.zeros(cell_mean.size)    # each cell's tail cut where its tiles allow
        np.maximum.at(largest, cell.reshape(-1), probs[..., -1].reshape(-1))
        rate = _poisson_rate(cell_mean.reshape(-1), self.max_sources,
                             largest=TAIL_RATE_LIMIT * self.max_sources)
        tails = _tail_table(rate, self.max_sources, largest[:, None], 1e-13)[cell]
        return np.concatenate([probs[..., :-1], probs[..., -1:] * tails], axis=-1)

    @functools.cached_property
    def count_probs(self):
        """Probabilities of 0 to ``max_sources`` stars in each tile, shape
        (n_images, tile_rows, tile_cols, max_sources + 1)."""
        return torch.softmax(self.count_logits, dim=-1)

    @property
    def count_variance(self):
        """Variance of each tile's count, shape (n_images, tile_rows, tile_cols)."""
        probs = self.count_probs
        n = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        return (probs @ (n * n) - (probs @ n) ** 2).clamp(min=0)

    def log_prob(self, tiles: TileCatalog):
        """Log density of the tile variables under q, shape (n_images, tile_rows, tile_cols).

        With a density spread, this is each tile's density given no density offset (the
        tiles' own distributions, which the forward KL fits).

        The density is with respect to the count, the within-tile positions and the
        fluxes in electrons (the Jacobians of the logit and log transforms included).

        Parameters
        ----------
        tiles : `~starnet.tiles.TileCatalog`
            Tile variables with the same tile grid and ``max_sources`` as ``self``.

        Returns
        -------
        `torch.Tensor`, shape (n_images, tile_rows, tile_cols)
            Log density of each tile, in the dtype of the parameters.
        """
        log_count = torch.log_softmax(self.count_logits, dim=-1)
        result = log_count.gather(-1, tiles.counts[..., None])[..., 0]
        counts = tiles.counts.reshape(-1)
        flat = result.reshape(-1)
        for n in range(1, self.max_sources + 1):
            # row n is evaluated on the tiles that hold n stars only
            which = torch.nonzero(counts == n).flatten()
            if len(which):
                flat = flat.index_add(0, which,
                                      self._row_log_prob(n, tiles, which).to(flat.dtype))
        return flat.reshape(result.shape)

    def _row_log_prob(self, n, tiles, which):
        """Log density of the ``n`` stars of the tiles ``which`` (indices into the
        flattened tiles) under row ``n``, summed over the ``n!`` orders of the stars."""
        def take(x):
            return x.reshape(-1, *x.shape[-2:])[which]

        u = take(tiles.locs)[:, :n].clamp(_EPS, 1 - _EPS)
        w = torch.log(take(tiles.fluxes)[:, :n])
        z = torch.log(u) - torch.log1p(-u)
        slots = torch.tensor(self._slots[n - 1], device=which.device)
        loc_mean, loc_sd, flux_mean, flux_sd = (
            take(p)[:, slots] for p in (self.loc_mean, self.loc_sd, self.log_flux_mean,
                                        self.log_flux_sd))
        # pair[:, a, k]: log density of true source a under slot k of row n
        pair = (_normal_log_prob(z[:, :, None], loc_mean[:, None], loc_sd[:, None]).sum(-1)
                + _normal_log_prob(w[:, :, None], flux_mean[:, None], flux_sd[:, None]).sum(-1))
        jacobian = (torch.log(u) + torch.log1p(-u)).sum((-1, -2)) + w.sum((-1, -2))
        if n == 1:
            return pair[:, 0, 0] - jacobian
        perms = torch.tensor(list(itertools.permutations(range(n))), device=pair.device)
        matched = pair[:, perms, torch.arange(n, device=pair.device)].sum(-1)
        return torch.logsumexp(matched, dim=-1) - jacobian

    def _rows(self, counts, *params):
        """Each of ``params`` (..., n_slots, dim) taken at the slots of row ``counts`` of
        the triangular array: (..., max_sources, dim), valid in the first ``counts``
        slots (the others repeat slot 0)."""
        table = torch.tensor([[0] * self.max_sources] + [
            list(self._slots[n - 1]) + [0] * (self.max_sources - n)
            for n in range(1, self.max_sources + 1)], device=counts.device)
        index = table[counts][..., None]
        return tuple(p.gather(-2, index.expand(*index.shape[:-1], p.shape[-1]))
                     for p in params)

    def _counts_to_catalog(self, counts, z, w):
        """Tile variables with ``counts`` from row values ``z``, ``w`` of every row."""
        z, w = self._rows(counts, z, w)
        used = (torch.arange(self.max_sources, device=counts.device)
                < counts[..., None])[..., None]
        locs = torch.where(used, torch.sigmoid(z), 0.5)
        fluxes = torch.where(used, torch.exp(w), 1.0)
        return TileCatalog(counts=counts, locs=locs, fluxes=fluxes, n_dropped=0)

    def mode(self):
        """Most probable count per tile, with the transformed modes of the normals.

        Positions are ``sigmoid(loc_mean)`` and fluxes ``exp(log_flux_mean)``; with a
        density spread, the counts are those given no density offset (its mode).

        Returns
        -------
        `~starnet.tiles.TileCatalog`
            The modal tile variables; unused slots are padded (positions 0.5, fluxes 1)
            and ``n_dropped`` is 0.
        """
        counts = self.count_logits.argmax(dim=-1)
        return self._counts_to_catalog(counts, self.loc_mean, self.log_flux_mean)

    def sample(self, *, generator=None):
        """Draw one catalog per image from q, as tile variables.

        Parameters
        ----------
        generator : `torch.Generator`, optional
            Source of the random numbers.

        Returns
        -------
        `~starnet.tiles.TileCatalog`
            Counts, positions within tiles and fluxes (electrons) of the draw; unused
            slots are padded (positions 0.5, fluxes 1) and ``n_dropped`` is 0.
        """
        probs = self.count_probs
        if self.spread is not None:     # each cell's density offset, then the tiles given it
            spread = self.cell_spread()
            offset = spread * torch.randn(spread.shape, generator=generator,
                                          dtype=spread.dtype).to(spread.device) - spread ** 2 / 2
            cell = self.density_cells
            offset = offset.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
            offset = offset[:, :probs.shape[1], :probs.shape[2], None]
            n = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
            probs = torch.softmax(self.count_logits + offset * n, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        counts = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        z = self.loc_mean + self.loc_sd * torch.randn(self.loc_mean.shape, generator=generator)
        w = self.log_flux_mean + self.log_flux_sd * torch.randn(self.log_flux_mean.shape,
                                                                generator=generator)
        return self._counts_to_catalog(counts, z, w)

    def rsample(self, counts, *, generator=None):
        """Draw positions and fluxes given the tile ``counts`` by reparameterisation.

        The draw is a differentiable function of the parameters (positions
        ``sigmoid(loc_mean + loc_sd * e)``, fluxes ``exp(log_flux_mean + log_flux_sd * e)``
        with standard normal ``e``), as the reparameterised gradient of an expectation
        under ``q`` needs (see `starnet.elbo`).

        Parameters
        ----------
        counts : `torch.Tensor` of int64, shape (n_images, tile_rows, tile_cols)
        generator : `torch.Generator`, optional

        Returns
        -------
        `~starnet.tiles.TileCatalog`
            Tile variables with these ``counts``; unused slots are padded (positions 0.5,
            fluxes 1) and ``n_dropped`` is 0.
        """
        z = self.loc_mean + self.loc_sd * torch.randn(self.loc_mean.shape, generator=generator,
                                                      dtype=self.loc_mean.dtype)
        w = self.log_flux_mean + self.log_flux_sd * torch.randn(
            self.log_flux_mean.shape, generator=generator, dtype=self.log_flux_mean.dtype)
        return self._counts_to_catalog(counts, z, w)

    def row_parameters(self, counts):
        """Parameters of each tile's sources when the tile has ``counts`` stars.

        Returns ``loc_mean, loc_sd, log_flux_mean, log_flux_sd`` each of shape
        (..., max_sources, dim), valid in the first ``counts`` slots.

        Parameters
        ----------
        counts : `torch.Tensor` of int64, shape (n_images, tile_rows, tile_cols)
            Number of stars of each tile, ``0 .. max_sources``.

        Returns
        -------
        loc_mean, loc_sd : `torch.Tensor`, shape (..., max_sources, 2)
            Normal parameters of the logit of the within-tile positions.
        log_flux_mean, log_flux_sd : `torch.Tensor`, shape (..., max_sources, n_bands)
            Normal parameters of the log fluxes (electrons).
        """
        return self._rows(counts, self.loc_mean, self.loc_sd, self.log_flux_mean,
                          self.log_flux_sd)


def _normal_log_prob(x, mean, sd):
    return -0.5 * ((x - mean) / sd) ** 2 - torch.log(sd) - 0.5 * math.log(2 * math.pi)


def count_distribution(count_probs):
    """Distribution of the total number of stars over independent tiles.

    Parameters
    ----------
    count_probs : array, shape (n_tiles, max_sources + 1)
        Probabilities of ``0 .. max_sources`` stars in each tile.

    Returns
    -------
    pmf : `numpy.ndarray`, shape (n_tiles * max_sources + 1,)
        ``pmf[k]`` is the probability of ``k`` stars in all: the convolution of the
        tiles' distributions, computed by convolving them in pairs, level by level
        (directly while they are short, then by FFT). After each level, probabilities
        below ``1e-13`` of their distribution's largest (the level of the FFT's
        rounding noise) are dropped from its ends, so that the work follows the width
        of the distributions rather than their support.

    Examples
    --------
    >>> import numpy as np
    >>> from starnet.posterior import count_distribution
    >>> pmf = count_distribution(np.array([[0.5, 0.5], [0.5, 0.5]]))
    >>> print(np.round(pmf, 3))
    [0.25 0.5  0.25]
    """
    pmfs = np.asarray(count_probs, dtype=float).reshape(-1, np.shape(count_probs)[-1])
    length = pmfs.shape[0] * (pmfs.shape[1] - 1) + 1
    if len(pmfs) == 0:   # no tiles: certainly no stars
        return np.ones(1)
    offset, pmf = _convolve_all(pmfs, np.zeros(len(pmfs), dtype=np.int64))
    return _full_pmf(offset, pmf, length)


def side_correlations(pair_weights):
    """Correlations of the counts of side-neighbouring tiles from the tiles' side weights.

    Two neighbours' counts correlate by minus the smaller of their weights on their
    shared side. A tile's weights sum to at most 1, so the correlations of each tile
    sum to at least -1 and every region's count variance stays positive (the
    correlation matrix of the tiles' counts is diagonally dominant).

    Parameters
    ----------
    pair_weights : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, 4)
        Weights on the right, lower, left and upper sides.

    Returns
    -------
    `torch.Tensor`, shape (n_images, tile_rows, tile_cols, 2)
        Each tile's correlation with its right and lower neighbour (0 at the last
        column and row).

    Examples
    --------
    >>> import torch
    >>> from starnet.posterior import side_correlations
    >>> weights = torch.zeros(1, 1, 2, 4)
    >>> weights[0, 0, 0, 0], weights[0, 0, 1, 2] = 0.9, 0.6   # a star on their boundary
    >>> side_correlations(weights)[0, 0, :, 0].tolist()
    [-0.6000000238418579, 0.0]
    """
    rho = pair_weights.new_zeros(*pair_weights.shape[:3], 2)
    rho[:, :, :-1, 0] = -torch.minimum(pair_weights[:, :, :-1, 0], pair_weights[:, :, 1:, 2])
    rho[:, :-1, :, 1] = -torch.minimum(pair_weights[:, :-1, :, 1], pair_weights[:, 1:, :, 3])
    return rho


def pair_covariance(variance, pair_correlation, tiles=None):
    """Sum of the covariances of the counts of the side-neighbouring tiles of a region.

    Parameters
    ----------
    variance : array, shape (tile_rows, tile_cols)
        Each tile's count variance.
    pair_correlation : array, shape (tile_rows, tile_cols, 2)
        Correlation of each tile's count with its right and lower neighbour's
        (`side_correlations`; those of the last column and row are not used).
    tiles : array of bool, shape (tile_rows, tile_cols), optional
        The tiles of the region (default: all); a pair counts where both are in it.

    Returns
    -------
    float
        ``sum rho_ij sqrt(v_i v_j)`` over the pairs: the region's count variance is that
        of independent tiles plus twice this.

    Examples
    --------
    Two tiles side by side, each holding a star at even odds, correlated by -1/4:

    >>> import numpy as np
    >>> from starnet.posterior import pair_covariance
    >>> rho = np.zeros((1, 2, 2))
    >>> rho[0, 0, 0] = -0.25
    >>> float(pair_covariance(np.full((1, 2), 0.25), rho))
    -0.0625
    """
    variance = np.asarray(variance, dtype=float)
    rho = np.asarray(pair_correlation, dtype=float)
    sd = np.sqrt(np.clip(variance, 0.0, None))
    if tiles is not None:
        sd = np.where(np.asarray(tiles, dtype=bool), sd, 0.0)   # a pair outside counts 0
    return float((rho[:, :-1, 0] * sd[:, :-1] * sd[:, 1:]).sum()
                 + (rho[:-1, :, 1] * sd[:-1, :] * sd[1:, :]).sum())


def contract_counts(offset, pmf, change):
    """A count pmf contracted about its mean until its variance has changed by ``change``.

    Each count ``k`` moves to ``m + s (k - m)`` (``m`` the mean) and its probability is
    split between the two integers around it in the proportions that keep the mean, with
    ``s`` in ``[0, 1]`` found by bisection so that the variance is ``V + change`` (the
    splitting adds a little variance of its own, included). The shape of the pmf (its
    skewness near zero counts) is kept; where ``V + change`` is below the least variance
    a pmf of that mean can have, the result is that least-variance pmf.

    Parameters
    ----------
    offset : int
        The count of ``pmf[0]``.
    pmf : array, shape (n,)
        Probabilities of ``offset .. offset + n - 1``.
    change : float
        Change of the variance, at most 0 (as the pair covariances make it).

    Returns
    -------
    offset : int
    pmf : `numpy.ndarray`

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.stats import poisson
    >>> from starnet.posterior import contract_counts
    >>> k = np.arange(60)
    >>> offset, pmf = contract_counts(0, poisson.pmf(k, 20.0), -10.0)
    >>> k = offset + np.arange(len(pmf))
    >>> print(f"{pmf @ k:.3f} {pmf @ k**2 - (pmf @ k)**2:.3f}")
    20.000 10.000
    """
    pmf = np.asarray(pmf, dtype=float)
    if not (np.isfinite(change) and change <= 0):
        raise ValueError(f"change must be a finite number <= 0, got {change!r}")
    if change == 0 or len(pmf) < 2:
        return int(offset), pmf.copy()
    k = np.arange(len(pmf), dtype=float)
    mean = pmf @ k
    target = max(pmf @ (k * k) - mean ** 2 + change, 0.0)

    def moved(s):
        y = mean + s * (k - mean)
        low = np.floor(y)
        frac = y - low
        return low, frac, s * s * (pmf @ ((k - mean) ** 2)) + pmf @ (frac * (1 - frac))

    lo, hi = 0.0, 1.0
    if moved(0.0)[2] < target:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if moved(mid)[2] < target else (lo, mid)
    low, frac, _ = moved(lo)
    first = int(low.min())
    out = np.zeros(int(low.max()) - first + 2)
    np.add.at(out, low.astype(np.int64) - first, pmf * (1 - frac))
    np.add.at(out, low.astype(np.int64) - first + 1, pmf * frac)
    end = len(out) - 1 if out[-1] == 0 else len(out)
    return int(offset) + first, out[:end]


def density_mixture(pmf, spread, *, nodes=21):
    """A count pmf mixed over an unknown log-density offset shared by its tiles.

    Under a Poisson prior, multiplying the density of stars by ``exp(delta)`` multiplies
    the posterior probability of ``n`` stars in a tile by ``exp(delta n)`` (then
    normalised), and so that of ``N`` stars in a group of independent tiles by ``exp(delta
    N)``. With ``delta ~ Normal(-spread**2 / 2, spread**2)`` shared by the tiles (a
    density read too high or too low over a region by all of its tiles, by a factor
    ``exp(delta)`` of mean 1), the pmf of their total is the mixture over ``delta`` of
    ``pmf`` so tilted, computed here by Gauss-Hermite quadrature. Its mean is about that
    of ``pmf`` (exactly for a Poisson pmf) and its variance about ``V + (spread V)**2``
    for a pmf of variance ``V``. A tilt only reweights the counts ``pmf`` holds: where
    ``spread sqrt(V)`` exceeds about 2, the tilted mass lies in tails that a trimmed pmf
    (`count_distribution`'s) has dropped, and `TiledPosterior.count_parts` tilts the
    tiles instead.

    Parameters
    ----------
    pmf : array, shape (n,)
        Probabilities of ``0 .. n - 1`` stars (such as `count_distribution`'s).
    spread : float
        Standard deviation of the shared log-density offset; 0 returns ``pmf``.
    nodes : int, optional
        Quadrature nodes.

    Returns
    -------
    `numpy.ndarray`, shape (n,)
        The mixed pmf.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.stats import poisson
    >>> from starnet.posterior import density_mixture
    >>> pmf = poisson.pmf(np.arange(400), 100.0)
    >>> mixed = density_mixture(pmf, 0.1)
    >>> k = np.arange(400)
    >>> variance = np.dot(k ** 2, mixed) - np.dot(k, mixed) ** 2
    >>> print(f"{variance:.1f}")   # Poisson-lognormal: 100 + 100^2 (e^0.01 - 1)
    200.5
    """
    pmf = np.asarray(pmf, dtype=float)
    if spread < 0 or not np.isfinite(spread):
        raise ValueError(f"spread must be a finite standard deviation >= 0, got {spread}")
    if spread == 0:
        return pmf.copy()
    return _density_mixtures(pmf[None], np.array([float(spread)]), nodes)[0]


#: Beyond this spread times the standard deviation of a cell's count, a tilt moves the
#: pmf into the tails that `count_distribution` drops, and the tiles are tilted instead.
_TILT_TILES_BEYOND = 2.0


def _cell_mixtures(groups, spreads, *, nodes=21):
    """``(offset, values)`` of the count pmf of each group of tiles (``groups[c]``: their
    probabilities, (n_tiles, max_sources + 1)) mixed over its cell's offset of spread
    ``spreads[c]``: `density_mixture` of their distribution (all groups at once), or,
    where the spread is wide against it, the mixture of the distributions of the tiles
    each tilted by the offset (the same mixture, without the pmf's trimmed tails, on more
    nodes)."""
    stacked = np.zeros((len(groups), max(len(g) for g in groups), groups[0].shape[1]))
    stacked[:, :, 0] = 1.0          # padded with tiles that certainly hold no star
    for row, group in zip(stacked, groups):
        row[:len(group)] = group
    offsets, pmfs = _convolve_groups(stacked, np.zeros(stacked.shape[:2], dtype=np.int64))
    # each row's rounding noise beyond its own tails (kept for the other rows' sake), which
    # a tilt would amplify, set to zero as `count_distribution` drops a pmf's tails
    pmfs = np.where(pmfs > 1e-13 * pmfs.max(axis=1, keepdims=True), pmfs, 0.0)
    pmfs = pmfs / pmfs.sum(axis=1, keepdims=True)
    k = np.arange(pmfs.shape[1])
    sd = np.sqrt(np.clip(pmfs @ (k * k) - (pmfs @ k) ** 2, 0.0, None))
    mixed = _density_mixtures(pmfs, spreads, nodes)
    parts = []
    for offset, pmf, group, spread, wide in zip(offsets, mixed, groups, spreads,
                                                spreads * sd > _TILT_TILES_BEYOND):
        if wide:
            parts.append(support(_tilted_tiles_mixture(group, spread, nodes)))
        else:
            first, values = support(pmf)
            parts.append((int(offset) + first, values))
    return parts


def _tilted_tiles_mixture(probs, spread, nodes):
    """The count pmf of tiles ``probs`` mixed over an offset of ``spread``, each tile
    tilted before the convolution; nodes enough that the tilted pmfs of neighbouring
    ones overlap (a tilt moves the pmf by about ``spread * sd`` of its widths per unit of
    the node)."""
    pmf = count_distribution(probs)
    k = np.arange(len(pmf))
    sd = np.sqrt(max(np.dot(k * k, pmf) - np.dot(k, pmf) ** 2, 0.0))
    z, weights = np.polynomial.hermite_e.hermegauss(max(nodes, int(np.ceil(6 * spread * sd))))
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)
    n = np.arange(probs.shape[1])
    mixed = np.zeros(len(pmf))
    for offset, weight in zip(spread * z - spread ** 2 / 2, weights / weights.sum()):
        tilted = log_probs + offset * n
        tilted = np.exp(tilted - tilted.max(axis=1, keepdims=True))
        mixed += weight * count_distribution(tilted / tilted.sum(axis=1, keepdims=True))
    return mixed


def _density_mixtures(pmfs, spreads, nodes):
    """`density_mixture` of each row of ``pmfs`` (groups, width) with its spread: a tilt
    by ``exp(delta j)`` of the row's own index ``j`` is the same, once normalised, as one
    of the counts it stands for."""
    z, weights = np.polynomial.hermite_e.hermegauss(nodes)
    with np.errstate(divide="ignore"):
        log_pmfs = np.log(pmfs)
    delta = spreads[:, None] * z - spreads[:, None] ** 2 / 2            # (groups, nodes)
    tilted = log_pmfs[:, None, :] + delta[:, :, None] * np.arange(pmfs.shape[1])
    tilted = np.exp(tilted - tilted.max(axis=2, keepdims=True))
    tilted /= tilted.sum(axis=2, keepdims=True)
    return np.einsum("gnj,n->gj", tilted, weights / weights.sum())


def poisson_tail(probs, rate, *, tail=1e-13):
    """Tile count probabilities whose top count is spread over it and more by a Poisson
    tail: a tile's ``probs[..., -1]``, the probability of ``max_sources`` stars or more,
    is shared among ``max_sources + j`` stars (``j >= 0``) in proportion to a Poisson pmf
    of mean ``rate`` given at least ``max_sources``.

    Parameters
    ----------
    probs : array, shape (..., max_sources + 1)
        Probabilities of ``0 .. max_sources`` stars in each tile (``max_sources >= 1``).
    rate : array
        Poisson mean of the number of stars in each tile (> 0), of a shape that
        broadcasts to ``probs.shape[:-1]`` (the tail is computed once per value).
    tail : float, optional
        Each rate's tail is cut where its tiles' probabilities stay below this, then
        normalised.

    Returns
    -------
    `numpy.ndarray`, shape (..., max_sources + width)
        Probabilities of ``0, 1, ...`` stars; the first ``max_sources`` are ``probs``'s.

    Examples
    --------
    >>> import numpy as np
    >>> from starnet.posterior import poisson_tail
    >>> probs = poisson_tail(np.array([0.5, 0.3, 0.1, 0.1]), np.array(2.0))
    >>> print(f"{probs.sum():.6f}, {probs[:3].sum():.6f}")
    1.000000, 0.900000
    >>> k = np.arange(len(probs))   # E[n | n >= 3] of a Poisson of mean 2
    >>> print(f"{np.dot(k[3:], probs[3:]) / probs[3:].sum():.4f}")
    3.6743
    """
    probs = np.asarray(probs, dtype=float)
    rate = np.asarray(rate, dtype=float)
    try:
        shape = np.broadcast_shapes(rate.shape, probs.shape[:-1])
    except ValueError:
        shape = None
    if probs.ndim == 0 or probs.shape[-1] < 2:
        raise ValueError(f"probs must have at least 2 counts per tile (the last axis), got "
                         f"shape {probs.shape}")
    if shape is None:
        raise ValueError(f"rate must broadcast to the shape of probs without its last axis "
                         f"{probs.shape[:-1]}, got {rate.shape}")
    if not np.all(np.isfinite(rate) & (rate > 0)):
        raise ValueError("rate must be finite and positive (a Poisson mean of stars per "
                         "tile)")
    top = probs.shape[-1] - 1
    weight = np.broadcast_to(probs[..., top], shape)
    tails = _tail_table(rate.reshape(-1), top, weight.reshape(-1, 1) if rate.shape == shape
                        else weight.max(initial=0.0), tail)
    tails = tails.reshape(rate.shape + tails.shape[-1:])
    return np.concatenate([np.broadcast_to(probs[..., :top], shape + (top,)),
                           probs[..., top:] * tails], axis=-1)


def _tail_table(rate, top, weight, tail):
    """Poisson pmfs of means ``rate`` (n,) given at least ``top``, on ``top, top + 1, ...``
    (n, width): each row cut where ``weight`` (broadcast to the rows) times it falls below
    ``tail`` for good, normalised, and padded with zeros to the widest row (so that a
    row does not depend on the others)."""
    rate = np.clip(rate, 1e-12, None)[:, None]
    extra = np.arange(int(np.ceil(rate.max() + 12 * np.sqrt(rate.max()))) + 64)
    table = np.exp(poisson.logpmf(top + extra, rate) - poisson.logsf(top - 1, rate))
    significant = np.broadcast_to(np.asarray(weight) * table > tail, table.shape)
    widths = np.where(significant.any(axis=1),
                      table.shape[1] - significant[:, ::-1].argmax(axis=1), 1)
    table = np.where(extra < widths[:, None], table, 0.0)[:, :widths.max()]
    return table / table.sum(axis=1, keepdims=True)


#: A cell's tail rate is at most this many times ``max_sources`` stars per tile: a cell
#: whose tiles all hold ``max_sources`` with near certainty reads no finite rate.
TAIL_RATE_LIMIT = 2.0


def _poisson_rate(truncated_mean, max_sources, *, largest):
    """The Poisson mean whose count, cut at ``max_sources``, has the mean
    ``truncated_mean`` (elementwise, by bisection between 1e-12 and ``largest``, which
    a cut mean at or near ``max_sources`` gives)."""
    target = np.clip(np.asarray(truncated_mean, dtype=float), 0.0, max_sources)
    k = np.arange(max_sources)

    def cut_mean(rate):
        return max_sources - np.sum((max_sources - k) * poisson.pmf(k, rate[..., None]),
                                    axis=-1)

    low, high = np.full(target.shape, 1e-12), np.full(target.shape, float(largest))
    for _ in range(60):
        middle = np.sqrt(low * high)
        below = cut_mean(middle) < target
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return np.sqrt(low * high)


def cell_means(x, cell):
    """Mean of ``x`` over square cells of ``cell`` pixels (or tiles) from the top left.

    Where the side is not a whole number of cells, the last cells are partial and their
    mean is over the values they hold.

    Parameters
    ----------
    x : `torch.Tensor`, shape (n_images, channels, rows, cols)
    cell : int

    Returns
    -------
    `torch.Tensor`, shape (n_images, channels, ceil(rows / cell), ceil(cols / cell))

    Examples
    --------
    >>> import torch
    >>> from starnet.posterior import cell_means
    >>> cell_means(torch.arange(6.0).reshape(1, 1, 1, 6), 4).flatten().tolist()
    [1.5, 4.5]
    """
    rows, cols = x.shape[-2:]
    pad = (0, -cols % cell, 0, -rows % cell)
    mean = F.avg_pool2d(F.pad(x, pad), cell)
    if any(pad):
        mean = mean / F.avg_pool2d(F.pad(x.new_ones((1, 1, rows, cols)), pad), cell)
    return mean


def _full_pmf(offset, pmf, length):
    """The normalised pmf on ``0 .. length - 1`` of ``pmf`` placed at ``offset``."""
    full = np.zeros(length)
    end = min(offset + len(pmf), length)
    full[offset:end] = pmf[:end - offset]
    return full / full.sum()


def _convolve_all(pmfs, offsets):
    """``(offset, pmf)`` of the sum of independent counts with ``pmfs[i, j] = P(offsets[i]
    + j)``, convolved in pairs, level by level (see `count_distribution`)."""
    offsets, pmfs = _convolve_groups(pmfs[None], np.asarray(offsets)[None])
    return int(offsets[0]), pmfs[0]


def _convolve_groups(pmfs, offsets):
    """`_convolve_all` of each group at once: ``pmfs`` (groups, counts, width) and
    ``offsets`` (groups, counts) give ``offsets`` (groups,) and ``pmfs`` (groups,
    width'), the pmf of each group's sum placed at its offset (one width for all)."""
    while pmfs.shape[1] > 1:
        if pmfs.shape[1] % 2:   # pad with a count that is certainly 0
            empty = np.broadcast_to(np.eye(1, pmfs.shape[2]), (len(pmfs), 1, pmfs.shape[2]))
            pmfs = np.concatenate([pmfs, empty], axis=1)
            offsets = np.concatenate([offsets, np.zeros((len(offsets), 1), np.int64)], axis=1)
        groups, half = len(pmfs), pmfs.shape[1] // 2
        pmfs = _convolve_pairs(pmfs[:, 0::2].reshape(groups * half, -1),
                               pmfs[:, 1::2].reshape(groups * half, -1))
        offsets = (offsets[:, 0::2] + offsets[:, 1::2]).reshape(-1)
        if pmfs.shape[1] > 32:      # short ones have no tails worth the trimming
            pmfs, offsets = _trim(pmfs, offsets)
        pmfs, offsets = pmfs.reshape(groups, half, -1), offsets.reshape(groups, half)
    return offsets[:, 0], pmfs[:, 0]


def support(pmf):
    """``(offset, values)``: the part of a pmf between its first and last non-zero
    probabilities (`count_distribution` sets the negligible tails to zero), so that
    ``pmf[offset + j] = values[j]``.

    Parameters
    ----------
    pmf : array, shape (n,)
        Probabilities of ``0 .. n - 1``.

    Returns
    -------
    offset : int
        Index of the first non-zero probability (0 if there is none).
    values : `numpy.ndarray`, shape (n_values,)
        A copy of ``pmf`` from ``offset`` to its last non-zero probability (``[1.0]``
        if there is none).
    """
    pmf = np.asarray(pmf, dtype=float)
    nonzero = np.flatnonzero(pmf)
    if len(nonzero) == 0:
        return 0, np.ones(1)
    return int(nonzero[0]), pmf[nonzero[0]:nonzero[-1] + 1].copy()


def convolve_counts(parts):
    """Distribution of the sum of independent counts, such as the star counts of the
    blocks of an image (each from `count_distribution`).

    Parameters
    ----------
    parts : list of ``(offset, values)``
        Each count's pmf as from `support`: ``P(offset + j) = values[j]``.

    Returns
    -------
    offset, values
        The pmf of the sum in the same form, convolved in pairs as in
        `count_distribution` (and trimmed alike), unnormalised only by rounding; parts of
        similar widths (within a factor 2) first, then their sums.
    """
    if not parts:
        return 0, np.ones(1)
    # parts of similar widths together (each group padded to its widest), then the groups:
    # a few wide parts (crowded density cells) do not widen all the others
    sums = []
    for _, members in itertools.groupby(sorted(parts, key=lambda part: len(part[1])),
                                        key=lambda part: len(part[1]).bit_length()):
        members = list(members)
        pmfs = np.zeros((len(members), len(members[-1][1])))
        for row, (_, values) in zip(pmfs, members):
            row[:len(values)] = values
        sums.append(_convolve_all(pmfs, np.array([o for o, _ in members], dtype=np.int64)))
    offset, pmf = sums[0]
    for other_offset, other in sums[1:]:
        width = max(len(pmf), len(other))
        offset, pmf = _convolve_all(
            np.stack([np.pad(pmf, (0, width - len(pmf))), np.pad(other, (0, width - len(other)))]),
            np.array([offset, other_offset], dtype=np.int64))
    nonzero = np.flatnonzero(pmf)
    if len(nonzero):
        offset, pmf = offset + int(nonzero[0]), pmf[nonzero[0]:nonzero[-1] + 1]
    return offset, pmf


def _convolve_pairs(first, second):
    """Row-wise full convolution of two arrays of distributions of the same width."""
    width = first.shape[1]
    if width <= 16:
        out = np.zeros((len(first), 2 * width - 1))
        for shift in range(width):
            out[:, shift:shift + width] += first[:, shift:shift + 1] * second
        return out
    n_fft = scipy.fft.next_fast_len(2 * width - 1, real=True)
    product = scipy.fft.rfft(first, n_fft, axis=1) * scipy.fft.rfft(second, n_fft, axis=1)
    return np.clip(scipy.fft.irfft(product, n_fft, axis=1)[:, :2 * width - 1], 0, None)


def _trim(pmfs, offsets, tail=1e-13):
    """Drop the columns at both ends where every distribution is below ``tail`` of its
    largest value, each row shifted so that its kept part starts at column 0."""
    significant = pmfs > tail * pmfs.max(axis=1, keepdims=True)
    first = significant.argmax(axis=1)
    last = pmfs.shape[1] - 1 - significant[:, ::-1].argmax(axis=1)
    width = int((last - first).max()) + 1
    if width == pmfs.shape[1]:
        return pmfs, offsets
    columns = first[:, None] + np.arange(width)
    inside = columns < pmfs.shape[1]
    kept = np.where(inside, np.take_along_axis(pmfs, np.minimum(columns, pmfs.shape[1] - 1),
                                               axis=1), 0.0)
    return kept, offsets + first
