"""Calibration checks: PITs against independent expectations, and the count coverage of
the bundled model against the figures docs/calibration.rst states."""

import math

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.table import QTable
from scipy import integrate, stats

from starnet import StarFieldPrior, StarNetDeblender
from starnet.calibration import (count_coverage, count_interval, count_pit, dropped_fraction,
                                 evaluate_on_simulations, pit_coverage, source_pit,
                                 star_intervals, tile_count_errors)
from starnet.posterior import TiledPosterior
from starnet.tiles import TileCatalog, TileGrid


def _random_posterior(generator, shape=(1, 40, 40), max_sources=3, n_bands=2, spread=1.0):
    """A posterior with random parameters; the sources of a tile overlap (``spread``
    small against their widths), so that pairing stars with sources is ambiguous."""
    n_slots = max_sources * (max_sources + 1) // 2

    def normal(*size):
        return torch.randn(*shape, *size, generator=generator, dtype=torch.float64)

    return TiledPosterior(
        count_logits=3 * normal(max_sources + 1),
        loc_mean=spread * normal(n_slots, 2), loc_sd=0.3 + torch.rand(
            *shape, n_slots, 2, generator=generator, dtype=torch.float64),
        log_flux_mean=8 + spread * normal(n_slots, n_bands),
        log_flux_sd=0.3 + torch.rand(*shape, n_slots, n_bands, generator=generator,
                                     dtype=torch.float64))


def _shuffled(tiles, generator):
    """The tile catalog with the stars of each tile in random order (a set has none)."""
    n = tiles.counts[..., None]
    key = torch.rand(tiles.counts.shape + (tiles.locs.shape[-2],), generator=generator)
    key = torch.where(torch.arange(tiles.locs.shape[-2]) < n, key, 2.0)
    order = key.argsort(dim=-1)[..., None]
    return TileCatalog(tiles.counts, tiles.locs.gather(-2, order.expand_as(tiles.locs)),
                       tiles.fluxes.gather(-2, order.expand_as(tiles.fluxes)), 0)


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_pit_is_uniform_when_the_truth_is_drawn_from_q(spread):
    """Stars drawn from q (in random order within their tiles) and paired by a draw from
    q's permutation posterior: every PIT is Uniform(0, 1), both when the sources of a tile
    overlap (ambiguous pairing) and when they are apart."""
    generator = torch.Generator().manual_seed(0)
    posterior = _random_posterior(generator, spread=spread)
    truth = _shuffled(posterior.sample(generator=generator), generator)
    # counts drawn from q, so q's mode is the true count only in some tiles: the PIT is
    # conditional on the count, which selecting on it leaves uniform
    pits = source_pit(posterior, truth, seed=1, bands=["r", "i"])
    assert len(pits) > 800 and set(pits["n"]) == {1, 2, 3}
    if spread < 1:
        assert np.mean(pits["pairing_prob"][pits["n"] > 1]) < 0.9
    for name in ("pit_x", "pit_y", "pit_flux_r", "pit_flux_i"):
        assert stats.kstest(pits[name], "uniform").pvalue > 0.01, name


