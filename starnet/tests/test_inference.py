"""starnet.inference on its own: an encoder and tensors, no deblender."""

import warnings

import numpy as np
import pytest
import torch
from astropy.utils.exceptions import AstropyDeprecationWarning

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.encoder import StarNetEncoder
from starnet.inference import (chunk_tiles, count_pmfs, draw_catalogs, modal_catalog,
                               prepare_image, region_tiles)

BANDS = ["r", "i"]
BACKGROUND = [686.0, 1123.0]
PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
PRIOR = StarFieldPrior(mu=0.05, bands=BANDS)
SHAPE = (27, 30)


@pytest.fixture(scope="module")
def inputs():
    image, _ = simulate_starfield(SHAPE, prior=PRIOR, psf=PSF, background=BACKGROUND,
                                  seed=1, stamp_size=7)
    return prepare_image(image, bands=BANDS, psfs=[PSF, PSF], stamp_size=7)


def encoder(n_colors=1):
    torch.manual_seed(0)
    return StarNetEncoder(n_bands=2, hidden=8, tile_hidden=16, n_colors=n_colors)


def test_blocks_give_the_one_shot_catalog_and_count(inputs):
    """The modal catalog and count pmf of an untrained encoder, block by block, equal
    the one-shot results; the pmf of the whole image is that of `count_pmfs`."""
    network = encoder()
    assert inputs.shape == SHAPE and inputs.image.shape == (1, 2, *SHAPE)
    assert chunk_tiles(SHAPE, chunk_size=256, tile_size=2) is None
    assert chunk_tiles(SHAPE, chunk_size=8, tile_size=2) == 4
    whole, whole_offset, whole_pmf = modal_catalog(network, inputs)
    rows, offset, pmf = modal_catalog(network, inputs, chunk_tiles=4)
    assert len(rows["locs"]) == len(whole["locs"]) > 0
    for key in whole:
        np.testing.assert_allclose(rows[key], whole[key], rtol=2e-6, atol=1e-7, err_msg=key)
    full = np.zeros(offset + len(pmf))
    full[offset:] = pmf
    [counted] = count_pmfs(network, inputs, chunk_tiles=4)
    np.testing.assert_allclose(counted[:len(full)], full, atol=1e-9)
    assert whole_offset + len(whole_pmf) == offset + len(pmf)


def test_regions_that_partition_the_image_partition_its_tiles(inputs):
    left = np.zeros(SHAPE, bool)
    left[:, :13] = True
    tiles = [region_tiles(region, SHAPE, tile_size=2) for region in (left, ~left)]
    assert tiles[0].shape == (14, 15)
    np.testing.assert_array_equal(tiles[0] ^ tiles[1], True)
    with pytest.raises(ValueError, match="boolean array of the image's shape"):
        region_tiles(left[:, 1:], SHAPE, tile_size=2)
    pmf_left, pmf_right = count_pmfs(encoder(n_colors=2), inputs, [left, ~left],
                                     n_samples=5)
    assert pmf_left.sum() == pytest.approx(1) and pmf_right.sum() == pytest.approx(1)


def test_draws_keep_the_stars_inside_the_image(inputs):
    draws = draw_catalogs(encoder(), inputs, 3, generator=torch.Generator().manual_seed(0))
    assert len(draws) == 3
    for locs, fluxes in draws:
        assert locs.shape[1] == 2 and fluxes.shape == (len(locs), 2)
        assert np.all((locs >= -0.5) & (locs < np.array(SHAPE[::-1]) - 0.5))


