import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import log_softmax, logit, logsumexp, softmax

from starnet.posterior import (TiledPosterior, _poisson_rate, contract_counts, convolve_counts,
                               count_distribution, density_mixture, pair_covariance,
                               poisson_tail, side_correlations)
from starnet.tiles import TileCatalog

MAX_SOURCES = 3
N_SLOTS = 6          # rows 1, 2, 3 of the triangular array
ROW_SLOTS = {1: [0], 2: [1, 2], 3: [3, 4, 5]}


def random_parameters(rng, shape, n_bands):
    """Posterior parameters (numpy, float64) for a grid of tiles of ``shape``."""
    return dict(count_logits=rng.normal(0, 1, (*shape, MAX_SOURCES + 1)),
                loc_mean=rng.normal(0, 1, (*shape, N_SLOTS, 2)),
                loc_sd=rng.uniform(0.3, 1.5, (*shape, N_SLOTS, 2)),
                log_flux_mean=rng.normal(8, 1, (*shape, N_SLOTS, n_bands)),
                log_flux_sd=rng.uniform(0.2, 1.0, (*shape, N_SLOTS, n_bands)))


def posterior_of(params):
    return TiledPosterior(**{key: torch.tensor(value) for key, value in params.items()})


def random_tiles(rng, shape, n_bands):
    """Tile variables (numpy) with random counts 0..3, padded like `TileGrid.to_tiles`."""
    counts = rng.integers(0, MAX_SOURCES + 1, shape)
    locs = np.full((*shape, MAX_SOURCES, 2), 0.5)
    fluxes = np.ones((*shape, MAX_SOURCES, n_bands))
    for index in np.ndindex(*shape):
        n = counts[index]
        locs[index][:n] = rng.uniform(0.02, 0.98, (n, 2))
        fluxes[index][:n] = np.exp(rng.normal(8, 1.5, (n, n_bands)))
    return counts, locs, fluxes


def tile_catalog(counts, locs, fluxes):
    return TileCatalog(counts=torch.tensor(counts), locs=torch.tensor(locs),
                       fluxes=torch.tensor(fluxes), n_dropped=0)


def brute_force_log_prob(params, index, n, locs, fluxes):
    """log q of a tile with n sources: log q(n) + log sum over the n! orderings."""
    log_q_n = log_softmax(params['count_logits'][index])[n]
    if n == 0:
        return log_q_n
    slots = ROW_SLOTS[n]
    terms = []
    for perm in itertools.permutations(range(n)):
        term = 0.0
        for k, source in enumerate(perm):
            slot = slots[k]
            u = locs[source]
            # logit-normal density of u: norm.pdf(logit(u); m, s) / (u (1 - u))
            term += np.sum(stats.norm.logpdf(logit(u), params['loc_mean'][index][slot],
                                             params['loc_sd'][index][slot])
                           - np.log(u) - np.log1p(-u))
            term += np.sum(stats.lognorm.logpdf(
                fluxes[source], params['log_flux_sd'][index][slot],
                scale=np.exp(params['log_flux_mean'][index][slot])))
        terms.append(term)
    return log_q_n + logsumexp(terms)


@pytest.mark.parametrize('n_bands', [1, 2])
def test_log_prob_brute_force(n_bands):
    rng = np.random.default_rng(n_bands)
    shape = (2, 3, 4)
    params = random_parameters(rng, shape, n_bands)
    counts, locs, fluxes = random_tiles(rng, shape, n_bands)
    for n in range(MAX_SOURCES + 1):    # every count appears
        counts[0, 0, n] = n
        locs[0, 0, n] = 0.5
        fluxes[0, 0, n] = 1.0
        locs[0, 0, n, :n] = rng.uniform(0.02, 0.98, (n, 2))
        fluxes[0, 0, n, :n] = np.exp(rng.normal(8, 1.5, (n, n_bands)))
    result = posterior_of(params).log_prob(tile_catalog(counts, locs, fluxes))
    assert result.shape == shape
    for index in np.ndindex(*shape):
        n = counts[index]
        expected = brute_force_log_prob(params, index, n, locs[index], fluxes[index])
        np.testing.assert_allclose(result[index].item(), expected, rtol=1e-9, atol=1e-9)


