"""The evidence lower bound (ELBO) of the tiled variational posterior on one image.

StarNet fits its posterior by the expected forward KL (`starnet.training`); the ELBO
is what the usual ("reverse KL") variational inference would maximise instead. The
paper's Section 5 compares the two on a small image
(``benchmarks/forward_kl_vs_elbo.py``). Here the ELBO of one image ``x`` is

.. math:: \\mathcal{L}(q) = E_{q(z)}[\\log p(x \\mid z) + \\log p(z) - \\log q(z)]
          \\le \\log p(x),

with ``p(x | z)`` the model's Normal(lambda, lambda) likelihood and both densities of
a catalog ``z`` taken with respect to the same measure: Janossy densities of the set
of stars (no ordering; `~starnet.posterior.TiledPosterior.log_prob` sums over the
orderings of a tile's sources), positions measured within tiles, fluxes in electrons.

The variational fluxes are ``flux_shift + exp(w)`` with ``w`` normal: with
``flux_shift = prior.f_min`` (and an untruncated prior, ``f_max = inf``) every
variational catalog lies in the prior's support, so that the ELBO is finite; with the
plain log-normal (``flux_shift = 0``) a star fainter than ``f_min`` has prior density
zero and the ELBO is minus infinity.
"""

import itertools
import math

import torch

from .tiles import TileCatalog

__all__ = ["log_likelihood", "log_prior", "log_joint", "count_configurations",
           "analytic_count_elbo", "reinforce_elbo"]


def log_likelihood(image, expected):
    """``log p(x | z)`` of images under Normal(lambda, lambda) per pixel, shape (n_images,).

    ``image`` and ``expected`` (lambda, background included) are (n_images, bands, rows,
    cols) in electrons.

    Parameters
    ----------
    image : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
        Observed pixel values, electrons.
    expected : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
        Expected pixel values lambda (stars plus background), electrons; positive.

    Returns
    -------
    `torch.Tensor` of float64, shape (n_images,)
        Log likelihood of each image, summed over bands and pixels.
    """
    expected = expected.double()
    residual = image.double() - expected
    return -0.5 * (torch.log(2 * math.pi * expected) + residual**2 / expected).sum((1, 2, 3))


def log_prior(prior, tiles, tile_size, image_shape):
    """Log Janossy density of tile catalogs under the Poisson prior, shape (n_images,).

    For a Poisson process of ``mu`` stars per pixel over an image of area ``A`` it is
    ``-mu A + sum_i [log(mu R^2) + log p(f_i)]``: positions in tile units (a tile has
    area 1, ``R^2`` pixels), ``p(f)`` the flux density of the prior (truncated Pareto in
    the first band, log-normal colours in the others); ``-inf`` outside its support.

    Parameters
    ----------
    prior : `~starnet.StarFieldPrior`
    tiles : `~starnet.tiles.TileCatalog`
        Fluxes in electrons.
    tile_size : int
        ``R``, pixels.
    image_shape : tuple of int
        ``(rows, cols)``, a whole number of tiles.

    Returns
    -------
    `torch.Tensor` of float64, shape (n_images,)
        Log prior density of each image's catalog; ``-inf`` if a star's flux in the
        first band lies outside the prior's support.
    """
    present = torch.arange(tiles.fluxes.shape[-2]) < tiles.counts[..., None]
    flux = tiles.fluxes.double()
    ref = flux[..., 0]
    alpha, f_min, f_max = prior.alpha, prior.f_min, prior.f_max
    log_norm = math.log1p(-(f_min / f_max) ** alpha) if math.isfinite(f_max) else 0.0
    log_pf = (math.log(alpha) + alpha * math.log(f_min) - (alpha + 1) * torch.log(ref)
              - log_norm)
    log_pf = torch.where((ref >= f_min) & (ref <= f_max), log_pf, -math.inf)
    if prior.n_bands > 1:
        # f_b = f_1 10^(c / 2.5), c ~ Normal: density of f_b given f_1
        color = 2.5 * torch.log10(flux[..., 1:] / ref[..., None])
        mean = torch.tensor(prior.color_mean, dtype=torch.float64)
        sd = torch.tensor(prior.color_sd, dtype=torch.float64)
        log_pc = (-0.5 * ((color - mean) / sd) ** 2 - torch.log(sd)
                  - 0.5 * math.log(2 * math.pi) + math.log(2.5 / math.log(10))
                  - torch.log(flux[..., 1:]))
        log_pf = log_pf + log_pc.sum(-1)
    per_star = math.log(prior.mu * tile_size**2) + log_pf
    per_star = torch.where(present, per_star, 0.0)
    rows, cols = image_shape
    return -prior.mu * rows * cols + per_star.flatten(1).sum(1)


