import json

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.table import QTable
from scipy import stats

from starnet import StarFieldPrior
from starnet.prior import StarCatalogBatch, batch_to_table, catalog_table

# every statistical test below uses a fixed seed and rejects at p < P_MIN;
# under a correct sampler each such test has a 0.1 % chance to fail for
# some seed, and the fixed seed makes the outcome reproducible
P_MIN = 1e-3


def generator(seed):
    return torch.Generator().manual_seed(seed)


def truncated_pareto_cdf(f, f_min, f_max, alpha):
    return (1 - (f_min / f) ** alpha) / (1 - (f_min / f_max) ** alpha)


def test_defaults_are_the_m2_prior():
    prior = StarFieldPrior()
    assert prior.bands == ['r', 'i'] and prior.n_bands == 2
    assert (prior.mu, prior.f_min, prior.f_max, prior.alpha) == (0.12, 1000.0, 1e6, 0.5)
    assert prior.color_mean == [0.0] and prior.color_sd == [1.0]
    assert prior.expected_count((100, 100)) == pytest.approx(1200.0)
    assert prior.expected_count((30, 50)) == pytest.approx(0.12 * 1500)


@pytest.mark.parametrize('margin', [0.0, 2.5])
def test_count_is_poisson(margin):
    rows, cols, mu, n_images = 10, 12, 0.1, 4000
    prior = StarFieldPrior(mu=mu)
    batch = prior.sample_batch(n_images, (rows, cols), margin=margin, generator=generator(1))
    counts = batch.n_stars.numpy().astype(float)
    # stars are spread over the image extended by the margin, at the same density
    rate = mu * (rows + 2 * margin) * (cols + 2 * margin)
    # the mean: z-test against the Poisson standard error sqrt(rate / n)
    z = (counts.mean() - rate) / np.sqrt(rate / n_images)
    assert 2 * stats.norm.sf(abs(z)) > P_MIN
    # variance = mean: the dispersion statistic is chi2(n - 1) for Poisson counts
    dispersion = np.sum((counts - counts.mean()) ** 2) / counts.mean()
    cdf = stats.chi2.cdf(dispersion, n_images - 1)
    assert 2 * min(cdf, 1 - cdf) > P_MIN
    # and the whole distribution: chi-square goodness of fit to the Poisson pmf
    edges = np.arange(int(stats.poisson.ppf(0.005, rate)), int(stats.poisson.ppf(0.995, rate)))
    expected = np.diff(np.concatenate([[0.0], stats.poisson.cdf(edges, rate), [1.0]]))
    observed = np.bincount(np.searchsorted(edges, counts), minlength=len(edges) + 1)
    assert stats.chisquare(observed, n_images * expected).pvalue > P_MIN


def test_batch_padding():
    prior = StarFieldPrior(mu=0.1)
    batch = prior.sample_batch(50, (10, 10), generator=generator(2))
    assert isinstance(batch, StarCatalogBatch)
    n_max = int(batch.n_stars.max())
    assert batch.locs.shape == (50, n_max, 2)
    assert batch.fluxes.shape == (50, n_max, 2)
    assert batch.mask.dtype == torch.bool
    assert torch.equal(batch.n_stars, batch.mask.sum(dim=1))
    # stars fill the first slots; padded slots hold zeros
    assert torch.equal(batch.mask, torch.arange(n_max) < batch.n_stars[:, None])
    assert torch.all(batch.fluxes[~batch.mask] == 0) and torch.all(batch.locs[~batch.mask] == 0)
    assert torch.all(batch.fluxes[batch.mask][:, 0] >= prior.f_min)
    empty = prior.sample_batch(0, (10, 10), generator=generator(2))
    assert empty.locs.shape == (0, 0, 2) and empty.n_stars.shape == (0,)


@pytest.mark.parametrize(('f_min', 'f_max', 'alpha'), [(1000.0, 1e6, 0.5), (500.0, 4000.0, 1.5)])
def test_reference_flux_is_truncated_pareto(f_min, f_max, alpha):
    prior = StarFieldPrior(f_min=f_min, f_max=f_max, alpha=alpha)
    fluxes = prior.sample_fluxes(20_000, generator=generator(3))
    assert fluxes.shape == (20_000, 2) and fluxes.dtype == torch.float32
    flux = fluxes[:, 0].double().numpy()
    # float32 storage may round the end points by one part in 1e7
    assert flux.min() >= f_min * (1 - 1e-6) and flux.max() <= f_max * (1 + 1e-6)
    result = stats.kstest(flux, truncated_pareto_cdf, args=(f_min, f_max, alpha))
    assert result.pvalue > P_MIN
    # the truncation matters: the untruncated Pareto is rejected
    untruncated = stats.kstest(flux, truncated_pareto_cdf, args=(f_min, np.inf, alpha))
    assert untruncated.pvalue < P_MIN