def test_log_prob_invariant_to_order_within_tile():
    rng = np.random.default_rng(5)
    shape = (1, 4, 5)
    params = random_parameters(rng, shape, 2)
    counts, locs, fluxes = random_tiles(rng, shape, 2)
    posterior = posterior_of(params)
    before = posterior.log_prob(tile_catalog(counts, locs, fluxes))
    shuffled_locs, shuffled_fluxes = locs.copy(), fluxes.copy()
    for index in np.ndindex(*shape):
        n = counts[index]
        perm = rng.permutation(n)
        shuffled_locs[index][:n] = locs[index][perm]
        shuffled_fluxes[index][:n] = fluxes[index][perm]
    assert not np.array_equal(shuffled_locs, locs)
    after = posterior.log_prob(tile_catalog(counts, shuffled_locs, shuffled_fluxes))
    np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-12)


def test_log_prob_ignores_padded_slots():
    rng = np.random.default_rng(6)
    shape = (1, 2, 2)
    params = random_parameters(rng, shape, 1)
    counts, locs, fluxes = random_tiles(rng, shape, 1)
    counts[0, 0, :] = [1, 2]
    posterior = posterior_of(params)
    before = posterior.log_prob(tile_catalog(counts, locs, fluxes))
    locs[0, 0, 0, 1:] = 0.123      # slots beyond each tile's count
    fluxes[0, 0, 1, 2:] = 7.0
    after = posterior.log_prob(tile_catalog(counts, locs, fluxes))
    np.testing.assert_array_equal(after.numpy(), before.numpy())


def test_log_prob_of_mixed_types_and_a_count_no_tile_holds():
    """Row n is evaluated on the tiles holding n stars only: with no tile of two stars,
    float32 parameters and float64 tile variables, it is the float64 density (to
    float32 rounding), in the parameters' type."""
    rng = np.random.default_rng(8)
    shape = (2, 3, 3)
    params = random_parameters(rng, shape, 2)
    counts, locs, fluxes = random_tiles(rng, shape, 2)
    counts[counts == 2] = 3
    locs[..., 2, :] = rng.uniform(0.02, 0.98, locs[..., 2, :].shape)
    fluxes[..., 2, :] = np.exp(rng.normal(8, 1.5, fluxes[..., 2, :].shape))
    exact = posterior_of(params).log_prob(tile_catalog(counts, locs, fluxes))
    single = TiledPosterior(**{key: torch.tensor(value, dtype=torch.float32)
                               for key, value in params.items()})
    result = single.log_prob(tile_catalog(counts, locs, fluxes))
    assert result.dtype == torch.float32 and set(np.unique(counts)) == {0, 1, 3}
    np.testing.assert_allclose(result.numpy(), exact.numpy(), rtol=1e-5, atol=1e-4)


def test_log_prob_is_differentiable():
    rng = np.random.default_rng(7)
    params = {k: torch.tensor(v, requires_grad=True)
              for k, v in random_parameters(rng, (1, 2, 2), 2).items()}
    counts, locs, fluxes = random_tiles(rng, (1, 2, 2), 2)
    TiledPosterior(**params).log_prob(tile_catalog(counts, locs, fluxes)).sum().backward()
    for value in params.values():
        assert torch.all(torch.isfinite(value.grad))


def identical_tiles(rng, n_tiles, n_bands):
    """One tile's parameters repeated over a (1, 1, n_tiles) grid: each tile is a draw."""
    one = random_parameters(rng, (), n_bands)
    return one, {key: np.broadcast_to(value, (1, 1, n_tiles, *value.shape)).copy()
                 for key, value in one.items()}


def test_sample_moments():
    rng = np.random.default_rng(8)
    n_draws = 20000
    one, params = identical_tiles(rng, n_draws, 2)
    sample = posterior_of(params).sample(generator=torch.Generator().manual_seed(1))
    counts = sample.counts[0, 0].numpy()

    probs = softmax(one['count_logits'])
    frequencies = np.bincount(counts, minlength=MAX_SOURCES + 1) / n_draws
    np.testing.assert_allclose(frequencies, probs,
                               atol=5 * np.sqrt(probs * (1 - probs) / n_draws).max())

    for n in range(1, MAX_SOURCES + 1):
        chosen = counts == n
        n_chosen = chosen.sum()
        assert n_chosen > 1000
        z = logit(sample.locs[0, 0][chosen][:, :n].numpy().astype(float))
        w = np.log(sample.fluxes[0, 0][chosen][:, :n].numpy().astype(float))
        for values, mean, sd in [(z, one['loc_mean'], one['loc_sd']),
                                 (w, one['log_flux_mean'], one['log_flux_sd'])]:
            expected_mean = mean[ROW_SLOTS[n]]
            expected_sd = sd[ROW_SLOTS[n]]
            np.testing.assert_allclose(values.mean(0), expected_mean,
                                       atol=5 * expected_sd.max() / np.sqrt(n_chosen))
            np.testing.assert_allclose(values.std(0), expected_sd,
                                       atol=5 * expected_sd.max() / np.sqrt(2 * n_chosen))
        # slots beyond the count are padded as in TileGrid.to_tiles
        assert np.all(sample.locs[0, 0][chosen][:, n:].numpy() == 0.5)
        assert np.all(sample.fluxes[0, 0][chosen][:, n:].numpy() == 1.0)