def count_configurations(n_tiles, max_sources):
    """All ``(max_sources + 1) ** n_tiles`` vectors of tile counts, (n_configs, n_tiles).

    Parameters
    ----------
    n_tiles : int
        Number of tiles.
    max_sources : int
        Largest number of stars per tile.

    Returns
    -------
    `torch.Tensor` of int64, shape ((max_sources + 1) ** n_tiles, n_tiles)
        Every count vector, in lexicographic order (the last tile varies fastest).
    """
    return torch.tensor(list(itertools.product(range(max_sources + 1), repeat=n_tiles)),
                        dtype=torch.long)


def log_joint(posterior, counts, image, background, *, prior, renderer, grid,
              flux_shift=0.0, generator=None):
    """Reparameterised draws from ``q`` given tile counts, and their ELBO integrands.

    Parameters
    ----------
    posterior : `~starnet.posterior.TiledPosterior`
        The posterior of one image (batch dimension 1).
    counts : `torch.Tensor` of int64, shape (n_draws, tile_rows, tile_cols)
        The count of every tile in each draw.
    image : `torch.Tensor`, shape (1, n_bands, rows, cols)
    background : float or `torch.Tensor` broadcasting to ``image``
    prior : `~starnet.StarFieldPrior`
    renderer : `~starnet.simulate.StarFieldRenderer`
    grid : `~starnet.tiles.TileGrid`
    flux_shift : float
        Variational fluxes are ``flux_shift + exp(w)``.
    generator : `torch.Generator`, optional

    Returns
    -------
    integrand : `torch.Tensor`, shape (n_draws,)
        ``log p(x | z) + log p(z) - log q(z)`` (float64), differentiable in the
        parameters of ``posterior`` through the positions and fluxes.
    log_q_counts : `torch.Tensor`, shape (n_draws,)
        ``log q(counts)``, the part of ``log q(z)`` that a score-function estimator
        needs.
    """
    n_draws = counts.shape[0]
    q = posterior.expand(n_draws)
    draw = q.rsample(counts, generator=generator)
    used = (torch.arange(grid.max_sources) < counts[..., None])[..., None]
    fluxes = torch.where(used, draw.fluxes + flux_shift, 1.0)
    catalog = TileCatalog(counts=counts, locs=draw.locs, fluxes=fluxes, n_dropped=0)
    locs, star_fluxes, mask = grid.from_tiles(catalog)
    shape = tuple(image.shape[-2:])
    expected = renderer.render(locs, star_fluxes * mask[..., None], mask, shape) + background
    log_q = q.log_prob(draw).flatten(1).sum(1).double()
    log_q_counts = torch.log_softmax(q.count_logits, -1).gather(
        -1, counts[..., None])[..., 0].flatten(1).sum(1)
    integrand = (log_likelihood(image.expand(n_draws, -1, -1, -1), expected.clamp(min=1e-3))
                 + log_prior(prior, catalog, grid.tile_size, shape) - log_q)
    return integrand, log_q_counts


