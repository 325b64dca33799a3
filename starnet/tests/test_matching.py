import itertools

import numpy as np
import pytest
from astropy import units as u
from astropy.table import QTable
from numpy.testing import assert_allclose, assert_array_equal
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial.distance import cdist

from starnet.matching import CatalogMatch, match_catalogs, metrics_by_magnitude


def truth_table(x, y, flux=None):
    cols = {"x": np.asarray(x, float), "y": np.asarray(y, float)}
    if flux is not None:
        cols["flux_r"] = np.asarray(flux, float)
    return QTable(cols)


def estimate_table(x, y, flux=None):
    cols = {"x_fit": np.asarray(x, float), "y_fit": np.asarray(y, float)}
    if flux is not None:
        cols["flux_r"] = np.asarray(flux, float)
    return QTable(cols)


def random_catalogs(rng, n_est, n_true, size):
    est = estimate_table(rng.uniform(0, size, n_est),
                         rng.uniform(0, size, n_est),
                         10 ** rng.uniform(3, 3.6, n_est))
    true = truth_table(rng.uniform(0, size, n_true),
                       rng.uniform(0, size, n_true),
                       10 ** rng.uniform(3, 3.6, n_true))
    return est, true


def valid_matrix(est, true, max_sep=0.5, max_dmag=0.5, metric="euclidean"):
    """Dense (n_est, n_true) boolean matrix of pairs that satisfy the limits."""
    d = cdist(np.column_stack([est["x_fit"], est["y_fit"]]),
              np.column_stack([true["x"], true["y"]]), metric=metric)
    dmag = 2.5 * np.abs(np.log10(np.asarray(est["flux_r"])[:, None]
                                 / np.asarray(true["flux_r"])[None, :]))
    return (d < max_sep) & (dmag < max_dmag), d


def test_exact_pairs_index_original_rows():
    true = truth_table([50, 10, 30, 70], [50, 10, 30, 70], [1e3, 2e3, 3e3, 4e3])
    est = estimate_table([30.1, 80, 10.0, 50.2], [29.8, 80, 10.3, 50.0],
                         [3.1e3, 1e3, 2e3, 1e3])
    result = match_catalogs(est, true, band="r")
    assert isinstance(result, CatalogMatch)
    assert_array_equal(result.pairs, [[0, 2], [2, 1], [3, 0]])
    assert result.pairs.dtype.kind == "i"
    assert (result.n_true, result.n_estimated) == (4, 4)
    assert result.n_matched_true == result.n_matched_estimated == 3
    assert result.tpr == pytest.approx(0.75)
    assert result.ppv == pytest.approx(0.75)
    assert result.f1 == pytest.approx(0.75)


def test_f1_is_harmonic_mean():
    # 1 of 2 true stars matched, 1 of 4 estimates correct.
    true = truth_table([10, 20], [10, 20], [1e3, 1e3])
    est = estimate_table([10, 40, 50, 60], [10, 40, 50, 60], [1e3] * 4)
    result = match_catalogs(est, true, band="r")
    assert (result.tpr, result.ppv) == (0.5, 0.25)
    assert result.f1 == pytest.approx(2 * 0.5 * 0.25 / 0.75)


@pytest.mark.parametrize("rule", ["one-to-one", "any"])
@pytest.mark.parametrize(("offset", "matched"), [(0.49, True), (0.51, False)])
def test_separation_limit(rule, offset, matched):
    true = truth_table([20.0], [20.0], [1e3])
    est = estimate_table([20.0], [20.0 + offset], [1e3])
    result = match_catalogs(est, true, band="r", rule=rule)
    assert result.n_matched_true == int(matched)
    # A larger limit always accepts it.
    assert match_catalogs(est, true, band="r", rule=rule,
                          max_separation=0.6).n_matched_true == 1


def test_limits_are_strict_as_in_the_paper():
    # Exactly 0.5 px (L-infinity and Euclidean) or exactly 0.5 mag: no match.
    true = QTable({"x": [0.0, 10.0], "y": [0.0, 10.0], "mag_r": [18.0, 18.0]})
    est = QTable({"x": [0.5, 10.0], "y": [0.0, 10.0], "mag_r": [18.0, 18.5]})
    for rule in ("one-to-one", "any"):
        assert match_catalogs(est, true, band="r", rule=rule).n_matched_true == 0
        assert match_catalogs(est, true, band="r", rule=rule,
                              max_mag_difference=None).n_matched_true == 1