def test_sample_same_generator_seed_same_draw():
    params = random_parameters(np.random.default_rng(9), (2, 3, 3), 1)
    posterior = posterior_of(params)
    first = posterior.sample(generator=torch.Generator().manual_seed(3))
    second = posterior.sample(generator=torch.Generator().manual_seed(3))
    third = posterior.sample(generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.locs, second.locs) and torch.equal(first.counts, second.counts)
    assert not torch.equal(first.locs, third.locs)


def test_mode():
    rng = np.random.default_rng(10)
    shape = (2, 3, 4)
    params = random_parameters(rng, shape, 2)
    mode = posterior_of(params).mode()
    for index in np.ndindex(*shape):
        n = int(np.argmax(params['count_logits'][index]))
        assert mode.counts[index] == n
        slots = ROW_SLOTS.get(n, [])
        np.testing.assert_allclose(mode.locs[index][:n].numpy(),
                                   1 / (1 + np.exp(-params['loc_mean'][index][slots])))
        np.testing.assert_allclose(mode.fluxes[index][:n].numpy(),
                                   np.exp(params['log_flux_mean'][index][slots]))
        assert np.all(mode.locs[index][n:].numpy() == 0.5)
        assert np.all(mode.fluxes[index][n:].numpy() == 1.0)


def test_row_parameters():
    rng = np.random.default_rng(11)
    shape = (1, 2, 3)
    params = random_parameters(rng, shape, 2)
    counts = np.array([[[0, 1, 2], [3, 2, 1]]])
    result = posterior_of(params).row_parameters(torch.tensor(counts))
    names = ['loc_mean', 'loc_sd', 'log_flux_mean', 'log_flux_sd']
    for name, value in zip(names, result):
        assert value.shape == (*shape, MAX_SOURCES, params[name].shape[-1])
        for index in np.ndindex(*shape):
            n = counts[index]
            np.testing.assert_allclose(value[index][:n].numpy(),
                                       params[name][index][ROW_SLOTS.get(n, [])], rtol=1e-6)


def convolve_chain(probs):
    pmf = np.array([1.0])
    for tile in probs:
        pmf = np.convolve(pmf, tile)
    return pmf


@pytest.mark.parametrize(('n_tiles', 'n_counts'), [(1, 4), (5, 4), (7, 2), (2500, 4)])
def test_count_distribution_is_convolution(n_tiles, n_counts):
    rng = np.random.default_rng(n_tiles)
    probs = rng.dirichlet(np.full(n_counts, 0.5), n_tiles)
    probs[0] = np.eye(n_counts)[0]      # a tile certainly empty
    pmf = count_distribution(probs)
    assert pmf.shape == (n_tiles * (n_counts - 1) + 1,)
    np.testing.assert_allclose(pmf, convolve_chain(probs), atol=1e-12)
    np.testing.assert_allclose(pmf.sum(), 1.0, rtol=1e-12)
    tile_means = probs @ np.arange(n_counts)
    np.testing.assert_allclose(pmf @ np.arange(len(pmf)), tile_means.sum(), rtol=1e-9)


def test_count_distribution_accepts_grid_and_tensor():
    probs = np.random.default_rng(12).dirichlet(np.ones(4), (2, 3))
    expected = convolve_chain(probs.reshape(-1, 4))
    np.testing.assert_allclose(count_distribution(probs), expected, atol=1e-12)
    np.testing.assert_allclose(count_distribution(torch.tensor(probs)), expected, atol=1e-12)


def test_count_distribution_certain_counts():
    probs = np.eye(4)[[3, 1, 0, 2]]
    np.testing.assert_allclose(count_distribution(probs), np.eye(13)[6], atol=1e-12)