def test_pit_of_one_source_against_direct_integration():
    """PIT of x: the logit-normal density of the pixel position integrated numerically;
    of the flux: scipy's log-normal CDF; one tile of 2 pixels at tile (3, 5)."""
    mean, sd, flux_mean, flux_sd = 0.7, 0.8, 8.0, 0.5
    shape = (1, 6, 8)
    posterior = TiledPosterior(
        torch.zeros(*shape, 4).index_fill_(-1, torch.tensor([1]), 5.0),
        torch.full((*shape, 6, 2), mean, dtype=torch.float64),
        torch.full((*shape, 6, 2), sd, dtype=torch.float64),
        torch.full((*shape, 6, 1), flux_mean, dtype=torch.float64),
        torch.full((*shape, 6, 1), flux_sd, dtype=torch.float64))
    grid = TileGrid(tile_size=2, max_sources=3)
    x, y, flux = 10.9, 6.1, 2500.0
    truth = grid.to_tiles(torch.tensor([[[x, y]]], dtype=torch.float64),
                          torch.tensor([[[flux]]], dtype=torch.float64),
                          torch.ones(1, 1, dtype=torch.bool), (12, 16))
    pits = source_pit(posterior, truth, pairing="mode", bands=["r"])
    assert len(pits) == 1 and (pits["tile_row"][0], pits["tile_col"][0]) == (3, 5)

    def density(pixel, low):     # q's density of the pixel position in a tile from low
        u = (pixel - low) / 2
        return stats.norm.pdf(math.log(u / (1 - u)), mean, sd) / (u * (1 - u) * 2)

    for value, low, name in ((x, 5 * 2 - 0.5, "pit_x"), (y, 3 * 2 - 0.5, "pit_y")):
        expected = integrate.quad(density, low, value, args=(low,))[0]
        assert pits[name][0] == pytest.approx(expected, abs=1e-6)
    assert pits["pit_flux_r"][0] == pytest.approx(
        stats.lognorm.cdf(flux, s=flux_sd, scale=math.exp(flux_mean)), abs=1e-9)


def test_tiles_whose_mode_is_not_the_true_count_are_left_out():
    generator = torch.Generator().manual_seed(3)
    posterior = _random_posterior(generator, shape=(1, 5, 5))
    truth = posterior.sample(generator=generator)
    modal = posterior.count_logits.argmax(-1)
    pits = source_pit(posterior, truth)
    kept = (modal == truth.counts) & (truth.counts > 0)
    assert len(pits) == int(truth.counts[kept].sum())
    # tiles with 3 stars held a 4th, dropped by the truncation: they are left out
    true_counts = truth.counts + (truth.counts == 3).long()
    assert len(source_pit(posterior, truth, true_counts=true_counts)) == int(
        truth.counts[kept & (truth.counts < 3)].sum())
    with pytest.raises(ValueError, match="pairing"):
        source_pit(posterior, truth, pairing="nearest")


def test_count_interval_mass_and_randomised_pit():
    pmf = stats.poisson.pmf(np.arange(80), 30.0)
    for level in (0.5, 0.8, 0.9, 0.95):
        low, high, mass = count_interval(pmf, level)
        assert mass == pytest.approx(stats.poisson.cdf(high, 30) - stats.poisson.cdf(low - 1, 30))
        assert mass >= level and stats.poisson.cdf(high - 1, 30) < (1 + level) / 2
    rng = np.random.default_rng(0)
    draws = rng.poisson(30.0, size=2000)
    pits = [count_pit(pmf, n, seed=rng) for n in draws]
    assert stats.kstest(pits, "uniform").pvalue > 0.01


def test_pit_coverage_counts_central_intervals():
    pits = np.random.default_rng(1).uniform(size=4000)
    table = pit_coverage(QTable({"pit_a": pits, "other": pits}), levels=(0.5, 0.9))
    assert table.colnames == ["level", "pit_a"] and table.meta["n"] == 4000
    np.testing.assert_allclose(table["pit_a"], [np.mean(np.abs(pits - 0.5) <= 0.25),
                                                np.mean(np.abs(pits - 0.5) <= 0.45)])


def test_dropped_fraction_matches_the_poisson_tail():
    """Each 2 x 2 tile holds Poisson(4 mu) stars; those beyond 3 are dropped."""
    prior = StarFieldPrior(mu=0.12)
    measured = dropped_fraction(prior, n_images=100, shape=(100, 100), seed=0)
    rate = 0.12 * 4
    k = np.arange(4, 40)
    expected = np.sum((k - 3) * stats.poisson.pmf(k, rate)) / rate
    # the number dropped is about Poisson: its relative standard error is 1 / sqrt(count)
    n_dropped = expected * 0.12 * 100 * 100 * 100
    assert measured == pytest.approx(expected, rel=4 / math.sqrt(n_dropped))


# docs/calibration.rst, 200 images per density (seeds 1000..1199), background factor 1:
# at M2's density (the prior's 0.12) on 50 x 50, bias +1.16 % (s.e. 0.27 %), coverage 0.895
# at 90 % and 0.480 at 50 % (the first table); at 0.01 stars per pixel on 100 x 100, bias
# +0.58 % (s.e. 0.15 %), coverage 0.990 and 0.800 (too wide; "Pair correlations").
DOCS_IMAGES = 200