@pytest.mark.parametrize(("dmag", "matched"), [(0.49, True), (0.51, False)])
def test_magnitude_limit(dmag, matched):
    true = truth_table([20.0], [20.0], [5e3])
    # Both directions of the flux error.
    for factor in (10 ** (dmag / 2.5), 10 ** (-dmag / 2.5)):
        est = estimate_table([20.1], [20.0], [5e3 * factor])
        for rule in ("one-to-one", "any"):
            result = match_catalogs(est, true, band="r", rule=rule)
            assert result.n_matched_true == int(matched)
    # The same with magnitude columns instead of fluxes.
    true_mag = QTable({"x": [20.0], "y": [20.0], "mag_r": [18.0]})
    est_mag = QTable({"x_fit": [20.0], "y_fit": [20.1], "mag_r": [18.0 + dmag],
                      "flux_r": [1.0]})
    assert match_catalogs(est_mag, true_mag, band="r").n_matched_true == int(matched)
    # Disabling the criterion ignores the brightness.
    assert match_catalogs(est, true, max_mag_difference=None).n_matched_true == 1


def test_mag_columns_take_precedence_over_flux():
    true = QTable({"x": [5.0], "y": [5.0], "mag_r": [20.0], "flux_r": [1e3]})
    # Fluxes disagree by 2.5 mag but the magnitudes agree.
    est = QTable({"x_fit": [5.0], "y_fit": [5.0], "mag_r": [20.1], "flux_r": [1e4]})
    assert match_catalogs(est, true, band="r").tpr == 1.0


def test_band_none_uses_plain_columns_and_quantities():
    true = QTable({"x": [5.0, 9.0] * u.pix, "y": [5.0, 9.0] * u.pix,
                   "flux": [1e3, 1e3] * u.electron})
    est = QTable({"x": [5.2, 9.0] * u.pix, "y": [5.0, 9.0] * u.pix,
                  "flux": [1.1e3, 3e3] * u.electron})
    result = match_catalogs(est, true)
    assert_array_equal(result.pairs, [[0, 0]])


def test_non_positive_flux_never_matches():
    true = truth_table([5.0, 9.0], [5.0, 9.0], [1e3, 1e3])
    est = estimate_table([5.0, 9.0], [5.0, 9.0], [0.0, -1e3])
    assert match_catalogs(est, true, band="r").n_matched_true == 0


def test_euclidean_versus_chebyshev_distance():
    # Diagonal offset: Euclidean 0.566 > 0.5, L-infinity 0.4 < 0.5.
    true = truth_table([20.0], [20.0], [1e3])
    est = estimate_table([20.4], [20.4], [1e3])
    assert match_catalogs(est, true, band="r", rule="one-to-one").n_matched_true == 0
    assert match_catalogs(est, true, band="r", rule="any").n_matched_true == 1


def test_one_to_one_versus_any_with_two_estimates_near_one_star():
    true = truth_table([20.0], [20.0], [1e3])
    est = estimate_table([20.1, 19.8], [20.0, 20.1], [1e3, 1e3])
    one = match_catalogs(est, true, band="r")
    assert (one.tpr, one.ppv) == (1.0, 0.5)
    assert_array_equal(one.pairs, [[0, 0]])  # the closer estimate
    assert one.n_matched_estimated == 1
    anyrule = match_catalogs(est, true, band="r", rule="any")
    assert (anyrule.tpr, anyrule.ppv) == (1.0, 1.0)
    assert_array_equal(anyrule.pairs, [[0, 0], [1, 0]])
    assert anyrule.n_matched_true == 1
    assert anyrule.n_matched_estimated == 2
    assert anyrule.rule == "any"


def greedy_pair_count(valid, dist):
    """Closest-pair-first greedy matching (the baseline to beat)."""
    used_i, used_j = set(), set()
    for k in np.argsort(dist, axis=None):
        i, j = np.unravel_index(k, dist.shape)
        if valid[i, j] and i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
    return len(used_i)


