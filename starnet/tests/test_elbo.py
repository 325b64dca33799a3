import math

import numpy as np
import torch

from starnet import PowerLawPSF, StarFieldPrior
from starnet.elbo import analytic_count_elbo, log_joint, log_prior
from starnet.posterior import TiledPosterior
from starnet.simulate import StarFieldRenderer
from starnet.tiles import TileGrid


def posterior(grid_shape, seed, *, max_sources=2, log_flux_mean=7.5):
    rng = torch.Generator().manual_seed(seed)
    n_slots = max_sources * (max_sources + 1) // 2
    shape = (1, *grid_shape)
    return TiledPosterior(
        count_logits=torch.randn(*shape, max_sources + 1, generator=rng, dtype=torch.float64),
        loc_mean=torch.randn(*shape, n_slots, 2, generator=rng, dtype=torch.float64),
        loc_sd=torch.full((*shape, n_slots, 2), 1.2, dtype=torch.float64),
        log_flux_mean=log_flux_mean + torch.randn(*shape, n_slots, 1, generator=rng,
                                                  dtype=torch.float64),
        log_flux_sd=torch.full((*shape, n_slots, 1), 0.8, dtype=torch.float64))


def test_prior_and_posterior_densities_share_a_measure():
    """E_q[p(z) / q(z)] is the prior probability of q's support, here of at most two
    stars in a tile: this fails if the prior's density and q's (Janossy, positions in
    tile units, permutations summed) were taken with respect to different measures."""
    prior = StarFieldPrior(mu=0.02, f_min=1000.0, f_max=1e4, alpha=0.5, bands=("r",))
    tile_size = 10
    q = posterior((1, 1), 0, log_flux_mean=7.8).expand(200_000)
    counts = torch.multinomial(q.count_probs.reshape(-1, 3), 1,
                               generator=torch.Generator().manual_seed(1)).reshape(-1, 1, 1)
    draw = q.rsample(counts, generator=torch.Generator().manual_seed(2))
    log_weight = (log_prior(prior, draw, tile_size, (tile_size, tile_size))
                  - q.log_prob(draw)[:, 0, 0])
    weight = torch.exp(log_weight).numpy()
    rate = prior.mu * tile_size**2
    expected = math.exp(-rate) * (1 + rate + rate**2 / 2)
    error = weight.std() / np.sqrt(weight.size)
    assert abs(weight.mean() - expected) < 4 * error + 1e-3


def test_analytic_count_elbo_matches_monte_carlo():
    """Summing the 3^2 count configurations exactly gives the same ELBO as drawing
    whole catalogs (counts included) from q."""
    torch.manual_seed(0)
    psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    renderer = StarFieldRenderer([psf], stamp_size=7)
    grid = TileGrid(tile_size=4, max_sources=2)
    prior = StarFieldPrior(mu=0.1, f_min=1000.0, f_max=math.inf, bands=("r",))
    image = 100.0 + 10.0 * torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(3))
    q = posterior((1, 2), 4)
    kwargs = dict(prior=prior, renderer=renderer, grid=grid, flux_shift=prior.f_min)
    analytic = float(analytic_count_elbo(q, image, 100.0, n_samples=2000,
                                         generator=torch.Generator().manual_seed(5), **kwargs))
    n = 20000
    counts = torch.multinomial(q.count_probs.reshape(-1, 3), n, replacement=True,
                               generator=torch.Generator().manual_seed(6)).T.reshape(n, 1, 2)
    integrand, _ = log_joint(q, counts, image, 100.0,
                             generator=torch.Generator().manual_seed(7), **kwargs)
    monte_carlo = float(integrand.mean())
    error = float(integrand.std()) / math.sqrt(n)
    assert abs(analytic - monte_carlo) < 4 * error
