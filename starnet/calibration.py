"""Checking a deblender on images simulated from its own generative model.

The star count is checked by the exact posterior mass of its intervals and by the
randomised probability-integral transform (PIT) of the true count; positions and
fluxes by the PIT of the true values under q's own marginals (`source_pit`), with no
matching window that would keep only the well-measured stars.
"""

import itertools

import numpy as np
import torch
from astropy import units as u
from astropy.table import QTable, vstack
from scipy.special import log_softmax
from scipy.stats import norm

from .inference import chunk_tiles, encode, modal, prepare_image
from .matching import match_catalogs, position_columns
from .posterior import triangle_slots
from .prior import _seed_int
from .simulate import StarFieldRenderer, simulate_starfield
from .tiles import TileGrid
from .validation import check_positive_int, check_seed

__all__ = ["evaluate_on_simulations", "count_coverage", "count_interval", "count_pit",
           "source_pit", "pit_coverage", "star_intervals", "dropped_fraction",
           "tile_count_errors"]

_EPS = 1e-6


def evaluate_on_simulations(deblender, *, n_images=20, shape=(100, 100), seed=0, margin=6.0,
                            levels=(0.5, 0.8, 0.9, 0.95), psf=None, background_factor=1.0,
                            pairing="sample"):
    """Detection accuracy and calibration of the count, positions and fluxes on
    simulated images.

    Images are drawn from the deblender's own prior, through its own PSFs or through
    others (``psf``), on its background times ``background_factor`` (the deblender is
    told that background); stars are drawn ``margin`` pixels beyond the edges too, as
    on a real sky, and only stars inside the image count as truth.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    n_images : int, optional
    shape : tuple of int, optional
        ``(rows, cols)`` of the images.
    seed : int, `numpy.random.Generator` or None, optional
        Image ``k`` is simulated with seed ``seed + k`` (the same catalogs for every
        ``background_factor``); a generator or None draws the first seed.
    margin : float, optional
    levels : sequence of float, optional
        Nominal levels of the central intervals of the star count.
    psf : list, optional
        One PSF per band that renders the images (default: the deblender's).
    background_factor : float, optional
        The images' background over the deblender's training background.
    pairing : {'sample', 'mode'}, optional
        How `source_pit` pairs true stars with q's sources.

    Returns
    -------
    results : `~astropy.table.QTable`
        One row per image: ``n_true``, ``n_dropped`` (true stars beyond ``max_sources``
        in their tile), ``n_estimated`` (modal catalog), ``n_stars_mean``, ``tpr``,
        ``ppv``, ``f1`` (one-to-one matching in the first band), ``count_pit`` (the
        randomised PIT of the true count, ``F(n - 1) + V p(n)`` with ``V ~ U(0, 1)``),
        and for each level ``L`` the interval ``n_low_L``, ``n_high_L`` (the ``(1 -
        L) / 2`` and ``(1 + L) / 2`` quantiles), its exact posterior mass ``mass_L``
        and whether it ``covered_L`` the true count. ``meta['source_pit']`` is the
        `source_pit` table of all images (with an ``image`` column) and
        ``meta['source_fraction']`` the fraction of true stars in the tiles it covers
        (those whose modal count equals their true count).
    """
    band = deblender.bands[0]
    if psf is None:
        renderer = deblender._renderer()
    else:
        psfs = list(psf) if isinstance(psf, (list, tuple)) else [psf] * len(deblender.bands)
        renderer = StarFieldRenderer(psfs, stamp_size=deblender.stamp_size)
    first_seed = _seed_int(seed)
    rng = np.random.default_rng(first_seed)
    rows, pits, n_included = [], [], 0
    for k in range(n_images):
        image, truth = simulate_starfield(
            shape, prior=deblender.prior, psf=renderer.psfs, renderer=renderer,
            background=deblender.background * background_factor, seed=first_seed + k,
            margin=margin, stamp_size=deblender.stamp_size)
        inside = ((truth["x"] >= -0.5) & (truth["x"] < shape[1] - 0.5)
                  & (truth["y"] >= -0.5) & (truth["y"] < shape[0] - 0.5))
        truth = truth[inside]
        catalog = deblender(image, background="given")
        match = match_catalogs(catalog, truth, band=band)
        tiles, true_counts = _truth_tiles(deblender, truth, shape)
        inputs = prepare_image(image, bands=deblender.bands, psfs=deblender.psfs,
                               stamp_size=deblender.stamp_size, encoder=deblender.encoder,
                               prior=deblender.prior)
        chunks = chunk_tiles(inputs.shape, chunk_size=deblender.chunk_size,
                             tile_size=deblender.grid.tile_size)
        posterior, _ = modal(deblender.encoder,
                             encode(deblender.encoder, inputs, chunk_tiles=chunks),
                             chunk_tiles=chunks)
        pit = source_pit(posterior, tiles, true_counts=true_counts, pairing=pairing,
                         seed=rng, bands=deblender.bands)
        pit["image"] = np.full(len(pit), k)
        pits.append(pit)
        n_included += len(pit)
        pmf = deblender.count_posterior(image, background="given")
        n_true = len(truth)
        row = {"image": k, "n_true": n_true, "n_dropped": tiles.n_dropped,
               "n_estimated": len(catalog),
               "n_stars_mean": float(np.dot(np.arange(len(pmf)), pmf)),
               "tpr": match.tpr, "ppv": match.ppv, "f1": match.f1,
               "count_pit": count_pit(pmf, n_true, seed=rng)}
        for level in levels:
            low, high, mass = count_interval(pmf, level)
            row[f"n_low_{level:g}"] = low
            row[f"n_high_{level:g}"] = high
            row[f"mass_{level:g}"] = mass
            row[f"covered_{level:g}"] = low <= n_true <= high
        rows.append(row)
    results = QTable(rows=rows, names=list(rows[0]))
    results.meta.update({"levels": list(levels), "background_factor": background_factor,
                         "shape": tuple(shape), "pairing": pairing,
                         "source_pit": vstack(pits) if pits else QTable(),
                         "source_fraction": n_included / max(int(np.sum(results["n_true"])), 1)})
    return results