@pytest.mark.parametrize("density, shape, bias, bias_err, documented_coverage", [
    pytest.param(None, (50, 50), 0.0116, 0.0027, {0.5: 0.480, 0.9: 0.895}, id="M2 density"),
    pytest.param(0.01, (100, 100), 0.0058, 0.0015, {0.5: 0.800, 0.9: 0.990}, id="0.01"),
])
def test_bundled_model_count_calibration_as_documented(density, shape, bias, bias_err,
                                                       documented_coverage):
    """New images (other seeds) at two densities: the coverage may differ from the
    documented one by the binomial error of both estimates (with a floor of one image
    for a coverage near 1), the bias by the standard error of both means."""
    deblender = StarNetDeblender.pretrained("sdss-m2")
    if density is not None:
        deblender.prior = deblender.prior.replace(mu=density)
    k = 200
    results = evaluate_on_simulations(deblender, n_images=k, shape=shape, seed=7000,
                                      levels=tuple(documented_coverage))
    coverage = count_coverage(results)
    for level, documented in documented_coverage.items():
        measured = coverage["coverage"][coverage["level"] == level][0]
        error = math.sqrt(max(documented * (1 - documented), 1 / k)
                          * (1 / k + 1 / DOCS_IMAGES))
        assert abs(measured - documented) < 3 * error, level
    error = math.hypot(coverage.meta["relative_bias_err"], bias_err)
    assert abs(coverage.meta["relative_bias"] - bias) < 3 * error


def test_simulations_seeded_by_a_generator_repeat_with_its_state():
    """A numpy Generator seeds the simulations as an int does: the same state gives the
    same images and PITs, another state other images."""
    deblender = StarNetDeblender.pretrained("sdss-m2")

    def run(seed):
        return evaluate_on_simulations(deblender, n_images=2, shape=(24, 24), seed=seed)

    first, again = run(np.random.default_rng(5)), run(np.random.default_rng(5))
    assert list(first["n_true"]) == list(again["n_true"])
    assert list(first["count_pit"]) == list(again["count_pit"])
    other = [run(np.random.default_rng(6)), run(None)]
    assert all(list(o["n_stars_mean"]) != list(first["n_stars_mean"]) for o in other)


def _draws_around(truth, n_draws, sd, flux_sd, found, rng):
    """Draws of a catalog: each true star (where ``found[star, draw]``) at its position
    plus Normal(0, sd) and its flux times a log-normal factor, plus a star far away."""
    rows = []
    for k in range(n_draws):
        for i, star in enumerate(truth):
            if found[i, k]:
                rows.append((k, star["x"] + rng.normal(0, sd), star["y"] + rng.normal(0, sd),
                             star["flux_r"].value * np.exp(rng.normal(0, flux_sd))))
        rows.append((k, 500.0, 500.0, 1000.0))
    sample, x, y, flux = map(np.array, zip(*rows))
    table = QTable({"sample": sample, "x_fit": x, "y_fit": y, "flux_r": flux * u.electron})
    table.meta["n_samples"] = n_draws
    return table


