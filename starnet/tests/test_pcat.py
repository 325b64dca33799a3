"""The PCAT-like sampler: it samples the prior without data, the exact posterior on a
tiny image, finds a bright star, and returns catalogs as StarNetDeblender.sample."""

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable, vstack
from photutils.psf import ImagePSF
from scipy import stats

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.baselines import CatalogSampler
from starnet.simulate import StarFieldRenderer

PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
NARROW = PowerLawPSF(sigma1=0.7, sigma2=1.5, b=0.05, p0=0.0)


def _image(data, bands, background, psf):
    return NDData(np.asarray(data, dtype=float), unit=u.electron,
                  meta={"bands": bands, "psf": [psf] * len(bands), "background": background})


def _render(renderer, stars, shape):
    """Noiseless light of stars (n, 2 + bands) through ``renderer``."""
    stars = torch.as_tensor(np.atleast_2d(stars), dtype=torch.float32)
    mask = torch.ones(1, len(stars), dtype=torch.bool)
    return renderer.render(stars[None, :, :2], stars[None, :, 2:], mask, shape)[0].double()


def test_prior_without_likelihood():
    """With the data switched off the chains sample the prior: N ~ Poisson(mu * area),
    uniform positions, truncated Pareto fluxes and normal colours."""
    prior = StarFieldPrior(mu=0.01, f_min=1000.0, f_max=1e5, alpha=0.5, color_mean=0.3,
                           color_sd=0.5, bands=["r", "i"])
    shape = (20, 20)
    sampler = CatalogSampler(prior=prior, psf=PSF, likelihood=False, stamp_size=7)
    image = _image(np.full((2, *shape), 100.0), ["r", "i"], [100.0, 100.0], PSF)
    n_chains, per_chain = 100, 10
    samples = sampler.sample(image, n_samples=per_chain, n_sweeps=200, n_chains=n_chains,
                             seed=0)
    counts = np.bincount(samples["sample"], minlength=n_chains * per_chain)
    mean = prior.expected_count(shape)
    # chains are independent: the error of the mean count from the spread of chain means
    chain_means = counts.reshape(n_chains, per_chain).mean(axis=1)
    error = chain_means.std(ddof=1) / np.sqrt(n_chains)
    assert abs(counts.mean() - mean) < 4 * error, (counts.mean(), error)
    assert abs(counts.var() / mean - 1) < 0.25
    # the count distribution, one draw per chain (independent draws)
    last = counts.reshape(n_chains, per_chain)[:, -1]
    observed = np.bincount(np.minimum(last, 8), minlength=9)[1:8]
    expected = n_chains * np.append(stats.poisson.pmf(np.arange(1, 7), mean),
                                    stats.poisson.sf(6, mean))
    assert stats.chisquare(observed[:6], expected[:6] * observed[:6].sum()
                           / expected[:6].sum()).pvalue > 1e-3
    flux = samples["flux_r"].value
    tail = 1 - (prior.f_min / prior.f_max) ** prior.alpha

    def pareto_cdf(f):
        return (1 - (prior.f_min / f) ** prior.alpha) / tail

    # stars of one chain are correlated over time: test the last draw of every chain
    last_draws = np.isin(samples["sample"], np.arange(n_chains) * per_chain + per_chain - 1)
    assert stats.kstest(flux[last_draws], pareto_cdf).pvalue > 1e-3
    colors = 2.5 * np.log10(samples["flux_i"].value / flux)
    assert stats.kstest(colors[last_draws], stats.norm(0.3, 0.5).cdf).pvalue > 1e-3
    assert stats.kstest(samples["x_fit"][last_draws], stats.uniform(-0.5, 20).cdf).pvalue > 1e-3
    for move, rate in samples.meta["acceptance"].items():
        assert rate > 0.002, (move, rate)    # every move is taken