def _truth_tiles(deblender, truth, shape):
    """Tile variables of a true catalog and the untruncated number of stars per tile."""
    locs = torch.tensor(np.stack([truth["x"], truth["y"]], axis=-1)[None], dtype=torch.float64)
    fluxes = torch.tensor(np.stack([truth[f"flux_{b}"].value for b in deblender.bands],
                                   axis=-1)[None])
    mask = torch.ones(locs.shape[:2], dtype=torch.bool)
    grid = deblender.grid
    tiles = grid.to_tiles(locs, fluxes, mask, tuple(shape))
    tile_rows, tile_cols = grid.grid_shape(tuple(shape))
    index = np.floor((locs[0].numpy() + 0.5) / grid.tile_size).astype(int)
    flat = np.bincount(index[:, 1] * tile_cols + index[:, 0], minlength=tile_rows * tile_cols)
    return tiles, torch.from_numpy(flat.reshape(1, tile_rows, tile_cols))


def count_interval(pmf, level):
    """Central interval of a count pmf and its exact posterior mass.

    The interval is ``[F^-1((1 - level) / 2), F^-1((1 + level) / 2)]`` with ``F^-1(p)``
    the smallest count whose CDF reaches ``p``; being closed and discrete, it holds
    ``mass >= level`` of the pmf.

    Examples
    --------
    >>> from scipy.stats import poisson
    >>> low, high, mass = count_interval(poisson.pmf(range(60), 20.0), 0.9)
    >>> print(low, high, f"{mass:.3f}")
    13 28 0.927
    """
    cdf = np.cumsum(pmf)
    low = int(np.searchsorted(cdf, (1 - level) / 2))
    high = int(min(np.searchsorted(cdf, (1 + level) / 2), len(cdf) - 1))
    return low, high, float(cdf[high] - (cdf[low - 1] if low > 0 else 0.0))