def test_star_intervals_detection_and_coverage():
    """Draws scattered around the truth by known errors: detection probabilities are the
    designed fractions, the intervals are the draws' own quantiles, and the truth lies in
    the 90 % intervals of about 90 % of the stars (binomial limits)."""
    rng = np.random.default_rng(1)
    n_stars, n_draws = 400, 200
    truth = QTable({"x": rng.uniform(0, 100, n_stars) * 20, "y": rng.uniform(0, 100, n_stars),
                    "flux_r": rng.uniform(2e3, 1e4, n_stars) * u.electron})
    found = np.ones((n_stars, n_draws), dtype=bool)
    found[0, ::4] = False                                   # star 0 found in 3 draws of 4
    found[1] = False                                        # star 1 never
    draws = _draws_around(truth, n_draws, sd=0.1, flux_sd=0.2, found=found, rng=rng)
    # the truth is the centre of the draws, not itself a draw: offset every star by a draw
    # of the same error, so that it is exchangeable with them
    observed = truth.copy()
    observed["x"] = truth["x"] + rng.normal(0, 0.1, n_stars)
    observed["y"] = truth["y"] + rng.normal(0, 0.1, n_stars)
    observed["flux_r"] = truth["flux_r"] * np.exp(rng.normal(0, 0.2, n_stars))
    result = star_intervals(draws, observed, level=0.9)
    assert result["detection_probability"][0] == 0.75
    assert result["detection_probability"][1] == 0
    assert np.all(result["detection_probability"][2:] == 1)
    assert np.isnan(result["x_low"][1]) and not result["covered_x"][1]
    star = 5
    mine = draws[np.hypot(draws["x_fit"] - truth["x"][star],
                          draws["y_fit"] - truth["y"][star]) < 1]
    assert result["x_low"][star] == pytest.approx(np.quantile(mine["x_fit"], 0.05))
    assert result["flux_r_high"][star].to_value(u.electron) == pytest.approx(
        np.quantile(mine["flux_r"].value, 0.95))
    n = n_stars - 2
    limit = 3 * np.sqrt(0.9 * 0.1 / n)
    for name in ("x", "y", "flux_r"):
        assert abs(np.mean(result[f"covered_{name}"][2:]) - 0.9) < limit + 0.01, name


def test_star_pits_are_uniform_with_few_draws():
    """With 20 draws the quantile intervals hold only about 0.9 * 19 / 21 of exchangeable
    truths, while the randomised PITs are exactly uniform; a star found in no draw has no
    position PIT, and with ``absent_flux=0`` a PIT of flux above every draw's."""
    rng = np.random.default_rng(2)
    n_stars, n_draws = 1500, 20
    truth = QTable({"x": rng.uniform(0, 100, n_stars) * 20, "y": rng.uniform(0, 100, n_stars),
                    "flux_r": rng.uniform(2e3, 1e4, n_stars) * u.electron})
    found = np.ones((n_stars, n_draws), dtype=bool)
    found[0] = False
    draws = _draws_around(truth, n_draws, sd=0.1, flux_sd=0.2, found=found, rng=rng)
    observed = truth.copy()
    observed["x"] = truth["x"] + rng.normal(0, 0.1, n_stars)
    observed["flux_r"] = truth["flux_r"] * np.exp(rng.normal(0, 0.2, n_stars))
    result = star_intervals(draws, observed, absent_flux=0.0, seed=0)
    assert np.isnan(result["pit_x"][0]) and 1 - 1 / 21 < result["pit_flux_r"][0] < 1
    for name in ("x", "flux_r"):
        pits = np.asarray(result[f"pit_{name}"][1:])
        assert stats.kstest(pits, "uniform").pvalue > 1e-3, name
        assert abs(np.mean(np.abs(pits - 0.5) <= 0.45) - 0.9) < 3 * np.sqrt(0.09 / n_stars)
        quantile_cover = np.mean(result[f"covered_{name}"][1:])
        assert abs(quantile_cover - 0.9 * 19 / 21) < 3 * np.sqrt(0.2 / n_stars), name


def test_star_intervals_bad_input():
    table = QTable({"sample": [0, 3], "x": [1.0, 2.0], "y": [1.0, 2.0]})
    truth = QTable({"x": [1.0], "y": [1.0]})
    with pytest.raises(ValueError, match="n_draws"):
        star_intervals(table, truth)
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 2\)"):
        star_intervals(table, truth, n_draws=2)
    with pytest.raises(ValueError, match="level"):
        star_intervals(table, truth, n_draws=4, level=90)
    with pytest.raises(ValueError, match="'sample' column"):
        star_intervals(QTable({"x": [1.0], "y": [1.0]}), truth, n_draws=1)