def test_colors_are_normal():
    means, sds = [0.3, -0.5], [1.0, 0.2]
    prior = StarFieldPrior(bands=('r', 'i', 'g'), color_mean=means, color_sd=sds)
    fluxes = prior.sample_fluxes(20_000, generator=generator(4)).double().numpy()
    assert fluxes.shape == (20_000, 3)
    for b, (mean, sd) in enumerate(zip(means, sds), start=1):
        color = 2.5 * np.log10(fluxes[:, b] / fluxes[:, 0])
        assert stats.kstest(color, stats.norm(mean, sd).cdf).pvalue > P_MIN
    # colours are independent of the reference flux and of each other
    log_ref = np.log(fluxes[:, 0])
    c1 = 2.5 * np.log10(fluxes[:, 1] / fluxes[:, 0])
    c2 = 2.5 * np.log10(fluxes[:, 2] / fluxes[:, 0])
    for a, b in ((log_ref, c1), (log_ref, c2), (c1, c2)):
        assert stats.pearsonr(a, b).pvalue > P_MIN


def test_zero_color_sd_fixes_the_ratio():
    prior = StarFieldPrior(color_mean=-1.0, color_sd=0.0)
    fluxes = prior.sample_fluxes(100, generator=generator(5)).double()
    np.testing.assert_allclose(fluxes[:, 1] / fluxes[:, 0], 10 ** (-1.0 / 2.5), rtol=1e-6)


def test_single_band():
    prior = StarFieldPrior(bands=['r'])
    assert prior.color_mean == [] and prior.color_sd == []
    catalog = prior.sample((20, 20), seed=0)
    assert catalog.colnames == ['x', 'y', 'flux_r']


@pytest.mark.parametrize('margin', [0.0, 3.0])
def test_positions_uniform_over_extended_image(margin):
    rows, cols = 20, 30
    prior = StarFieldPrior(mu=0.2)
    batch = prior.sample_batch(100, (rows, cols), margin=margin, generator=generator(6))
    locs = batch.locs[batch.mask].double().numpy()
    # the image covers pixel edges -0.5 .. n - 0.5, extended by the margin
    for values, n in ((locs[:, 0], cols), (locs[:, 1], rows)):
        low, width = -0.5 - margin, n + 2 * margin
        assert values.min() >= low and values.max() <= low + width
        assert stats.kstest(values, stats.uniform(low, width).cdf).pvalue > P_MIN
    assert stats.pearsonr(locs[:, 0], locs[:, 1]).pvalue > P_MIN
    if margin:
        assert np.any(locs < -0.5)


def test_same_seed_same_catalog():
    prior = StarFieldPrior(mu=0.1)
    first = prior.sample((40, 40), seed=11)
    again = prior.sample((40, 40), seed=11)
    other = prior.sample((40, 40), seed=12)
    assert len(first) > 0
    for name in first.colnames:
        np.testing.assert_array_equal(first[name], again[name])
    assert len(other) != len(first) or not np.array_equal(other['x'], first['x'])
    # a numpy Generator is accepted as the seed
    from_rng = prior.sample((40, 40), seed=np.random.default_rng(3))
    from_rng_again = prior.sample((40, 40), seed=np.random.default_rng(3))
    np.testing.assert_array_equal(from_rng['flux_i'], from_rng_again['flux_i'])


def test_catalog_table_columns_and_units():
    prior = StarFieldPrior(mu=0.1, bands=('g', 'r', 'i'))
    catalog = prior.sample((30, 30), seed=2)
    assert isinstance(catalog, QTable)
    assert catalog.colnames == ['x', 'y', 'flux_g', 'flux_r', 'flux_i']
    assert not hasattr(catalog['x'], 'unit') or catalog['x'].unit is None
    for band in 'gri':
        assert catalog[f'flux_{band}'].unit == u.electron
        assert catalog[f'flux_{band}'].dtype == np.float64
    assert np.all(catalog['flux_g'] >= 1000 * u.electron)
    assert np.all((catalog['x'] >= -0.5) & (catalog['x'] <= 29.5))


def test_batch_to_table_and_catalog_table():
    prior = StarFieldPrior(mu=0.1)
    batch = prior.sample_batch(3, (10, 10), generator=generator(7))
    for index in range(3):
        table = batch_to_table(batch, index, prior.bands)
        n = int(batch.n_stars[index])
        assert len(table) == n
        np.testing.assert_array_equal(table['x'], batch.locs[index, :n, 0].double().numpy())
        np.testing.assert_array_equal(table['y'], batch.locs[index, :n, 1].double().numpy())
        np.testing.assert_array_equal(table['flux_i'].value,
                                      batch.fluxes[index, :n, 1].double().numpy())
    # an explicit mask selects those slots instead
    keep = torch.zeros(batch.mask.shape[1], dtype=torch.bool)
    keep[0] = True
    table = batch_to_table(batch, 0, prior.bands, mask=keep)
    assert len(table) == 1 and table['x'][0] == pytest.approx(float(batch.locs[0, 0, 0]))
    table = catalog_table(torch.tensor([[1.5, 2.5]]), torch.tensor([[10.0, 20.0]]), ['a', 'b'])
    assert table.colnames == ['x', 'y', 'flux_a', 'flux_b']
    assert (table['x'][0], table['y'][0]) == (1.5, 2.5)
    assert table['flux_b'][0] == 20.0 * u.electron