def count_pit(pmf, n, *, seed=None):
    """Randomised probability-integral transform of a count ``n`` under a pmf.

    ``F(n - 1) + V p(n)`` with ``V ~ Uniform(0, 1)``: uniform on (0, 1) when ``n`` is
    drawn from ``pmf``, as the continuous PIT is for a continuous variable.

    Examples
    --------
    >>> print(count_pit([0.2, 0.5, 0.3], 1, seed=0) > 0.2)
    True
    """
    pmf = np.asarray(pmf, dtype=float)
    below = float(pmf[:min(n, len(pmf))].sum())
    at = float(pmf[n]) if 0 <= n < len(pmf) else 0.0
    return below + np.random.default_rng(check_seed(seed)).uniform() * at


def count_coverage(results):
    """Coverage of the star-count intervals in `evaluate_on_simulations` results.

    Returns
    -------
    table : `~astropy.table.QTable`
        Per ``level`` (nominal): ``mass``, the mean exact posterior mass of the
        intervals (what their coverage should be), ``coverage``, the fraction of images
        whose interval holds the true count, and ``coverage_err``, its binomial
        standard error. ``meta['relative_bias']`` is the mean of ``(n_stars_mean -
        n_true) / n_true`` and ``meta['relative_bias_err']`` its standard error;
        ``meta['dropped_fraction']`` the fraction of true stars beyond ``max_sources``
        in their tile (a model fitted to truncated tiles is that much low).
    """
    levels = results.meta["levels"]
    k = len(results)
    table = QTable()
    table["level"] = levels
    table["mass"] = [float(np.mean(results[f"mass_{level:g}"])) for level in levels]
    table["coverage"] = [float(np.mean(results[f"covered_{level:g}"])) for level in levels]
    table["coverage_err"] = np.sqrt(table["coverage"] * (1 - table["coverage"]) / k)
    relative = (results["n_stars_mean"] - results["n_true"]) / np.maximum(results["n_true"], 1)
    table.meta["relative_bias"] = float(np.mean(relative))
    table.meta["relative_bias_err"] = float(np.std(relative, ddof=1) / np.sqrt(k)) if k > 1 \
        else float("nan")
    table.meta["dropped_fraction"] = float(np.sum(results["n_dropped"])
                                           / max(np.sum(results["n_true"]), 1))
    return table