@pytest.mark.parametrize("spread", [0.05, 0.3])
def test_density_mixture_of_a_poisson_pmf_is_poisson_lognormal(spread):
    """A Poisson(lam) pmf tilted by exp(delta n) is Poisson(lam e^delta): mixed over
    delta ~ Normal(-s^2 / 2, s^2) it has the Poisson-lognormal mean lam (that of the pmf)
    and variance lam + lam^2 (e^(s^2) - 1)."""
    lam, k = 80.0, np.arange(1000)
    mixed = density_mixture(stats.poisson.pmf(k, lam), spread)
    mean = np.dot(k, mixed)
    variance = np.dot((k - mean) ** 2, mixed)
    expected_mean = lam
    expected_variance = lam + lam ** 2 * (np.exp(spread ** 2) - 1)
    assert np.isclose(mixed.sum(), 1.0)
    assert np.isclose(mean, expected_mean, rtol=1e-6)
    assert np.isclose(variance, expected_variance, rtol=1e-4)


def test_density_mixture_is_the_count_of_tiles_tilted_together():
    """Drawing one offset delta, then each tile's count from its pmf tilted by exp(delta
    n), gives totals distributed as the mixture of the tiles' convolution: tilting the
    sum is tilting every tile by the same factor."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=60)
    spread, n_draws = 0.4, 40_000
    delta = rng.normal(-spread ** 2 / 2, spread, n_draws)
    tilted = probs[None] * np.exp(delta[:, None, None] * np.arange(4))
    tilted /= tilted.sum(-1, keepdims=True)
    cdf = np.cumsum(tilted, -1)
    counts = (rng.random((n_draws, 60, 1)) > cdf).sum(-1).sum(-1)
    mixed = density_mixture(count_distribution(probs), spread)
    k = np.arange(len(mixed))
    mean, variance = np.dot(k, mixed), np.dot(k ** 2, mixed) - np.dot(k, mixed) ** 2
    # four standard errors of the sample mean; of the sample variance (normal
    # approximation, sqrt(2 / n) of the variance), six for the tails' excess
    assert abs(counts.mean() - mean) < 4 * np.sqrt(variance / n_draws)
    assert abs(counts.var() - variance) < 6 * variance * np.sqrt(2 / n_draws)
    independent = count_distribution(probs)
    assert variance > 1.5 * (np.dot(k ** 2, independent) - np.dot(k, independent) ** 2)


def test_density_mixture_without_spread_and_bad_spread():
    pmf = np.array([0.2, 0.5, 0.3])
    np.testing.assert_array_equal(density_mixture(pmf, 0.0), pmf)
    with pytest.raises(ValueError, match="spread must be"):
        density_mixture(pmf, -0.1)


def spread_posterior(rng, shape, cells, n_bands=1, spreads=(0.2, 0.6)):
    """A posterior of one image with a random spread per tile and cells of ``cells``."""
    params = {key: torch.tensor(value)
              for key, value in random_parameters(rng, (1, *shape), n_bands).items()}
    spread = torch.tensor(rng.uniform(*spreads, (1, *shape)))
    return TiledPosterior(**params, spread=spread, density_cells=cells)


@pytest.mark.parametrize("cells, spreads", [(4, (0.2, 0.6)), (8, (1.0, 1.5))])
def test_count_pmf_with_a_density_spread_is_that_of_the_draws(cells, spreads):
    """Counts drawn by `sample` (an offset per cell, then the tiles' counts from their
    tilted categorical probabilities) follow `count_pmf` (a Gauss-Hermite mixture per
    cell, convolved over the cells), for the whole grid and for a region that cuts
    cells; partial cells at the edges share the mean spread of their tiles. The second
    case, spreads of 1 to 1.5 in cells whose count has a standard deviation near 7, tilts
    the pmfs far into the tails that `count_distribution` trims, so the tiles are tilted."""
    rng = np.random.default_rng(3)
    q = spread_posterior(rng, (6, 10), cells, spreads=spreads)
    n_draws = 20_000
    counts = q.expand(n_draws).sample(generator=torch.Generator().manual_seed(1)).counts
    region = np.zeros((6, 10), bool)
    region[1:5, 3:9] = True
    for tiles, drawn in ((None, counts.sum((1, 2))),
                         (region, counts[:, torch.from_numpy(region)].sum(1))):
        pmf = q.count_pmf(tiles)
        frequencies = np.bincount(drawn.numpy(), minlength=len(pmf)) / n_draws
        # Kolmogorov-Smirnov: 1.63 / sqrt(n) is the 1 % critical distance
        assert np.abs(np.cumsum(frequencies) - np.cumsum(pmf)).max() < 1.63 / np.sqrt(n_draws)
    plain = TiledPosterior(q.count_logits, q.loc_mean, q.loc_sd, q.log_flux_mean,
                           q.log_flux_sd).count_pmf()
    pmf = q.count_pmf()
    k = np.arange(len(pmf))
    variance = np.dot(k ** 2, pmf) - np.dot(k, pmf) ** 2
    assert variance > 1.2 * (np.dot(k ** 2, plain) - np.dot(k, plain) ** 2)


def test_cell_spread_is_the_mean_over_each_cell():
    rng = np.random.default_rng(4)
    q = spread_posterior(rng, (6, 10), 4)
    cells = q.cell_spread()
    assert cells.shape == (1, 2, 3)
    assert torch.isclose(cells[0, 1, 2], q.spread[0, 4:, 8:].mean())
    assert torch.isclose(cells[0, 0, 1], q.spread[0, :4, 4:8].mean())


def test_posterior_operations_keep_the_spread():
    """Joining blocks of whole cells, selecting, moving and expanding keep the spread,
    so the count pmf of the joined blocks is the whole grid's."""
    rng = np.random.default_rng(5)
    q = spread_posterior(rng, (6, 10), 4)
    halves = [q._rebuild(lambda t: t[:, :, :8]), q._rebuild(lambda t: t[:, :, 8:])]
    joined = TiledPosterior.concatenate(halves, dim=2)
    np.testing.assert_allclose(joined.count_pmf(), q.count_pmf(), atol=1e-12)
    assert q.expand(3).spread.shape == (3, 6, 10)
    assert torch.equal(q.expand(3).image(2).spread, q.spread)
    mask = torch.zeros(1, 6, 10, dtype=torch.bool)
    other = spread_posterior(rng, (6, 10), 4)
    assert torch.equal(q.where(mask, other).spread, other.spread)
    assert len(q.count_parts()) == 6
    no_spread = TiledPosterior(q.count_logits, q.loc_mean, q.loc_sd, q.log_flux_mean,
                               q.log_flux_sd)
    assert len(no_spread.count_parts()) == 1 and no_spread.cell_spread() is None
    np.testing.assert_allclose(no_spread.count_pmf(),
                               count_distribution(no_spread.count_probs[0].reshape(-1, 4)),
                               atol=1e-12)
    with pytest.raises(ValueError, match="spread and density_cells go together"):
        TiledPosterior(q.count_logits, q.loc_mean, q.loc_sd, q.log_flux_mean, q.log_flux_sd,
                       spread=q.spread)