def test_dict_round_trip():
    prior = StarFieldPrior(mu=0.05, f_min=300.0, f_max=5e4, alpha=0.8, color_mean=[0.2, 0.4],
                           color_sd=[0.5, 0.3], bands=('g', 'r', 'i'))
    settings = json.loads(json.dumps(prior.to_dict()))
    assert settings == {'mu': 0.05, 'f_min': 300.0, 'f_max': 5e4, 'alpha': 0.8,
                        'color_mean': [0.2, 0.4], 'color_sd': [0.5, 0.3],
                        'bands': ['g', 'r', 'i']}
    copy = StarFieldPrior.from_dict(settings)
    assert repr(copy) == repr(prior)
    assert 'mu=0.05' in repr(prior) and "bands=['g', 'r', 'i']" in repr(prior)
    np.testing.assert_array_equal(copy.sample((20, 20), seed=1)['flux_i'],
                                  prior.sample((20, 20), seed=1)['flux_i'])


def test_validation_errors():
    with pytest.raises(ValueError, match=r'mu \(stars per pixel\) must be positive, got 0'):
        StarFieldPrior(mu=0)
    with pytest.raises(ValueError, match='must be positive, got -0.1'):
        StarFieldPrior(mu=-0.1)
    with pytest.raises(ValueError, match='need 0 < f_min < f_max, got f_min=1000.0, f_max=1000.0'):
        StarFieldPrior(f_min=1000.0, f_max=1000.0)
    with pytest.raises(ValueError, match='need 0 < f_min < f_max'):
        StarFieldPrior(f_min=2000.0, f_max=1000.0)
    with pytest.raises(ValueError, match='need 0 < f_min < f_max'):
        StarFieldPrior(f_min=0.0)
    with pytest.raises(ValueError, match='alpha must be positive'):
        StarFieldPrior(alpha=0.0)
    with pytest.raises(ValueError, match=r'color_mean needs 1 or 2 values .* got 3'):
        StarFieldPrior(bands=('g', 'r', 'i'), color_mean=[0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match=r'color_sd needs 1 or 1 values .* got 2'):
        StarFieldPrior(color_sd=[1.0, 1.0])
    with pytest.raises(ValueError, match='color_sd must be non-negative'):
        StarFieldPrior(color_sd=-1.0)
    with pytest.raises(ValueError, match='distinct names'):
        StarFieldPrior(bands=('r', 'i', 'r'))
    with pytest.raises(ValueError, match='non-empty'):
        StarFieldPrior(bands=())


def test_per_image_upper_flux_and_index_give_each_catalog_its_pareto():
    """Catalogs drawn with their own f_max and alpha: every flux stays below its
    catalog's f_max, and each group of catalogs follows its truncated Pareto."""
    prior = StarFieldPrior(f_min=1000.0, bands=('r',))
    f_max = torch.tensor([1e5, 1e7] * 100, dtype=torch.float64)
    alpha = torch.tensor([0.4, 0.8] * 100, dtype=torch.float64)
    batch = prior.sample_batch(200, (20, 20), mu=0.25, f_max=f_max, alpha=alpha,
                               generator=generator(7))
    flux = batch.fluxes[..., 0].double()
    assert bool((flux[batch.mask] <= (f_max[:, None].expand_as(flux)[batch.mask]) * 1.000001)
                .all())
    for k, (top, index) in enumerate([(1e5, 0.4), (1e7, 0.8)]):
        fluxes = flux[k::2][batch.mask[k::2]].numpy()
        assert stats.kstest(fluxes, truncated_pareto_cdf,
                            args=(1000.0, top, index)).pvalue > P_MIN
    with pytest.raises(ValueError, match='f_max > f_min'):
        prior.sample_fluxes(3, f_max=torch.full((3,), 500.0))


def test_prior_descriptor_is_zero_at_the_m2_prior_and_orders_the_bright_end():
    from starnet.prior import PRIOR_FEATURES, prior_descriptor
    m2 = StarFieldPrior()
    assert m2.descriptor().shape == (1, PRIOR_FEATURES)
    assert torch.equal(m2.descriptor(), torch.zeros(1, PRIOR_FEATURES))
    both = prior_descriptor(torch.tensor([1e5, 1e7]), 0.75)
    np.testing.assert_allclose(both.numpy(), [[-1.0, 1.0], [1.0, 1.0]], atol=1e-6)