def source_pit(posterior, truth, *, true_counts=None, pairing="sample", seed=None, bands=None):
    """Probability-integral transform of true positions and fluxes under q.

    Only tiles whose modal count equals their true count (``1 .. max_sources``) are
    used. In such a tile with ``n`` stars, q's ``n`` sources (row ``n`` of the
    triangular array) are paired with the true stars by q's own posterior over the
    ``n!`` permutations: each permutation is weighted by q's joint density of all true
    positions and fluxes under it, and one permutation is drawn with these weights
    (``pairing='sample'``: if the truth were a draw from q, the PITs would then be
    exactly uniform) or the most probable one is taken (``'mode'``). Each true value's
    PIT is its CDF under the paired source's exact marginal: logit-normal within the
    tile for ``x`` and ``y`` (the same as the normal CDF of the logit, since the map to
    pixels is increasing) and log-normal for the fluxes.

    Parameters
    ----------
    posterior : `~starnet.posterior.TiledPosterior`
    truth : `~starnet.tiles.TileCatalog`
        The true catalogs as tile variables.
    true_counts : `torch.Tensor` of int, optional
        The true number of stars per tile before truncation to ``max_sources``
        (default: ``truth.counts``), so that overfull tiles are left out.
    pairing : {'sample', 'mode'}, optional
    seed : int or `numpy.random.Generator`, optional
        For ``pairing='sample'``.
    bands : sequence of str, optional
        Band names (default ``'0'``, ``'1'``, ...).

    Returns
    -------
    pits : `~astropy.table.QTable`
        One row per true star of the tiles used: ``image``, ``tile_row``, ``tile_col``,
        ``n`` (stars in the tile), ``pit_x``, ``pit_y``, ``pit_flux_<band>``, the true
        ``flux_<band>`` (electrons) and ``pairing_prob`` (posterior probability of the
        permutation used).

    Examples
    --------
    One tile whose q has one source at the tile centre; the true star is there:

    >>> import math, torch
    >>> from starnet.calibration import source_pit
    >>> from starnet.posterior import TiledPosterior
    >>> from starnet.tiles import TileCatalog
    >>> q = TiledPosterior(torch.tensor([[[[0.0, 5.0, 0.0, 0.0]]]]),
    ...                    torch.zeros(1, 1, 1, 6, 2), torch.ones(1, 1, 1, 6, 2),
    ...                    torch.full((1, 1, 1, 6, 1), 8.0), torch.ones(1, 1, 1, 6, 1))
    >>> truth = TileCatalog(torch.tensor([[[1]]]), torch.full((1, 1, 1, 3, 2), 0.5),
    ...                     torch.full((1, 1, 1, 3, 1), math.exp(8.0)), 0)
    >>> pits = source_pit(q, truth, bands=["r"])
    >>> print(f"{pits['pit_x'][0]:.2f} {pits['pit_flux_r'][0]:.2f}")
    0.50 0.50
    """
    if pairing not in ("sample", "mode"):
        raise ValueError(f"pairing must be 'sample' or 'mode', got {pairing!r}")
    rng = np.random.default_rng(check_seed(seed))
    n_bands = posterior.log_flux_mean.shape[-1]
    bands = [str(b) for b in range(n_bands)] if bands is None else list(bands)
    counts = (truth.counts if true_counts is None else true_counts).numpy()
    modal = posterior.count_logits.argmax(dim=-1).numpy()
    u = truth.locs.double().clamp(_EPS, 1 - _EPS).numpy()
    z = np.log(u) - np.log1p(-u)
    w = np.log(truth.fluxes.double().numpy())
    params = [p.detach().double().numpy() for p in (
        posterior.loc_mean, posterior.loc_sd, posterior.log_flux_mean, posterior.log_flux_sd)]
    parts = []
    for n, slots in enumerate(triangle_slots(posterior.max_sources), start=1):
        where = np.nonzero((modal == n) & (counts == n))
        if len(where[0]) == 0:
            continue
        loc_mean, loc_sd, flux_mean, flux_sd = (p[where][:, slots] for p in params)
        # residual[t, a, k, d]: true star a of tile t standardised by source k
        residual = np.concatenate([
            (z[where][:, :n, None] - loc_mean[:, None]) / loc_sd[:, None],
            (w[where][:, :n, None] - flux_mean[:, None]) / flux_sd[:, None]], axis=-1)
        log_sd = np.log(np.concatenate([loc_sd, flux_sd], axis=-1)).sum(-1)[:, None]
        pair = -0.5 * (residual ** 2).sum(-1) - log_sd
        perms = np.array(list(itertools.permutations(range(n))))
        log_weight = log_softmax(pair[:, np.arange(n), perms].sum(-1), axis=-1)
        if pairing == "mode":
            chosen = log_weight.argmax(axis=1)
        else:
            cumulative = np.cumsum(np.exp(log_weight), axis=1)
            chosen = np.minimum((cumulative < rng.uniform(size=(len(cumulative), 1)) *
                                 cumulative[:, -1:]).sum(axis=1), len(perms) - 1)
        source = perms[chosen]                                   # (tiles, n)
        tile = np.arange(len(source))[:, None]
        pit = norm.cdf(residual[tile, np.arange(n), source])     # (tiles, n, 2 + bands)
        part = {"image": where[0], "tile_row": where[1], "tile_col": where[2],
                "n": np.full(len(source), n)}
        part = {name: np.repeat(value, n) for name, value in part.items()}
        part["pit_x"], part["pit_y"] = pit[..., 0].ravel(), pit[..., 1].ravel()
        for b, band in enumerate(bands):
            part[f"pit_flux_{band}"] = pit[..., 2 + b].ravel()
        for b, band in enumerate(bands):
            part[f"flux_{band}"] = np.exp(w[where][:, :n, b]).ravel()
        part["pairing_prob"] = np.repeat(np.exp(log_weight[tile[:, 0], chosen]), n)
        parts.append(part)
    names = (["image", "tile_row", "tile_col", "n", "pit_x", "pit_y"]
             + [f"pit_flux_{b}" for b in bands] + [f"flux_{b}" for b in bands]
             + ["pairing_prob"])
    if not parts:
        return QTable(names=names, dtype=[int] * 4 + [float] * (len(names) - 4))
    table = QTable({name: np.concatenate([p[name] for p in parts]) for name in names})
    table.sort(["image", "tile_row", "tile_col"])
    return table