def test_progress_bar_is_a_deprecated_name_of_progress():
    deblender = StarNetDeblender(prior=PRIOR, psf=PSF, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7)
    image, _ = simulate_starfield((16, 16), prior=PRIOR, psf=PSF, background=BACKGROUND,
                                  seed=2, stamp_size=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # an untrained model's catalog
        expected = deblender(image, progress=False)
        with pytest.warns(AstropyDeprecationWarning, match='"progress_bar" was deprecated'):
            catalog = deblender(image, progress_bar=False)
        with pytest.warns(AstropyDeprecationWarning):
            deblender.sample(image, n_samples=2, progress_bar=False)
        with pytest.warns(AstropyDeprecationWarning):
            deblender.count_posterior(image, progress_bar=False)
    np.testing.assert_array_equal(catalog["x_fit"], expected["x_fit"])


def spread_encoder():
    """An untrained encoder with a density spread that varies between tiles."""
    network = encoder()
    torch.manual_seed(1)
    spread = StarNetEncoder(n_bands=2, hidden=8, tile_hidden=16, density_cells=4)
    spread.load_state_dict(network.state_dict(), strict=False)
    torch.nn.init.normal_(spread.spread_head.weight, 0.0, 0.3)
    torch.nn.init.constant_(spread.spread_head.bias, -1.0)     # spreads near 0.3
    return network.eval(), spread.eval()


def test_density_spread_blocks_give_the_one_shot_count_and_widen_it(inputs):
    """With cells of 4 tiles (the 14 x 15 tile grid has partial cells), the count pmfs
    block by block equal the one-shot ones; the modal catalog is that of the same
    network without the spread, and the count has about the same mean but a larger
    variance."""
    plain, network = spread_encoder()
    whole, whole_offset, whole_pmf = modal_catalog(network, inputs)
    rows, offset, pmf = modal_catalog(network, inputs, chunk_tiles=3)   # rounded up to 4
    assert whole_offset == offset

    def padded(values, length):     # the kept tails may differ by terms below 1e-13
        return np.pad(values, (0, length - len(values)))

    length = max(len(pmf), len(whole_pmf))
    np.testing.assert_allclose(padded(pmf, length), padded(whole_pmf, length), atol=1e-9)
    np.testing.assert_allclose(rows["locs"], whole["locs"], rtol=2e-6, atol=1e-7)
    left = np.zeros(SHAPE, bool)
    left[:, :13] = True
    with torch.no_grad():
        q = network(inputs.image, inputs.background)
    for chunk in (None, 4):
        [counted, in_left] = count_pmfs(network, inputs, [np.ones(SHAPE, bool), left],
                                        chunk_tiles=chunk)
        np.testing.assert_allclose(counted[offset:offset + length], padded(pmf, length),
                                   atol=1e-9)
        np.testing.assert_allclose(
            in_left, q.count_pmf(region_tiles(left, SHAPE, tile_size=2)), atol=1e-9)
    plain_rows, plain_offset, plain_pmf = modal_catalog(plain, inputs)
    np.testing.assert_allclose(plain_rows["locs"], whole["locs"], rtol=2e-6, atol=1e-7)

    def moments(offset, pmf):
        k = offset + np.arange(len(pmf))
        return np.dot(k, pmf), np.dot(k ** 2, pmf) - np.dot(k, pmf) ** 2

    (mean, variance), (plain_mean, plain_variance) = (moments(offset, pmf),
                                                      moments(plain_offset, plain_pmf))
    # the same for Poisson tiles; these untrained ones hold 1.6 stars of at most 3 each
    assert mean == pytest.approx(plain_mean, rel=0.05)
    assert variance > 1.3 * plain_variance


def assert_region_counts_as_one_shot(network, inputs):
    """The count pmf of the image's left part, block by block and in one go, is the
    one-shot posterior's (`TiledPosterior.count_pmf` of the region's tiles)."""
    left = np.zeros(SHAPE, bool)
    left[:, :13] = True
    with torch.no_grad():
        q = network(inputs.image, inputs.background)
    for chunk in (None, 4):
        [in_left] = count_pmfs(network, inputs, [left], chunk_tiles=chunk)
        np.testing.assert_allclose(
            in_left, q.count_pmf(region_tiles(left, SHAPE, tile_size=2)), atol=1e-9)


def test_pair_correlation_blocks_give_the_one_shot_count_and_narrow_it(inputs):
    """With a pair head (and a density spread), the count pmfs block by block equal the
    one-shot ones, pairs across blocks included; the modal catalog is unchanged and the
    count keeps its mean with a smaller variance."""
    plain, spread = spread_encoder()
    torch.manual_seed(2)
    network = StarNetEncoder(n_bands=2, hidden=8, tile_hidden=16, density_cells=4,
                             pair_correlations=True)
    network.load_state_dict(spread.state_dict(), strict=False)
    torch.nn.init.normal_(network.pair_head.weight, 0.0, 0.3)
    torch.nn.init.zeros_(network.pair_head.bias)     # weights near 0.2, correlations -0.2
    network.eval()
    whole, whole_offset, whole_pmf = modal_catalog(network, inputs)
    rows, offset, pmf = modal_catalog(network, inputs, chunk_tiles=4)
    assert whole_offset == offset
    length = max(len(pmf), len(whole_pmf))
    np.testing.assert_allclose(np.pad(pmf, (0, length - len(pmf))),
                               np.pad(whole_pmf, (0, length - len(whole_pmf))), atol=1e-9)
    spread_rows, spread_offset, spread_pmf = modal_catalog(spread, inputs)
    np.testing.assert_allclose(rows["locs"], spread_rows["locs"], rtol=2e-6, atol=1e-7)
    assert_region_counts_as_one_shot(network, inputs)

    def moments(offset, pmf):
        k = offset + np.arange(len(pmf))
        return np.dot(k, pmf), np.dot(k ** 2, pmf) - np.dot(k, pmf) ** 2

    (mean, variance), (spread_mean, spread_variance) = (
        moments(offset, pmf), moments(spread_offset, spread_pmf))
    assert mean == pytest.approx(spread_mean, abs=1e-6)
    assert variance < 0.9 * spread_variance


def test_count_tail_blocks_give_the_one_shot_count_and_raise_it(inputs):
    """With a count tail, the count pmfs block by block (blocks of whole density cells)
    equal the one-shot ones and the modal catalog is unchanged; the count is higher."""
    plain, spread = spread_encoder()
    network = StarNetEncoder(**dict(spread.config(), count_tail=True)).eval()
    network.load_state_dict(spread.state_dict())
    with torch.no_grad():
        network.head.bias[3] += 3.0        # crowded tiles: the tail matters
        spread.head.bias[3] += 3.0
    whole, whole_offset, whole_pmf = modal_catalog(network, inputs)
    rows, offset, pmf = modal_catalog(network, inputs, chunk_tiles=4)
    assert whole_offset == offset
    np.testing.assert_allclose(pmf, whole_pmf, atol=1e-9)
    no_tail_rows, no_tail_offset, no_tail_pmf = modal_catalog(spread, inputs)
    np.testing.assert_array_equal(rows["locs"], no_tail_rows["locs"])
    assert_region_counts_as_one_shot(network, inputs)

    def mean(offset, pmf):
        return np.dot(offset + np.arange(len(pmf)), pmf)

    assert mean(offset, pmf) > mean(no_tail_offset, no_tail_pmf) + 1.0
    with pytest.raises(ValueError, match="count_tail needs density cells"):
        StarNetEncoder(n_bands=1, count_tail=True)


def test_spread_and_pair_heads_read_their_own_channels():
    """With both heads, the spread is the softplus of the spread head's output and the
    side weights the first four of the softmax of the pair head's five."""
    network = StarNetEncoder(n_bands=1, hidden=8, tile_hidden=16, density_cells=4,
                             pair_correlations=True).eval()
    with torch.no_grad():
        for head in (network.spread_head, network.pair_head):
            head.weight.zero_()
        network.spread_head.bias.fill_(0.7)
        network.pair_head.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        q = network(torch.full((1, 1, 16, 16), 900.0), torch.tensor(700.0))
    assert torch.allclose(q.spread, torch.nn.functional.softplus(torch.tensor(0.7)))
    expected = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 0)[:4]
    assert torch.allclose(q.pair_weights, expected.expand(1, 8, 8, 4))


def test_density_cells_need_independent_tiles():
    with pytest.raises(ValueError, match="density_cells must be 0"):
        StarNetEncoder(n_bands=1, n_colors=2, density_cells=4)
    with pytest.raises(ValueError, match="pair_correlations needs independent tiles"):
        StarNetEncoder(n_bands=1, n_colors=2, pair_correlations=True)