def analytic_count_elbo(posterior, image, background, *, prior, renderer, grid,
                        n_samples=1, flux_shift=0.0, generator=None):
    """The ELBO with the tile counts summed out exactly.

    Every configuration of counts (``(max_sources + 1) ** n_tiles`` of them) is weighted
    by its probability under ``q``; positions and fluxes are drawn ``n_samples`` times
    per configuration by reparameterisation. The estimate is unbiased and
    differentiable in all parameters of ``posterior`` (the count probabilities
    through the weights).

    Parameters
    ----------
    posterior : `~starnet.posterior.TiledPosterior`
        The posterior of one image (batch dimension 1).
    image : `torch.Tensor`, shape (1, n_bands, rows, cols)
        Electrons.
    background : float or `torch.Tensor` broadcasting to ``image``
        Electrons.
    prior : `~starnet.StarFieldPrior`
    renderer : `~starnet.simulate.StarFieldRenderer`
    grid : `~starnet.tiles.TileGrid`
    n_samples : int, optional
        Draws of positions and fluxes per configuration of counts.
    flux_shift : float, optional
        Variational fluxes are ``flux_shift + exp(w)``.
    generator : `torch.Generator`, optional

    Returns
    -------
    elbo : `torch.Tensor`
        Scalar, float64.
    """
    n_tiles = posterior.count_logits[0, ..., 0].numel()
    configs = count_configurations(n_tiles, posterior.max_sources)
    tile_shape = posterior.count_logits.shape[1:3]
    counts = configs.repeat_interleave(n_samples, 0).reshape(-1, *tile_shape)
    integrand, log_q_counts = log_joint(posterior, counts, image, background, prior=prior,
                                        renderer=renderer, grid=grid, flux_shift=flux_shift,
                                        generator=generator)
    weights = torch.exp(log_q_counts.double()).reshape(-1, n_samples)[:, 0]
    return (weights * integrand.reshape(-1, n_samples).mean(1)).sum()


def reinforce_elbo(posterior, image, background, *, prior, renderer, grid, n_samples=4,
                   flux_shift=0.0, generator=None):
    """A surrogate whose gradient is the score-function (REINFORCE) estimate of the
    ELBO's gradient, with a leave-one-out baseline.

    ``n_samples`` (at least 2) whole catalogs are drawn from ``q``: counts by ancestral
    sampling, positions and fluxes by reparameterisation. The gradient of the returned
    surrogate is ``mean_k [(L_k - b_k) grad log q(N_k) + grad L_k]`` with ``L_k`` the
    ELBO integrand and ``b_k`` the mean of the other draws' ``L`` (an unbiased control
    variate).

    Parameters
    ----------
    posterior : `~starnet.posterior.TiledPosterior`
        The posterior of one image (batch dimension 1).
    image : `torch.Tensor`, shape (1, n_bands, rows, cols)
        Electrons.
    background : float or `torch.Tensor` broadcasting to ``image``
        Electrons.
    prior : `~starnet.StarFieldPrior`
    renderer : `~starnet.simulate.StarFieldRenderer`
    grid : `~starnet.tiles.TileGrid`
    n_samples : int, optional
        Number of catalogs drawn, at least 2.
    flux_shift : float, optional
        Variational fluxes are ``flux_shift + exp(w)``.
    generator : `torch.Generator`, optional

    Returns
    -------
    surrogate : `torch.Tensor`
        Scalar to maximise (its value is the mean of ``L_k``).
    """
    if n_samples < 2:
        raise ValueError(f"a leave-one-out baseline needs n_samples >= 2, got {n_samples}")
    probs = posterior.count_probs.detach().expand(n_samples, *posterior.count_probs.shape[1:])
    flat = probs.reshape(-1, probs.shape[-1])
    counts = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    integrand, log_q_counts = log_joint(posterior, counts, image, background, prior=prior,
                                        renderer=renderer, grid=grid, flux_shift=flux_shift,
                                        generator=generator)
    value = integrand.detach()
    baseline = (value.sum() - value) / (n_samples - 1)
    score = ((value - baseline) * log_q_counts.double()).mean()
    return integrand.mean() + score - score.detach()