def pit_coverage(pits, levels=(0.5, 0.8, 0.9, 0.95)):
    """Coverage of the central intervals implied by PIT values.

    The central ``L`` interval of a marginal holds the truth when ``|PIT - 1/2| <= L /
    2``. Returns a QTable with ``level`` and, for each ``pit_*`` column of ``pits``
    (e.g. from `source_pit`), the fraction of rows covered; ``meta['n']`` is the
    number of rows.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import QTable
    >>> from starnet.calibration import pit_coverage
    >>> pits = QTable({"pit_x": np.linspace(0.005, 0.995, 100)})
    >>> print(pit_coverage(pits, levels=[0.5])["pit_x"][0])
    0.5
    """
    table = QTable()
    table["level"] = list(levels)
    for name in pits.colnames:
        if name.startswith("pit_"):
            distance = np.abs(np.asarray(pits[name], dtype=float) - 0.5)
            table[name] = [float(np.mean(distance <= level / 2)) if len(pits) else np.nan
                           for level in levels]
    table.meta["n"] = len(pits)
    return table


def tile_count_errors(count_probs, true_counts, *, blocks=(1, 2, 5, 10, 25)):
    """How the errors of independent tiles' counts add up over blocks of tiles.

    The variational posterior's tiles are independent, so the variance it claims for
    the number of stars in a block of tiles is the sum of its tiles' variances. The
    errors of neighbouring tiles need not be independent: a star near the boundary of
    two tiles is claimed in part by both, and the one that does not hold it errs the
    other way, so their errors anti-correlate; a density misread over a region makes
    them correlate. This compares, for square blocks of ``b`` x ``b`` tiles, the mean
    squared error of the block's posterior mean count (a bias included) with the
    variance the posterior claims for it.

    Parameters
    ----------
    count_probs : array, shape (n_images, tile_rows, tile_cols, max_sources + 1)
        Each tile's count probabilities (`~starnet.posterior.TiledPosterior.count_probs`).
    true_counts : array of int, shape (n_images, tile_rows, tile_cols)
        The true number of stars in each tile.
    blocks : int or sequence of int, optional
        Block sides in tiles; the blocks tile each image from its first row and column
        (rows and columns left over are not used).

    Returns
    -------
    table : `~astropy.table.QTable`
        Per block side ``block``: ``n_blocks``, ``squared_error`` (the mean over blocks
        of the squared error of their posterior mean counts), ``claimed_variance`` (the
        mean of the variances the posterior claims for them) and ``ratio`` (the first
        over the second: 1 for a calibrated posterior, below 1 where its intervals are
        too wide; NaN where nothing is uncertain). ``meta['neighbour_covariance']`` is
        the mean product of the errors of tiles side by side (rows and columns
        together) and ``meta['diagonal_covariance']`` of diagonal neighbours (both
        diagonals), each over the mean claimed variance of a tile (NaN where the images
        have no such pairs or no tile is uncertain).

    Examples
    --------
    Two stars on a diagonal of 2 x 2 tiles, each tile saying "one star" with
    probability 1/2: each tile errs by as much as it claims, and the errors cancel over
    the block (the stars are known to be two; the posterior claims a variance of 1).

    >>> import numpy as np
    >>> from starnet.calibration import tile_count_errors
    >>> probs = np.full((1, 2, 2, 2), 0.5)          # 2 x 2 tiles, 0 or 1 star, 50:50
    >>> true = np.array([[[1, 0], [0, 1]]])
    >>> table = tile_count_errors(probs, true, blocks=(1, 2))
    >>> print([float(r) for r in table["ratio"]], table.meta["neighbour_covariance"],
    ...       table.meta["diagonal_covariance"])
    [1.0, 0.0] -1.0 1.0
    """
    probs = np.asarray(count_probs, dtype=float)
    true = np.asarray(true_counts, dtype=float)
    if probs.ndim != 4 or true.shape != probs.shape[:3] or not len(true):
        raise ValueError(f"count_probs must have shape (n_images, tile_rows, tile_cols, "
                         f"max_sources + 1) and true_counts its first three axes, with at "
                         f"least one image; got {probs.shape} and {true.shape}")
    if not (np.all(probs >= 0) and np.allclose(probs.sum(axis=-1), 1, atol=1e-6)):
        raise ValueError("count_probs must be probabilities: non-negative, summing to 1 "
                         "over the last axis")
    if np.any(true < 0) or np.any(true != np.round(true)):
        raise ValueError("true_counts must be non-negative integers")
    counts = np.arange(probs.shape[-1])
    mean = probs @ counts
    variance = np.einsum("...k,...k->...", probs, (counts - mean[..., None]) ** 2)
    error = true - mean
    largest = min(true.shape[1:])
    rows = []
    for block in np.atleast_1d(blocks):
        block = check_positive_int(block, "each of blocks")
        if block > largest:
            raise ValueError(f"blocks must be at most {largest} tiles a side (the images are "
                             f"{true.shape[1]} x {true.shape[2]} tiles); got {block}")
        n_rows, n_cols = true.shape[1] // block, true.shape[2] // block

        def summed(values):
            cut = values[:, :n_rows * block, :n_cols * block]
            return cut.reshape(len(cut), n_rows, block, n_cols, block).sum(axis=(2, 4))

        squared = float(np.mean(summed(error) ** 2))
        claimed = float(np.mean(summed(variance)))
        rows.append((block, n_rows * n_cols * len(true), squared, claimed,
                     squared / claimed if claimed > 0 else np.nan))
    table = QTable(rows=rows, names=["block", "n_blocks", "squared_error",
                                     "claimed_variance", "ratio"])
    tile_variance = float(np.mean(variance))
    side = np.concatenate([(error[:, :, :-1] * error[:, :, 1:]).ravel(),
                           (error[:, :-1] * error[:, 1:]).ravel()])
    diagonal = np.concatenate([(error[:, :-1, :-1] * error[:, 1:, 1:]).ravel(),
                               (error[:, :-1, 1:] * error[:, 1:, :-1]).ravel()])
    for name, products in (("neighbour_covariance", side), ("diagonal_covariance", diagonal)):
        table.meta[name] = (float(np.mean(products)) / tile_variance
                            if len(products) and tile_variance > 0 else float("nan"))
    return table