def test_hungarian_beats_greedy():
    # Estimate 0 is closest to true A, but taking that pair leaves estimate 1
    # (which can only match A) and true B unmatched.
    true = truth_table([0.0, 0.6], [0.0, 0.0], [1e3, 1e3])   # A, B
    est = estimate_table([0.25, -0.3], [0.0, 0.0], [1e3, 1e3])
    valid, dist = valid_matrix(est, true)
    assert greedy_pair_count(valid, dist) == 1
    result = match_catalogs(est, true, band="r")
    assert_array_equal(result.pairs, [[0, 1], [1, 0]])
    assert result.tpr == result.ppv == 1.0


def test_ties_in_count_are_broken_by_total_distance():
    # All four pairs are valid; e0-A + e1-B (0.2) beats e0-B + e1-A (0.4).
    true = truth_table([0.1, 0.2], [0.0, 0.0], [1e3, 1e3])
    est = estimate_table([0.0, 0.3], [0.0, 0.0], [1e3, 1e3])
    assert_array_equal(match_catalogs(est, true, band="r").pairs, [[0, 0], [1, 1]])


@pytest.mark.parametrize("rule", ["one-to-one", "any"])
def test_border_follows_paper_rule(rule):
    # Paper: keep 5 < x + 0.5 < 95 for a 100 x 100 image.
    x = np.array([4.5, 4.6, 50.0, 94.4, 94.5])
    true = truth_table(x, np.full(5, 50.0), np.full(5, 1e3))
    est = estimate_table(x, np.full(5, 50.0), np.full(5, 1e3))
    result = match_catalogs(est, true, band="r", rule=rule, border=5,
                            image_shape=(100, 100))
    assert (result.n_true, result.n_estimated) == (3, 3)
    assert_array_equal(result.pairs, [[1, 1], [2, 2], [3, 3]])
    assert result.tpr == result.ppv == 1.0
    # The same positions along y, estimates in reverse order: pairs index
    # the original rows.
    true = truth_table(np.full(5, 50.0), x, np.full(5, 1e3))
    est = estimate_table(np.full(5, 50.0), x[::-1], np.full(5, 1e3))
    result = match_catalogs(est, true, band="r", rule=rule, border=5,
                            image_shape=(100, 100))
    assert (result.n_true, result.n_estimated) == (3, 3)
    assert_array_equal(result.pairs, [[1, 3], [2, 2], [3, 1]])


def test_border_uses_rows_then_columns():
    # 40 rows x 100 columns: y = 50 is outside, x = 50 is inside.
    true = truth_table([50.0, 20.0], [20.0, 50.0], [1e3, 1e3])
    est = estimate_table([20.0, 50.0], [50.0, 20.0], [1e3, 1e3])
    result = match_catalogs(est, true, band="r", border=2, image_shape=(40, 100))
    assert (result.n_true, result.n_estimated) == (1, 1)
    assert_array_equal(result.pairs, [[1, 0]])
    # An estimate only matches kept true stars.
    unmatched = estimate_table([20.0], [50.0], [1e3])
    result = match_catalogs(unmatched, true, band="r", border=0,
                            image_shape=(40, 100))
    assert (result.n_true, result.n_estimated, result.ppv) == (1, 0, 0.0)


def test_empty_catalogs():
    true = truth_table([10.0, 20.0], [10.0, 20.0], [1e3, 1e3])
    empty = estimate_table([], [], [])
    for rule in ("one-to-one", "any"):
        for result in (match_catalogs(empty, true, band="r", rule=rule),
                       match_catalogs(estimate_table([1.0], [1.0], [1.0]),
                                      truth_table([], [], []), band="r", rule=rule),
                       match_catalogs(empty, truth_table([], [], []), band="r",
                                      rule=rule)):
            assert (result.tpr, result.ppv, result.f1) == (0.0, 0.0, 0.0)
            assert result.pairs.shape == (0, 2)
    result = match_catalogs(empty, true, band="r")
    assert (result.n_true, result.n_estimated) == (2, 0)