def _moments(offset, pmf):
    k = offset + np.arange(len(pmf))
    return pmf.sum(), np.dot(k, pmf), np.dot(k ** 2, pmf) - np.dot(k, pmf) ** 2


@pytest.mark.parametrize("offset, pmf, change", [
    (0, stats.poisson.pmf(np.arange(80), 30.0), -12.0),
    (5, stats.binom.pmf(np.arange(41), 40, 0.1), -1.0),
    (0, count_distribution(np.tile([[0.9, 0.08, 0.02, 0.0]], (30, 1))), -0.9),
    (3, np.array([0.2, 0.5, 0.3]), -0.2),
    (3, np.array([0.2, 0.5, 0.3]), -0.45),
])
def test_contract_counts_keeps_the_mean_and_reaches_the_variance(offset, pmf, change):
    """The contracted pmf sums to 1, has the same mean and the variance ``V + change``
    (the last case, variance 0.49, asks for 0.04: less than the 0.09 a pmf of mean 4.1
    on the integers can have, so it gets that least-variance pmf, on 4 and 5 only)."""
    total, mean, variance = _moments(offset, pmf)
    new_offset, new = contract_counts(offset, pmf, change)
    assert (new >= 0).all()
    new_total, new_mean, new_variance = _moments(new_offset, new)
    assert new_total == pytest.approx(1.0, abs=1e-12)
    assert new_mean == pytest.approx(mean, abs=1e-9)
    least = (mean % 1) * (1 - mean % 1)
    assert new_variance == pytest.approx(max(variance + change, least), abs=1e-8)
    if variance + change < least:
        assert new_offset == int(mean) and len(new) == 2