def test_tiny_image_posterior_matches_importance_sampling():
    """On a 6 x 6 image the chains' posterior of N, of the total flux and of the mean x
    agrees with importance sampling from the prior weighted by the likelihood."""
    shape, background = (6, 6), 1000.0
    prior = StarFieldPrior(mu=0.04, f_min=150.0, f_max=1500.0, alpha=1.0, bands=["r"])
    renderer = StarFieldRenderer([NARROW], stamp_size=5)
    truth = [[2.6, 3.1, 350.0], [4.1, 1.2, 200.0]]
    expected = _render(renderer, truth, shape) + background
    rng = np.random.default_rng(5)
    data = (expected + expected.sqrt() * torch.from_numpy(rng.standard_normal(expected.shape)))

    # importance sampling: prior draws weighted by the likelihood
    generator = torch.Generator().manual_seed(1)
    log_w, n_draws, total_flux, mean_x = [], [], [], []
    for _ in range(6):
        batch = prior.sample_batch(50_000, shape, generator=generator)
        light = renderer.render(batch.locs, batch.fluxes, batch.mask, shape).double()
        lam = light + background
        log_w.append((-0.5 * ((data - lam) ** 2 / lam + lam.log())).sum(dim=(1, 2, 3)))
        n_draws.append(batch.n_stars.double())
        total_flux.append(batch.fluxes[..., 0].double().sum(1))
        x = torch.where(batch.mask, batch.locs[..., 0].double(), 0).sum(1)
        mean_x.append(x / batch.n_stars.clamp(min=1))
    log_w, n_draws = torch.cat(log_w), torch.cat(n_draws)
    weight = (log_w - log_w.max()).exp()
    weight = (weight / weight.sum()).numpy()
    assert 1 / (weight ** 2).sum() > 1500                 # effective sample size
    quantities = {"P(N=1)": (n_draws == 1).double(), "P(N=2)": (n_draws == 2).double(),
                  "P(N=3)": (n_draws == 3).double(), "total flux": torch.cat(total_flux),
                  "mean x": torch.cat(mean_x)}

    sampler = CatalogSampler(prior=prior, psf=NARROW, stamp_size=5, split_scale=1.0)
    n_chains, per_chain = 150, 20
    samples = sampler.sample(_image(data, ["r"], [background], NARROW), n_samples=per_chain,
                             n_sweeps=400, n_chains=n_chains, seed=2)
    index = np.asarray(samples["sample"])
    count = np.bincount(index, minlength=n_chains * per_chain)
    flux = np.bincount(index, weights=samples["flux_r"].value, minlength=len(count))
    xsum = np.bincount(index, weights=samples["x_fit"], minlength=len(count))
    chain_values = {"P(N=1)": count == 1, "P(N=2)": count == 2, "P(N=3)": count == 3,
                    "total flux": flux, "mean x": xsum / np.maximum(count, 1)}
    for name, values in chain_values.items():
        h = quantities[name].numpy()
        is_mean = float(weight @ h)
        is_error = np.sqrt(float((weight ** 2) @ (h - is_mean) ** 2))
        per_chain_means = np.asarray(values, dtype=float).reshape(n_chains, per_chain).mean(1)
        mcmc_mean = per_chain_means.mean()
        mcmc_error = per_chain_means.std(ddof=1) / np.sqrt(n_chains)
        error = np.hypot(is_error, mcmc_error)
        assert abs(mcmc_mean - is_mean) < 4 * error, (name, mcmc_mean, is_mean, error)


def test_bright_isolated_star_found():
    prior = StarFieldPrior(mu=0.002, bands=["r"])
    renderer = StarFieldRenderer([PSF], stamp_size=11)
    shape, sky = (20, 20), 686.0
    expected = _render(renderer, [[9.3, 10.6, 3e4]], shape) + sky
    data = torch.poisson(expected, generator=torch.Generator().manual_seed(0))
    sampler = CatalogSampler(prior=prior, psf=PSF, stamp_size=11)
    samples = sampler.sample(_image(data, ["r"], [sky], PSF), n_samples=10, n_sweeps=1000,
                             seed=4)
    bright = samples[samples["flux_r"].value > 1e4]
    assert len(bright) == 10 and sorted(bright["sample"]) == list(range(10))
    assert abs(np.mean(bright["x_fit"]) - 9.3) < 0.05
    assert abs(np.mean(bright["y_fit"]) - 10.6) < 0.05
    assert abs(np.mean(bright["flux_r"].value) / 3e4 - 1) < 0.03


def test_psf_image_with_negative_wings():
    """A PSF image with negative wings (as SDSS's eigen-image PSFs have) makes a bright
    star's model negative around it; the chain still moves the star to the truth
    (without the likelihood's floor every proposal near it was NaN and rejected)."""
    grid = np.arange(25) - 12.0
    r2 = grid[:, None] ** 2 + grid[None, :] ** 2
    stamp = np.exp(-r2 / (2 * 1.2 ** 2)) / 1.2 ** 2 - 0.03 * np.exp(-r2 / (2 * 5.0 ** 2)) / 25
    psf = ImagePSF(stamp / stamp.sum())
    prior = StarFieldPrior(mu=0.002, f_max=1e7, bands=["r"])
    renderer = StarFieldRenderer([psf], stamp_size=25)
    shape, sky = (30, 30), 100.0
    expected = _render(renderer, [[14.2, 15.4, 1e6]], shape) + sky
    assert float(expected.min()) < 0
    data = torch.poisson(expected.clamp(min=0), generator=torch.Generator().manual_seed(0))
    start = QTable({"x": [14.2], "y": [15.4], "flux_r": [1e6] * u.electron})
    samples = CatalogSampler(prior=prior, psf=psf).sample(
        _image(data, ["r"], [sky], psf), n_samples=5, n_sweeps=200, init=start, seed=1)
    bright = samples[samples["flux_r"].value > 1e5]
    assert sorted(bright["sample"]) == list(range(5))
    assert np.std(bright["x_fit"]) > 0 and np.std(bright["flux_r"].value) > 0   # it moves
    assert abs(np.mean(bright["x_fit"]) - 14.2) < 0.02
    assert abs(np.mean(bright["y_fit"]) - 15.4) < 0.02
    assert abs(np.mean(bright["flux_r"].value) / 1e6 - 1) < 0.01