def test_repr_is_readable():
    true = truth_table([10.0, 20.0], [10.0, 20.0], [1e3, 1e3])
    est = estimate_table([10.0], [10.0], [1e3])
    text = repr(match_catalogs(est, true, band="r"))
    assert text == ("<CatalogMatch rule='one-to-one': tpr=0.500, ppv=1.000, "
                    "f1=0.667; matched 1/2 true, 1/1 estimated; n_pairs=1>")


def test_errors_name_the_problem():
    true = truth_table([10.0], [10.0], [1e3])
    est = estimate_table([10.0], [10.0], [1e3])
    with pytest.raises(ValueError, match=r"pixel position columns \(the first of 'x_fit', "
                       r"'y_fit'; 'x', 'y'; 'x_init'.*it has \['ra', 'dec'\]"):
        match_catalogs(QTable({"ra": [1.0], "dec": [1.0]}), true, band="r")
    with pytest.raises(ValueError, match=r"'mag_i'.*'flux_i'.*catalog lacks"):
        match_catalogs(est, true, band="i")
    with pytest.raises(ValueError, match="pass band="):
        match_catalogs(est, true)
    with pytest.raises(ValueError, match="rule must be one of"):
        match_catalogs(est, true, band="r", rule="greedy")
    with pytest.raises(ValueError, match="needs image_shape"):
        match_catalogs(est, true, band="r", border=5)
    with pytest.raises(ValueError, match="only used together with border"):
        match_catalogs(est, true, band="r", image_shape=(100, 100))
    with pytest.raises(ValueError, match="max_separation"):
        match_catalogs(est, true, band="r", max_separation=0)
    with pytest.raises(ValueError, match="non-finite"):
        match_catalogs(estimate_table([np.nan], [1.0], [1e3]), true, band="r")


@pytest.mark.parametrize("rule", ["one-to-one", "any"])
def test_catalog_matched_to_itself_is_perfect(rule):
    rng = np.random.default_rng(1)
    # Dense enough that many stars have neighbours within the limits.
    est, _ = random_catalogs(rng, 400, 0, 20.0)
    true = truth_table(est["x_fit"], est["y_fit"], est["flux_r"])
    result = match_catalogs(est, true, band="r", rule=rule)
    assert result.tpr == result.ppv == result.f1 == 1.0
    if rule == "one-to-one":
        assert_array_equal(result.pairs, np.column_stack([np.arange(400)] * 2))


@pytest.mark.parametrize("seed", range(20))
def test_pair_count_equals_maximum_bipartite_matching(seed):
    rng = np.random.default_rng(seed)
    n_est, n_true = rng.integers(1, 60, size=2)
    est, true = random_catalogs(rng, n_est, n_true, 6.0)
    valid, _ = valid_matrix(est, true)
    expected = np.sum(maximum_bipartite_matching(csr_matrix(valid),
                                                 perm_type="column") >= 0)
    result = match_catalogs(est, true, band="r")
    assert len(result.pairs) == expected
    # Every pair is valid and every star is used at most once.
    assert valid[result.pairs[:, 0], result.pairs[:, 1]].all()
    assert len(np.unique(result.pairs[:, 0])) == len(result.pairs)
    assert len(np.unique(result.pairs[:, 1])) == len(result.pairs)


def brute_force_best(valid, dist):
    """(largest pair count, smallest total distance) over all matchings."""
    n_est, n_true = valid.shape
    best = (0, 0.0)
    for choice in itertools.product(range(-1, n_true), repeat=n_est):
        taken = [j for j in choice if j >= 0]
        if len(set(taken)) < len(taken):
            continue
        if not all(valid[i, j] for i, j in enumerate(choice) if j >= 0):
            continue
        total = sum(dist[i, j] for i, j in enumerate(choice) if j >= 0)
        if (len(taken), -total) > (best[0], -best[1]):
            best = (len(taken), total)
    return best


@pytest.mark.parametrize("seed", range(15))
def test_small_cases_against_exhaustive_search(seed):
    rng = np.random.default_rng(100 + seed)
    est, true = random_catalogs(rng, rng.integers(1, 5), rng.integers(1, 5), 1.2)
    valid, dist = valid_matrix(est, true)
    count, total = brute_force_best(valid, dist)
    pairs = match_catalogs(est, true, band="r").pairs
    assert len(pairs) == count
    assert dist[pairs[:, 0], pairs[:, 1]].sum() == pytest.approx(total)