def test_tile_count_errors_of_counts_drawn_from_the_tiles_own_pmfs():
    """True counts drawn tile by tile from the claimed pmfs: every block's error variance
    is the claimed one (ratio 1 within its sampling error) and neighbours are
    uncorrelated; a star split between two tiles makes their errors cancel exactly."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet([3.0, 1.0, 0.5], size=(40, 50, 50))
    cdf = probs.cumsum(-1)
    true = (rng.uniform(size=cdf.shape[:3] + (1,)) > cdf).sum(-1)
    table = tile_count_errors(probs, true, blocks=(1, 5, 25))
    # the squared error of a sum of n independent errors: relative sd about sqrt(2 / n)
    for row in table:
        assert abs(row["ratio"] - 1) < 4 * math.sqrt(2 / row["n_blocks"]) + 0.02
    assert abs(table.meta["neighbour_covariance"]) < 0.02
    assert abs(table.meta["diagonal_covariance"]) < 0.02

    split = np.zeros((1, 1, 2, 2))
    split[..., 1] = [0.7, 0.3]              # P(one star) of the two tiles, the star in one
    split[..., 0] = 1 - split[..., 1]
    pair = tile_count_errors(split, np.array([[[1, 0]]]), blocks=(1,))
    assert pair.meta["neighbour_covariance"] == pytest.approx(-0.3 * 0.3 / 0.21)
    whole = np.zeros((1, 2, 2, 2))
    whole[:, 0], whole[:, 1] = split[:, 0], split[:, 0][:, ::-1]
    block = tile_count_errors(whole, np.array([[[1, 0], [0, 1]]]), blocks=(2,))
    assert block["squared_error"][0] == pytest.approx(0.0, abs=1e-12)
    assert block["claimed_variance"][0] == pytest.approx(4 * 0.21)

    with pytest.raises(ValueError, match="count_probs must have shape"):
        tile_count_errors(probs, true[:, :10])
    with pytest.raises(ValueError, match="at most 50 tiles a side"):
        tile_count_errors(probs, true, blocks=(60,))
    with pytest.raises(ValueError, match="summing to 1"):
        tile_count_errors(2 * probs, true)
    with pytest.raises(ValueError, match="non-negative integers"):
        tile_count_errors(probs, true - 0.5)


def test_tile_count_errors_against_a_loop_over_blocks_and_pairs():
    """Blocks, side pairs (rows and columns) and both diagonals, each summed by hand."""
    rng = np.random.default_rng(8)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=(2, 6, 7))     # 7 columns: one left over
    true = rng.integers(0, 3, size=(2, 6, 7))
    table = tile_count_errors(probs, true, blocks=2)
    mean = probs @ np.arange(3)
    variance = probs @ np.arange(3) ** 2 - mean ** 2
    error = true - mean
    squared, claimed = [], []
    for image in range(2):
        for row in range(0, 6, 2):
            for col in range(0, 6, 2):
                squared.append(error[image, row:row + 2, col:col + 2].sum() ** 2)
                claimed.append(variance[image, row:row + 2, col:col + 2].sum())
    assert table["n_blocks"][0] == 18
    assert table["squared_error"][0] == pytest.approx(np.mean(squared))
    assert table["claimed_variance"][0] == pytest.approx(np.mean(claimed))
    side, diagonal = [], []
    for image in range(2):
        for row in range(6):
            for col in range(7):
                if col + 1 < 7:
                    side.append(error[image, row, col] * error[image, row, col + 1])
                if row + 1 < 6:
                    side.append(error[image, row, col] * error[image, row + 1, col])
                if row + 1 < 6 and col + 1 < 7:
                    diagonal.append(error[image, row, col] * error[image, row + 1, col + 1])
                if row + 1 < 6 and col >= 1:
                    diagonal.append(error[image, row, col] * error[image, row + 1, col - 1])
    assert table.meta["neighbour_covariance"] == pytest.approx(np.mean(side)
                                                               / variance.mean())
    assert table.meta["diagonal_covariance"] == pytest.approx(np.mean(diagonal)
                                                              / variance.mean())

    certain = np.eye(3)[true]                      # every tile sure of its true count
    exact = tile_count_errors(certain, true, blocks=(1, 3))
    assert np.all(exact["squared_error"] == 0) and np.all(np.isnan(exact["ratio"]))
    assert np.isnan(exact.meta["neighbour_covariance"])