def star_intervals(samples, reference, *, level=0.9, max_separation=1.0, n_draws=None,
                   absent_flux=None, seed=None):
    """Posterior intervals of each reference star from draws of whole catalogs.

    In every draw, the reference stars are matched one to one with the draw's stars
    within ``max_separation`` pixels (`match_catalogs`, no magnitude limit). A
    reference star's detection probability is the fraction of draws in which it has a
    counterpart, and its intervals are the central ``level`` quantiles of its
    counterparts' ``x``, ``y`` and fluxes. Because a counterpart must lie within
    ``max_separation``, these are intervals given that the star is found near the
    reference position: they compare two samplers' draws (StarNet's and MCMC's) star by
    star, and show calibration only for stars found in most draws and with position
    errors well below ``max_separation``. With ``absent_flux=0`` a draw in which a star
    has no counterpart gives it flux 0 (the draw holds it fainter than any star it
    names), so that the flux intervals are those of every star, found or not.

    Parameters
    ----------
    samples : `~astropy.table.Table`
        Catalog draws as `~starnet.StarNetDeblender.sample` and
        `~starnet.baselines.CatalogSampler.sample` return them: a ``sample`` column
        (draw index), positions and ``flux_<band>`` columns.
    reference : `~astropy.table.Table`
        The stars to follow, e.g. the true catalog of a simulation, with positions (and
        optionally ``flux_<band>``) read as by `match_catalogs`.
    level : float, optional
        Probability of the central intervals.
    max_separation : float, optional
        Matching radius, pixels.
    n_draws : int, optional
        Number of draws (a draw may hold no star); by default ``samples.meta['n_samples']``.
    absent_flux : float, optional
        Flux (in the samples' unit) of a star in a draw where it has no counterpart; by
        default such draws are left out of its flux intervals.
    seed : int or `numpy.random.Generator`, optional
        For the randomised PITs.

    Returns
    -------
    intervals : `~astropy.table.QTable`
        One row per reference star: ``detection_probability``; for ``x``, ``y`` and each
        ``flux_<band>`` of ``samples``, columns ``<name>_low``, ``<name>_median`` and
        ``<name>_high`` (NaN for a star never found; fluxes in the samples' unit); and,
        for each of these quantities that the reference has, ``covered_<name>``: whether
        the reference value lies within the interval (False for a star never found), and
        ``pit_<name>``: its randomised rank among the star's ``m`` draws, ``(number
        below + U) / (m + 1)``, exactly uniform if the reference value were one more
        draw (NaN for a star never found). With a few hundred draws or fewer, use the
        PITs (e.g. `pit_coverage`) rather than ``covered_*``: the quantiles of ``m``
        draws span less than ``level`` of the posterior (about ``level (m - 1) / (m +
        1)``).

    Examples
    --------
    A star found in three draws of four, always 0.1 pixel to the right of its true
    position:

    >>> from astropy.table import QTable
    >>> from starnet.calibration import star_intervals
    >>> draws = QTable({"sample": [0, 1, 3], "x": [5.1, 5.1, 5.1], "y": [2.0, 2.0, 2.0]})
    >>> truth = QTable({"x": [5.0], "y": [2.0]})
    >>> result = star_intervals(draws, truth, n_draws=4)
    >>> print(result["detection_probability"][0], result["x_median"][0],
    ...       result["covered_x"][0])
    0.75 5.1 False

    A faint star found in one draw of ten: counting the other nine as flux 0, its 90 %
    flux interval reaches down to 0 and holds its true flux of 50:

    >>> draws = QTable({"sample": [4], "x": [5.0], "y": [2.0], "flux_r": [120.0]})
    >>> truth = QTable({"x": [5.0], "y": [2.0], "flux_r": [50.0]})
    >>> result = star_intervals(draws, truth, n_draws=10, absent_flux=0.0)
    >>> print(result["flux_r_low"][0], result["covered_flux_r"][0])
    0.0 True
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be a probability in (0, 1), got {level!r}")
    if n_draws is None:
        if "n_samples" not in samples.meta:
            raise ValueError("give n_draws: samples.meta has no 'n_samples' (the number of "
                             "draws, including draws without stars)")
        n_draws = samples.meta["n_samples"]
    n_draws = check_positive_int(n_draws, "n_draws")
    rng = np.random.default_rng(check_seed(seed))
    if "sample" not in samples.colnames:
        raise ValueError("samples needs a 'sample' column (the draw of each star), as "
                         f"StarNetDeblender.sample returns; it has {samples.colnames}")
    draw_of_star = np.asarray(samples["sample"], dtype=int)
    if len(draw_of_star) and not 0 <= draw_of_star.min() <= draw_of_star.max() < n_draws:
        raise ValueError(f"sample indices must lie in [0, {n_draws}), got "
                         f"{draw_of_star.min()} .. {draw_of_star.max()}")
    x_name, y_name = position_columns(samples, "samples")
    fluxes = [name for name in samples.colnames if name.startswith("flux_")]
    values = {"x": np.asarray(samples[x_name], dtype=float),
              "y": np.asarray(samples[y_name], dtype=float)}
    units = {}
    for name in fluxes:
        column = samples[name]
        units[name] = getattr(column, "unit", None)
        values[name] = np.asarray(getattr(column, "value", column), dtype=float)
    matched = {name: np.full((len(reference), n_draws), np.nan) for name in values}
    order = np.argsort(draw_of_star, kind="stable")
    bounds = np.searchsorted(draw_of_star[order], np.arange(n_draws + 1))
    for k in range(n_draws):
        rows = order[bounds[k]:bounds[k + 1]]
        if not len(rows) or not len(reference):
            continue
        pairs = match_catalogs(samples[rows], reference, max_separation=max_separation,
                               max_mag_difference=None).pairs
        for name, column in values.items():
            matched[name][pairs[:, 1], k] = column[rows[pairs[:, 0]]]
    found = np.isfinite(matched["x"])
    if absent_flux is not None:
        for name in fluxes:
            matched[name][~found] = absent_flux
    table = QTable()
    table["detection_probability"] = found.mean(axis=1)
    tail = (1 - level) / 2
    ref_x, ref_y = position_columns(reference, "reference")
    truth = {"x": reference[ref_x], "y": reference[ref_y]}
    for name in values:
        quantiles = np.full((3, len(reference)), np.nan)
        n_values = np.isfinite(matched[name]).sum(axis=1)
        any_value = n_values > 0
        if any_value.any():
            quantiles[:, any_value] = np.nanquantile(matched[name][any_value],
                                                     [tail, 0.5, 1 - tail], axis=1)
        scale = units.get(name) or 1
        for suffix, row in zip(("low", "median", "high"), quantiles):
            table[f"{name}_{suffix}"] = row * scale
        true = truth.get(name, reference[name] if name in reference.colnames else None)
        if true is not None:
            true = np.asarray(u.Quantity(true, units[name]).value if units.get(name)
                              else true, dtype=float)
            table[f"covered_{name}"] = (quantiles[0] <= true) & (true <= quantiles[2])
            below = (matched[name] < true[:, None]).sum(axis=1)
            pit = (below + rng.uniform(size=len(below))) / (n_values + 1)
            table[f"pit_{name}"] = np.where(any_value, pit, np.nan)
    table.meta.update({"level": level, "max_separation": max_separation,
                       "n_draws": n_draws})
    return table


def dropped_fraction(prior, *, tile_size=2, max_sources=3, shape=(100, 100), n_images=200,
                     seed=0):
    """Fraction of the prior's stars beyond ``max_sources`` in their tile, by simulation.

    A model fitted to tile catalogs truncated at ``max_sources`` learns the truncated
    count, so its count is expected to be this fraction low.

    Examples
    --------
    The M2 prior puts Poisson(0.48) stars in a tile of 2 x 2 pixels, of which 0.347 %
    are beyond the third:

    >>> from starnet import StarFieldPrior
    >>> print(f"{dropped_fraction(StarFieldPrior(mu=0.12), n_images=200):.2%}")
    0.35%
    """
    generator = torch.Generator().manual_seed(_seed_int(seed))
    batch = prior.sample_batch(n_images, shape, margin=0.0, generator=generator)
    tiles = TileGrid(tile_size=tile_size, max_sources=max_sources).to_tiles(
        batch.locs, batch.fluxes, batch.mask, tuple(shape))
    return tiles.n_dropped / max(int(batch.mask.sum()), 1)