@pytest.mark.parametrize("seed", range(5))
def test_any_rule_against_dense_computation(seed):
    rng = np.random.default_rng(200 + seed)
    est, true = random_catalogs(rng, 80, 120, 10.0)
    valid, _ = valid_matrix(est, true, metric="chebyshev")
    result = match_catalogs(est, true, band="r", rule="any")
    assert_array_equal(result.pairs, np.argwhere(valid))
    assert result.tpr == pytest.approx(valid.any(axis=0).mean())
    assert result.ppv == pytest.approx(valid.any(axis=1).mean())


def test_large_catalogs_run():
    rng = np.random.default_rng(7)
    est, true = random_catalogs(rng, 1500, 1500, 100.0)
    one = match_catalogs(est, true, band="r", max_separation=1.0)
    anyrule = match_catalogs(est, true, band="r", max_separation=1.0, rule="any")
    # 'any' (a larger L-infinity neighbourhood, shared matches) is more lenient.
    assert 0 < one.n_matched_true <= anyrule.n_matched_true
    assert one.n_matched_estimated <= anyrule.n_matched_estimated


def magnitude_test_catalogs():
    # zero point 30: fluxes 1e5, 1e4, 1e3 are magnitudes 17.5, 20, 22.5.
    true = truth_table([10, 20, 30, 40], [10, 20, 30, 40], [1e5, 1e4, 1e3, 1e3])
    # The second estimate is 0.3 mag fainter than its star (still a match)
    # and crosses into the faint bin; the third matches nothing.
    est = estimate_table([10.1, 20.0, 60.0], [10.0, 20.1, 60.0],
                         [1e5, 1e4 * 10 ** (-0.3 / 2.5), 1e3])
    return est, true


def test_metrics_by_magnitude_known_answer():
    est, true = magnitude_test_catalogs()
    table = metrics_by_magnitude(est, true, bins=[15, 20, 25], band="r",
                                 zero_point=30.0)
    assert table.colnames == ["mag_min", "mag_max", "n_true", "n_estimated",
                              "tpr", "ppv"]
    assert_array_equal(table["mag_min"], [15, 20])
    assert_array_equal(table["mag_max"], [20, 25])
    # True mags 17.5 | 20, 22.5, 22.5; estimated 17.5 | 20.3, 22.5.
    assert_array_equal(table["n_true"], [1, 3])
    assert_array_equal(table["n_estimated"], [1, 2])
    assert_allclose(table["tpr"], [1.0, 1 / 3])
    assert_allclose(table["ppv"], [1.0, 0.5])
    assert table.meta["rule"] == "one-to-one"


def test_metrics_by_magnitude_zero_point_choices_agree():
    est, true = magnitude_test_catalogs()
    nelec = 850.0
    by_nelec = metrics_by_magnitude(est, true, bins=[15, 20, 25], band="r",
                                    nelec_per_nmgy=nelec)
    by_zp = metrics_by_magnitude(est, true, bins=[15, 20, 25], band="r",
                                 zero_point=22.5 + 2.5 * np.log10(nelec))
    for name in by_zp.colnames:
        assert_allclose(by_nelec[name], by_zp[name])
    # Magnitude columns are used directly, without a zero point.
    true["mag_r"] = 30 - 2.5 * np.log10(true["flux_r"])
    est["mag_r"] = 30 - 2.5 * np.log10(est["flux_r"])
    with_mags = metrics_by_magnitude(est, true, bins=[15, 20, 25], band="r")
    assert_array_equal(with_mags["n_true"], [1, 3])
    assert_allclose(with_mags["tpr"], [1.0, 1 / 3])


def test_metrics_by_magnitude_bins_and_empty_bins():
    true = truth_table([10, 20, 30], [10, 20, 30], [1e3, 1e3, 1e3])
    true["mag_r"] = [18.0, 19.0, 20.0]   # on the edges
    est = estimate_table([10, 20], [10, 20], [1e3, 1e3])
    est["mag_r"] = [18.0, 30.0]          # the second lies outside all bins
    table = metrics_by_magnitude(est, true, bins=[17, 18, 19, 20], band="r",
                                 max_mag_difference=None)
    # Half-open bins except the last, which includes its upper edge.
    assert_array_equal(table["n_true"], [0, 1, 2])
    assert_array_equal(table["n_estimated"], [0, 1, 0])
    assert_allclose(table["tpr"], [np.nan, 1.0, 0.5])
    assert_allclose(table["ppv"], [np.nan, 1.0, np.nan])