def test_log_posterior_matches_the_rendered_model():
    """`log_posterior` equals the Normal(lambda, lambda) log-likelihood of the image as
    the simulator renders it plus the Poisson-Pareto-colour prior, computed here
    independently; for several catalogs, one value per draw."""
    prior = StarFieldPrior(mu=0.02, color_sd=0.5, bands=["r", "i"])
    shape, sky = (20, 20), np.array([600.0, 900.0])
    image, truth = simulate_starfield(shape, prior=prior, psf=PSF, background=sky, seed=2,
                                      stamp_size=11)
    stars = np.column_stack([truth["x"], truth["y"], truth["flux_r"].value,
                             truth["flux_i"].value])
    renderer = StarFieldRenderer([PSF, PSF], stamp_size=11)
    rate = _render(renderer, stars, shape) + torch.tensor(sky)[:, None, None]
    data = torch.as_tensor(image.data, dtype=torch.float64)
    log_likelihood = -0.5 * float(((data - rate) ** 2 / rate + rate.log()
                                   + np.log(2 * np.pi)).sum())
    fluxes = torch.as_tensor(stars[:, 2:], dtype=torch.float64)
    log_prior = (len(truth) * np.log(prior.mu) - prior.mu * shape[0] * shape[1]
                 + float(prior.flux_log_density(fluxes).sum()))
    sampler = CatalogSampler(prior=prior, psf=PSF, stamp_size=11)
    two = vstack([truth, truth[1:]])
    two["sample"] = [0] * len(truth) + [1] * (len(truth) - 1)
    values = sampler.log_posterior(image, two)
    assert values[0] == pytest.approx(log_likelihood + log_prior, abs=1e-3)
    assert values[1] < values[0]


def test_table_like_deblender_sample_and_seeds():
    prior = StarFieldPrior(mu=0.05, bands=["r", "i"])
    background = [686.0, 1123.0]
    deblender = StarNetDeblender(prior=prior, psf=PSF, background=background, hidden=8,
                                 tile_hidden=16, stamp_size=7)
    from starnet import simulate_starfield
    image, truth = simulate_starfield((16, 16), prior=prior, psf=PSF, background=background,
                                      seed=3, stamp_size=7)
    theirs = deblender.sample(image, n_samples=3, seed=0, background="given",
                              progress=False)
    sampler = CatalogSampler(prior=prior, stamp_size=7)
    ours = sampler.sample(image, n_samples=3, n_sweeps=30, seed=0)
    assert ours.colnames == theirs.colnames
    for name in ours.colnames:
        assert getattr(ours[name], "unit", None) == getattr(theirs[name], "unit", None)
        assert ours[name].dtype.kind == theirs[name].dtype.kind
    assert set(ours["sample"]) <= {0, 1, 2}
    assert np.all((ours["x_fit"] >= -0.5) & (ours["x_fit"] < 15.5))
    again = sampler.sample(image, n_samples=3, n_sweeps=30, seed=0)
    np.testing.assert_array_equal(ours["x_fit"], again["x_fit"])
    # chains started from catalogs: one chain per draw of the table
    started = sampler.sample(image, n_samples=2, n_sweeps=4, seed=1, init=theirs)
    assert started.meta["n_chains"] == 3 and set(started["sample"]) <= set(range(6))
    started = sampler.sample(image, n_samples=1, n_sweeps=1, burn_in=0.0, init=truth,
                             seed=1)
    assert abs(len(started) - len(truth)) <= 4


def test_bad_options():
    prior = StarFieldPrior(bands=["r"])
    with pytest.raises(ValueError, match="region_size"):
        CatalogSampler(prior=prior, stamp_size=11, region_size=0)
    with pytest.raises(ValueError, match="equally likely"):
        CatalogSampler(prior=prior, move_probabilities=(0.6, 0.2, 0.0, 0.1, 0.1))
    with pytest.raises(ValueError, match="odd"):
        CatalogSampler(prior=prior, stamp_size=10)


def test_init_fluxes_clipped_into_the_prior_range():
    """Starting fluxes outside the prior's range (as StarNet's log-normal draws have)
    are clipped exactly into it: every start has a finite prior density."""
    prior = StarFieldPrior(mu=0.01, f_min=1000.0, f_max=1e6, bands=["r", "i"])
    shape = (12, 12)
    image = _image(np.full((2, *shape), 500.0), ["r", "i"], [500.0, 500.0], PSF)
    rng = np.random.default_rng(0)
    flux_r = np.concatenate([rng.uniform(200.0, 999.0, 200), rng.uniform(1.000001e6, 3e6, 200)])
    init = QTable({"sample": np.arange(400), "x": rng.uniform(0, 11, 400),
                   "y": rng.uniform(0, 11, 400), "flux_r": flux_r * u.electron,
                   "flux_i": 1.7 * flux_r * u.electron})
    init.meta["n_samples"] = 400
    values = CatalogSampler(prior=prior, psf=PSF, stamp_size=7).log_posterior(image, init)
    assert len(values) == 400 and np.all(np.isfinite(values))