def test_contract_counts_without_change_and_refusals():
    pmf = stats.poisson.pmf(np.arange(20), 4.0)
    offset, same = contract_counts(2, pmf, 0.0)
    assert offset == 2 and np.array_equal(same, pmf)
    for change in (0.5, float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="change must be a finite number <= 0"):
            contract_counts(0, pmf, change)


def test_pair_covariance_is_the_sum_over_side_pairs_inside_the_region():
    """Against a loop over all pairs of tiles that share a side, both inside the region."""
    rng = np.random.default_rng(6)
    variance = rng.uniform(0, 1, (5, 7))
    rho = rng.uniform(-0.25, 0, (5, 7, 2))
    region = rng.random((5, 7)) < 0.7
    expected = 0.0
    for i, j in itertools.product(range(5), range(7)):
        for (di, dj), axis in (((0, 1), 0), ((1, 0), 1)):
            if i + di < 5 and j + dj < 7 and region[i, j] and region[i + di, j + dj]:
                expected += rho[i, j, axis] * np.sqrt(variance[i, j] * variance[i + di, j + dj])
    assert pair_covariance(variance, rho, region) == pytest.approx(expected, rel=1e-12)
    whole = sum(rho[i, j, 0] * np.sqrt(variance[i, j] * variance[i, j + 1])
                for i in range(5) for j in range(6)) \
        + sum(rho[i, j, 1] * np.sqrt(variance[i, j] * variance[i + 1, j])
              for i in range(4) for j in range(7))
    assert pair_covariance(variance, rho) == pytest.approx(whole, rel=1e-12)


def pair_posterior(rng, shape, *, cells=None):
    params = {key: torch.tensor(value)
              for key, value in random_parameters(rng, (1, *shape), 1).items()}
    weights = torch.tensor(rng.dirichlet(np.ones(5), (1, *shape))[..., :4])
    spread = None if cells is None else torch.tensor(rng.uniform(0.1, 0.3, (1, *shape)))
    return TiledPosterior(**params, spread=spread, density_cells=cells, pair_weights=weights)


@pytest.mark.parametrize("cells", [None, 4])
def test_count_pmf_with_pair_correlations_has_the_pairs_variance(cells):
    """The count of the whole grid and of a region has the mean of the tiles (or cells)
    and their variance plus twice the covariances of the side pairs inside it (by a
    loop here); each tile's variance and the joined halves' pmf are unchanged."""
    rng = np.random.default_rng(7)
    q = pair_posterior(rng, (6, 10), cells=cells)
    plain = q._rebuild(lambda t: t)
    plain.pair_weights = None
    region = np.zeros((6, 10), bool)
    region[1:5, 3:9] = True
    variance = q.count_variance[0].numpy()
    weights = q.pair_weights[0].numpy()
    rho = np.zeros((6, 10, 2))     # minus the smaller weight on the shared side
    rho[:, :-1, 0] = -np.minimum(weights[:, :-1, 0], weights[:, 1:, 2])
    rho[:-1, :, 1] = -np.minimum(weights[:-1, :, 1], weights[1:, :, 3])
    np.testing.assert_allclose(side_correlations(q.pair_weights)[0].numpy(), rho)
    for tiles in (None, region):
        inside = np.ones((6, 10), bool) if tiles is None else tiles
        covariance = sum(rho[i, j, 0] * np.sqrt(variance[i, j] * variance[i, j + 1])
                         for i in range(6) for j in range(9) if inside[i, j] and inside[i, j + 1])
        covariance += sum(rho[i, j, 1] * np.sqrt(variance[i, j] * variance[i + 1, j])
                          for i in range(5) for j in range(10) if inside[i, j] and inside[i + 1, j])
        _, mean, independent = _moments(0, plain.count_pmf(tiles))
        total, new_mean, new_variance = _moments(0, q.count_pmf(tiles))
        assert total == pytest.approx(1.0, abs=1e-12)
        assert new_mean == pytest.approx(mean, abs=1e-9)
        assert covariance < -0.05 * independent
        assert new_variance == pytest.approx(independent + 2 * covariance, abs=1e-8)
    halves = [q._rebuild(lambda t: t[:, :, :8]), q._rebuild(lambda t: t[:, :, 8:])]
    joined = TiledPosterior.concatenate(halves, dim=2)
    np.testing.assert_allclose(joined.count_pmf(), q.count_pmf(), atol=1e-12)
    assert torch.equal(q.expand(2).image(1).pair_weights, q.pair_weights)
    with pytest.raises(ValueError, match="with and without pair correlations"):
        TiledPosterior.concatenate([halves[0], plain._rebuild(lambda t: t[:, :, 8:])], dim=2)