def test_metrics_by_magnitude_totals_match_overall_rates():
    rng = np.random.default_rng(3)
    est, true = random_catalogs(rng, 300, 400, 30.0)
    kwargs = dict(band="r", rule="any", border=3, image_shape=(30, 30))
    overall = match_catalogs(est, true, **kwargs)
    table = metrics_by_magnitude(est, true, bins=[20, 21, 22, 23, 24],
                                 zero_point=30.0, **kwargs)
    # The bins cover all magnitudes (30 - 2.5 * 3.6 = 21 to 30 - 2.5 * 3 =
    # 22.5), so the binned counts add up to the border-cut totals.
    assert table["n_true"].sum() == overall.n_true
    assert table["n_estimated"].sum() == overall.n_estimated
    tpr = np.nansum(table["tpr"] * table["n_true"]) / overall.n_true
    ppv = np.nansum(table["ppv"] * table["n_estimated"]) / overall.n_estimated
    assert tpr == pytest.approx(overall.tpr)
    assert ppv == pytest.approx(overall.ppv)
    assert table.meta["border"] == 3


def test_metrics_by_magnitude_errors():
    est, true = magnitude_test_catalogs()
    with pytest.raises(ValueError, match="pass nelec_per_nmgy= or zero_point="):
        metrics_by_magnitude(est, true, bins=[15, 20], band="r")
    with pytest.raises(ValueError, match="not both"):
        metrics_by_magnitude(est, true, bins=[15, 20], band="r",
                             zero_point=30.0, nelec_per_nmgy=850.0)
    with pytest.raises(ValueError, match="increasing"):
        metrics_by_magnitude(est, true, bins=[20, 15], band="r", zero_point=30.0)
    with pytest.raises(ValueError,
                       match=r"'mag_g' column or a flux column \(the first of \['flux_g'"):
        metrics_by_magnitude(est, true, bins=[15, 20], band="g", zero_point=30.0)


def test_flux_units_are_converted_not_stripped():
    """The same three stars, fluxes in electrons and in thousands of electrons."""
    from astropy import units as u
    from astropy.table import QTable
    from starnet import match_catalogs
    ours = QTable({"x": [1.0, 5.0, 9.0], "y": [2.0, 6.0, 3.0],
                   "flux_r": [2000.0, 5000.0, 9000.0] * u.electron})
    theirs = QTable({"x": [1.0, 5.0, 9.0], "y": [2.0, 6.0, 3.0],
                     "flux_r": [2.0, 5.0, 9.0] * (1000 * u.electron)})
    assert match_catalogs(ours, theirs, band="r").n_matched_true == 3
    theirs["flux_r"] = [2.0, 5.0, 9.0] * u.mJy
    with pytest.raises(ValueError, match="do not convert"):
        match_catalogs(ours, theirs, band="r")


def test_positions_must_be_pixels_and_masked_values_are_refused():
    from astropy import units as u
    from astropy.table import QTable, Table, MaskedColumn
    from starnet import match_catalogs
    ours = QTable({"x": [1.0, 5.0] * u.deg, "y": [2.0, 6.0] * u.deg})
    theirs = QTable({"x": [1.0, 5.0], "y": [2.0, 6.0]})
    with pytest.raises(ValueError, match="positions must be pixels"):
        match_catalogs(ours, theirs, max_mag_difference=None)
    ours = QTable({"x": [1.0, 5.0] * u.pix, "y": [2.0, 6.0] * u.pix})
    assert match_catalogs(ours, theirs, max_mag_difference=None).n_matched_true == 2
    masked = Table({"x": MaskedColumn([1.0, 5.0], mask=[False, True]), "y": [2.0, 6.0]})
    with pytest.raises(ValueError, match="1 masked values"):
        match_catalogs(masked, theirs, max_mag_difference=None)


# --- photutils tables and matching on the sky --------------------------------