@pytest.mark.parametrize("rate", [0.05, 0.8, 3.0])
def test_poisson_tail_is_the_poisson_beyond_the_top_count(rate):
    """A tile certain to hold ``max_sources`` or more gets the Poisson pmf given at least
    ``max_sources`` (scipy), to the cut; the other counts keep their probabilities."""
    probs = np.array([[0.0, 0.0, 0.0, 1.0], [0.4, 0.3, 0.2, 0.1]])
    tailed = poisson_tail(probs, np.full(2, rate))
    k = np.arange(tailed.shape[1])
    expected = stats.poisson.pmf(k, rate) * (k >= 3) / stats.poisson.sf(2, rate)
    np.testing.assert_allclose(tailed[0], expected, atol=1e-12)
    np.testing.assert_allclose(tailed[1, :3], [0.4, 0.3, 0.2])
    np.testing.assert_allclose(tailed[1, 3:], 0.1 * expected[3:], atol=1e-12)
    np.testing.assert_allclose(tailed.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="rate must broadcast"):
        poisson_tail(probs, np.full(3, rate))
    with pytest.raises(ValueError, match="at least 2 counts per tile"):
        poisson_tail(np.ones((2, 1)), np.full(2, rate))
    with pytest.raises(ValueError, match="finite and positive"):
        poisson_tail(probs, np.array([rate, -1.0]))


def test_poisson_tail_of_one_rate_for_all_tiles_and_of_a_large_rate():
    """A scalar rate serves every tile (cut where the likeliest tile's tail ends, not each
    tile's own: a difference below the cut); a rate of 100 keeps its whole tail."""
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
    np.testing.assert_allclose(poisson_tail(probs, np.array(0.8)),
                               poisson_tail(probs, np.full(2, 0.8)), atol=1e-12)
    tailed = poisson_tail(np.array([0.0, 0.0, 0.0, 1.0]), np.array(100.0))
    assert np.dot(np.arange(len(tailed)), tailed) == pytest.approx(100.0, rel=1e-9)


def test_count_tail_of_a_region_ignores_the_cells_outside_it():
    """Each cell's tail is cut at its own width: saturating a cell outside a region leaves
    the region's count pmf as it was, with a wide density spread too."""
    rng = np.random.default_rng(8)
    params = {key: torch.tensor(value)
              for key, value in random_parameters(rng, (1, 8, 16), 1).items()}
    crowded = {**params, "count_logits": params["count_logits"].clone()}
    crowded["count_logits"][0, :, 12:, 3] += 8.0
    region = np.zeros((8, 16), bool)
    region[:4, :4] = True
    pmfs = [TiledPosterior(**p, spread=torch.full((1, 8, 16), 0.8), density_cells=4,
                           count_tail=True).count_pmf(region) for p in (params, crowded)]
    np.testing.assert_allclose(pmfs[0], pmfs[1], atol=1e-12)


def test_poisson_rate_inverts_the_cut_mean():
    rates = np.array([1e-4, 0.05, 0.8, 3.0, 9.0])
    k = np.arange(3)
    cut = 3 - np.sum((3 - k) * stats.poisson.pmf(k, rates[:, None]), axis=1)
    np.testing.assert_allclose(_poisson_rate(cut, 3, largest=50.0), rates, rtol=1e-6)
    # a cell at (or within rounding of) three per tile reads no finite rate: the limit
    np.testing.assert_allclose(_poisson_rate(np.array([3.0, 2.9999999]), 3, largest=6.0),
                               6.0, rtol=1e-6)


def test_count_tail_adds_each_cells_poisson_excess():
    """With a count tail and no spread, the count pmf is the convolution of each tile's
    pmf with its top count's Poisson tail at the density of its cell (a rate whose cut
    mean is the cell's mean count): its mean is the tiles' plus, for each tile, q(3)
    times the Poisson excess E[n - 3 | n >= 3] of its cell (scipy), and a region counts
    its own tiles' tails."""
    rng = np.random.default_rng(6)
    params = {key: torch.tensor(value)
              for key, value in random_parameters(rng, (1, 6, 10), 1).items()}
    params["count_logits"][..., 3] += 1.5           # crowded tiles
    q = TiledPosterior(**params, spread=torch.zeros(1, 6, 10), density_cells=4,
                       count_tail=True)
    plain = TiledPosterior(**params, spread=torch.zeros(1, 6, 10), density_cells=4)
    probs = q.count_probs[0].numpy()
    tile_means = probs @ np.arange(4)
    excess = np.zeros((6, 10))
    for rows in (slice(0, 4), slice(4, 6)):
        for cols in (slice(0, 4), slice(4, 8), slice(8, 10)):
            rate = _poisson_rate(tile_means[rows, cols].mean(), 3, largest=6.0)
            k = np.arange(3, 200)
            tail = stats.poisson.pmf(k, rate) / stats.poisson.sf(2, rate)
            excess[rows, cols] = np.dot(k - 3, tail)
    region = np.zeros((6, 10), bool)
    region[1:5, 3:9] = True
    for tiles in (None, region):
        chosen = np.ones((6, 10), bool) if tiles is None else tiles
        pmf, plain_pmf = q.count_pmf(tiles), plain.count_pmf(tiles)
        k = np.arange(len(pmf))
        expected = tile_means[chosen].sum() + (probs[..., 3] * excess)[chosen].sum()
        assert np.dot(k, pmf) == pytest.approx(expected, rel=1e-9)
        assert np.dot(k, pmf) > np.dot(np.arange(len(plain_pmf)), plain_pmf) + 1.0
    with pytest.raises(ValueError, match="count_tail needs density cells"):
        TiledPosterior(**params, count_tail=True)
    halves = [q._rebuild(lambda t: t[:, :, :8]), q._rebuild(lambda t: t[:, :, 8:])]
    np.testing.assert_allclose(TiledPosterior.concatenate(halves, dim=2).count_pmf(),
                               q.count_pmf(), atol=1e-12)
    with pytest.raises(ValueError, match="count tail"):
        TiledPosterior.concatenate([halves[0], plain._rebuild(lambda t: t[:, :, 8:])], dim=2)


@pytest.mark.parametrize("rate", [0.1, 0.48, 1.2])
def test_count_tail_completes_truncated_poisson_tiles(rate):
    """Tiles that hold exactly the Poisson probabilities of 0, 1 and 2 stars and of 3 or
    more (what the forward KL fits on truncated training tiles under a Poisson prior):
    with the count tail their total is Poisson of mean n_tiles * rate (scipy), where
    without it the count falls short by the stars beyond three per tile."""
    top = np.append(stats.poisson.pmf(np.arange(3), rate), stats.poisson.sf(2, rate))
    logits = torch.log(torch.tensor(top)).expand(1, 8, 8, 4)
    params = {key: torch.tensor(value) for key, value in
              random_parameters(np.random.default_rng(7), (1, 8, 8), 1).items()}
    params["count_logits"] = logits
    tailed = TiledPosterior(**params, spread=torch.zeros(1, 8, 8), density_cells=4,
                            count_tail=True).count_pmf()
    expected = stats.poisson.pmf(np.arange(len(tailed)), 64 * rate)
    np.testing.assert_allclose(tailed, expected, atol=1e-10)
    plain = TiledPosterior(**params, spread=torch.zeros(1, 8, 8), density_cells=4).count_pmf()
    shortfall = 64 * (rate - np.dot(np.arange(4), top))
    assert np.dot(np.arange(len(plain)), plain) == pytest.approx(64 * rate - shortfall)


def test_convolve_counts_of_parts_of_mixed_widths_is_their_convolution():
    """Parts of widths 1 to 40 (grouped by width inside) at offsets: the pmf of their sum
    is the plain convolution (numpy), placed at the sum of the offsets."""
    rng = np.random.default_rng(9)
    parts = []
    for width in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 40, 3, 2]:
        values = rng.random(width)
        parts.append((int(rng.integers(0, 5)), values / values.sum()))
    offset, pmf = convolve_counts(parts)
    expected = np.ones(1)
    for _, values in parts:
        expected = np.convolve(expected, values)
    assert offset == sum(start for start, _ in parts)
    np.testing.assert_allclose(pmf, expected, atol=1e-15)