def photutils_photometry(seed=4):
    """A photutils PSFPhotometry table of a simulated image, and the image's truth."""
    import warnings
    from photutils.detection import DAOStarFinder
    from photutils.psf import PSFPhotometry
    from starnet import PowerLawPSF, StarFieldPrior, simulate_starfield
    psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.0)
    prior = StarFieldPrior(mu=0.01, f_min=2000.0, bands=["r"])
    image, truth = simulate_starfield((48, 48), prior=prior, psf=psf, background=300.0,
                                      seed=seed, stamp_size=15)
    data = image.data[0] - 300.0
    finder = DAOStarFinder(threshold=5 * np.sqrt(300.0), fwhm=psf.fwhm)
    photometry = PSFPhotometry(psf, (7, 7), finder=finder, aperture_radius=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = photometry(data, error=np.sqrt(image.data[0]))
    return QTable(result), truth


def test_photutils_psf_photometry_is_scored_without_renaming():
    result, truth = photutils_photometry()
    assert {"x_init", "x_fit", "flux_init", "flux_fit", "flags"} <= set(result.colnames)
    direct = match_catalogs(result, truth, band="r")
    renamed = result[["x_fit", "y_fit", "flux_fit"]]
    renamed.rename_columns(["x_fit", "y_fit", "flux_fit"], ["x", "y", "flux_r"])
    manual = match_catalogs(renamed, truth, band="r")
    assert_array_equal(direct.pairs, manual.pairs)
    assert (direct.tpr, direct.ppv, direct.n_estimated) == (manual.tpr, manual.ppv,
                                                            manual.n_estimated)
    # a real test: most detections are true stars, many faint stars are missed
    assert len(direct.pairs) >= 5 and direct.ppv > 0.6 and direct.tpr < 0.8


@pytest.mark.parametrize(("columns", "expected"), [
    (["x_fit", "y_fit", "x", "y"], ("x_fit", "y_fit")),
    (["x", "y", "x_init", "y_init"], ("x", "y")),
    (["x_init", "y_init", "x_centroid", "y_centroid"], ("x_init", "y_init")),
    (["x_centroid", "y_centroid", "xcentroid", "ycentroid"], ("x_centroid", "y_centroid")),
    (["xcentroid", "ycentroid"], ("xcentroid", "ycentroid")),
])
def test_position_columns_are_looked_up_in_order(columns, expected):
    """Only the expected pair holds the true positions; the others are far off."""
    true = truth_table([5.0, 9.0], [5.0, 9.0])
    table = QTable({name: ([5.0, 9.0] if name in expected else [50.0, 90.0])
                    for name in columns})
    assert match_catalogs(table, true, max_mag_difference=None).n_matched_true == 2


def test_flux_columns_are_looked_up_in_order():
    true = truth_table([5.0], [5.0], [1e3])
    both = QTable({"x": [5.0], "y": [5.0], "flux_r": [1e3], "flux_fit": [1e5],
                   "flux": [1e5]})
    assert match_catalogs(both, true, band="r").n_matched_true == 1   # flux_r first
    del both["flux_r"]
    both["flux_fit"] = [1e3]
    assert match_catalogs(both, true, band="r").n_matched_true == 1   # then flux_fit
    del both["flux_fit"]
    assert match_catalogs(both, true, band="r").n_matched_true == 0   # then flux (1e5)
    plain = QTable({"x": [5.0], "y": [5.0], "flux": [1e3]})
    assert match_catalogs(both, plain).n_matched_true == 0
    assert match_catalogs(QTable({"x": [5.0], "y": [5.0], "flux_fit": [1e3]}),
                          plain).n_matched_true == 1


def tan_wcs(scale_arcsec=0.4, crval=(150.0, 2.0)):
    from astropy.wcs import WCS
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [40.0, 30.0]
    wcs.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
    return wcs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sky_matching_through_a_wcs_equals_pixel_matching(seed):
    """Pixel catalogs converted through a TAN WCS of 0.4 arcsec pixels: matching within
    0.2 arcsec on the sky pairs the same stars as matching within 0.5 pixels."""
    rng = np.random.default_rng(seed)
    _, true = random_catalogs(rng, 0, 400, 80)
    # estimates near most true stars (some near two), and spurious ones
    near = rng.choice(len(true), 300)
    est = estimate_table(np.append(true["x"][near] + rng.normal(0, 0.3, 300),
                                   rng.uniform(0, 80, 60)),
                         np.append(true["y"][near] + rng.normal(0, 0.3, 300),
                                   rng.uniform(0, 80, 60)),
                         np.append(true["flux_r"][near] * rng.uniform(0.7, 1.3, 300),
                                   10 ** rng.uniform(3, 3.6, 60)))
    wcs = tan_wcs()
    by_pixels = match_catalogs(est, true, band="r")
    through_wcs = match_catalogs(est, true, band="r", wcs=wcs,
                                 max_separation=0.2 * u.arcsec)
    assert 100 < len(by_pixels.pairs) < 300
    assert_array_equal(through_wcs.pairs, by_pixels.pairs)
    assert (through_wcs.tpr, through_wcs.ppv) == (by_pixels.tpr, by_pixels.ppv)
    # the same in other angle units, and with SkyCoord or ra/dec columns
    with_sky = QTable(est)
    with_sky["sky_centroid"] = wcs.pixel_to_world(est["x_fit"], est["y_fit"])
    sky = wcs.pixel_to_world(true["x"], true["y"])
    radec = QTable({"ra": sky.ra, "dec": sky.dec, "flux_r": true["flux_r"]})
    result = match_catalogs(with_sky, radec, band="r", max_separation=0.2 / 3600 * u.deg)
    assert_array_equal(result.pairs, by_pixels.pairs)
    # border: pixel positions of a sky-only table come through the WCS
    cut = match_catalogs(est, true, band="r", border=5, image_shape=(80, 80))
    sky_cut = match_catalogs(with_sky, radec, band="r", border=5, image_shape=(80, 80),
                             wcs=wcs, max_separation=0.2 * u.arcsec)
    assert_array_equal(sky_cut.pairs, cut.pairs)
    assert sky_cut.n_true == cut.n_true < len(true)


def test_sky_matching_uses_angular_separation():
    """At declination 60 a step of 2 arcsec in RA is 1 arcsec on the sky."""
    from astropy.coordinates import SkyCoord
    true = QTable({"skycoord": SkyCoord([10.0, 20.0] * u.deg, [60.0, 60.0] * u.deg)})
    est = QTable({"skycoord": SkyCoord([10.0 + 1.9 / 3600, 20.0 + 2.1 / 3600] * u.deg,
                                       [60.0, 60.0] * u.deg)})
    result = match_catalogs(est, true, max_mag_difference=None,
                            max_separation=1.0 * u.arcsec)
    assert result.pairs.tolist() == [[0, 0]]


def test_sky_matching_errors_name_the_problem():
    true = truth_table([10.0], [10.0], [1e3])
    est = estimate_table([10.0], [10.0], [1e3])
    arcsec = 0.2 * u.arcsec
    with pytest.raises(ValueError, match="no sky positions.*pass wcs="):
        match_catalogs(est, true, band="r", max_separation=arcsec)
    with pytest.raises(ValueError, match="rule='any' uses the L-infinity distance"):
        match_catalogs(est, true, band="r", rule="any", wcs=tan_wcs(),
                       max_separation=arcsec)
    with pytest.raises(ValueError, match="positive angle"):
        match_catalogs(est, true, band="r", max_separation=0.2 * u.m)
    with pytest.raises(ValueError, match="positive angle"):
        match_catalogs(est, true, band="r", max_separation=-arcsec)
    radec = QTable({"ra": [150.0], "dec": [2.0], "flux_r": [1e3]})
    with pytest.raises(ValueError, match="'ra' needs an angle unit"):
        match_catalogs(est, radec, band="r", wcs=tan_wcs(), max_separation=arcsec)
    from astropy.wcs import WCS
    with pytest.raises(ValueError, match="celestial"):
        match_catalogs(est, true, band="r", wcs=WCS(naxis=2), max_separation=arcsec)
    # a pixel separation given as a Quantity in pixels is a pixel separation
    assert match_catalogs(est, true, band="r", max_separation=0.5 * u.pix).tpr == 1.0
