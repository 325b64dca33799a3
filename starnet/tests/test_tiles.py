import numpy as np
import pytest
import torch

from starnet.tiles import TileCatalog, TileGrid


def catalog(stars, n_bands=1):
    """Batch of one catalog from rows (x, y, flux_1, ..., mask)."""
    stars = np.asarray(stars, dtype=float)
    locs = torch.tensor(stars[None, :, :2], dtype=torch.float32)
    fluxes = torch.tensor(stars[None, :, 2:2 + n_bands], dtype=torch.float32)
    mask = torch.tensor(stars[None, :, 2 + n_bands] > 0)
    return locs, fluxes, mask


@pytest.mark.parametrize(('tile_size', 'shape', 'expected'), [
    (2, (5, 6), (3, 3)), (4, (16, 16), (4, 4)), (4, (17, 3), (5, 1)), (1, (3, 2), (3, 2))])
def test_grid_shape(tile_size, shape, expected):
    assert TileGrid(tile_size=tile_size).grid_shape(shape) == expected


@pytest.mark.parametrize('kwargs', [{'tile_size': 0}, {'tile_size': 1.5},
                                    {'max_sources': 0}])
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError, match='positive integer'):
        TileGrid(**kwargs)


def test_hand_built_catalog():
    # image of 6 rows x 5 cols, tiles of 2 pixels: a 3 x 3 grid whose last column and
    # row are only half covered by the image
    grid = TileGrid(tile_size=2, max_sources=2)
    #        x     y    flux_1 flux_2 mask
    stars = [[0.2, 0.1, 10.0, 11.0, 1],   # tile (0, 0), faintest of three: dropped
             [1.4, -0.3, 50.0, 51.0, 1],  # tile (0, 0), brightest
             [0.9, 1.2, 30.0, 31.0, 1],   # tile (0, 0), second
             [4.4, 5.4, 5.0, 6.0, 1],     # tile (2, 2), in the image's last pixel
             [4.6, 1.0, 99.0, 99.0, 1],   # beyond the last column: ignored
             [-0.6, 2.0, 99.0, 99.0, 1],  # before the first column: ignored
             [2.0, 6.0, 99.0, 99.0, 1],   # below the last row: ignored
             [2.0, 3.0, 99.0, 99.0, 0],   # masked: ignored
             [-0.5, 3.5, 7.0, 8.0, 1],    # tile (2, 0), on its lower-left corner
             [1.5, 2.49, 3.0, 4.0, 1]]    # tile (1, 1), on its left edge
    tiles = grid.to_tiles(*catalog(stars, n_bands=2), (6, 5))

    assert tiles.counts.shape == (1, 3, 3)
    assert tiles.counts[0].tolist() == [[2, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert tiles.n_dropped == 1
    # u = ((x + 0.5) - j R) / R, v = ((y + 0.5) - i R) / R
    expected = {(0, 0): [((1.9 / 2, 0.2 / 2), (50, 51)), ((1.4 / 2, 1.7 / 2), (30, 31))],
                (2, 2): [((0.9 / 2, 1.9 / 2), (5, 6))],
                (2, 0): [((0.0, 0.0), (7, 8))],
                (1, 1): [((0.0, 0.99 / 2), (3, 4))]}
    for (i, j), sources in expected.items():
        for k, (uv, flux) in enumerate(sources):
            np.testing.assert_allclose(tiles.locs[0, i, j, k].numpy(), uv, atol=1e-6)
            np.testing.assert_allclose(tiles.fluxes[0, i, j, k].numpy(), flux)
    # empty slots are padded with position 0.5 and flux 1
    empty = torch.arange(2)[None, None] >= tiles.counts[0][..., None]
    assert torch.all(tiles.locs[0][empty] == 0.5)
    assert torch.all(tiles.fluxes[0][empty] == 1.0)


def test_images_of_a_batch_are_separate():
    grid = TileGrid(tile_size=2, max_sources=1)
    locs = torch.tensor([[[0.0, 0.0], [3.0, 3.0]], [[0.3, 0.3], [0.0, 0.0]]])
    fluxes = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    tiles = grid.to_tiles(locs, fluxes, mask, (4, 4))
    assert tiles.counts.tolist() == [[[1, 0], [0, 1]], [[1, 0], [0, 0]]]
    assert tiles.n_dropped == 0
    assert tiles.fluxes[:, 0, 0, 0, 0].tolist() == [1.0, 3.0]


def test_no_stars():
    grid = TileGrid(tile_size=2, max_sources=3)
    tiles = grid.to_tiles(torch.zeros(2, 0, 2), torch.zeros(2, 0, 1),
                          torch.zeros(2, 0, dtype=bool), (5, 4))
    assert tiles.counts.shape == (2, 3, 2)
    assert tiles.counts.sum() == 0
    assert tiles.n_dropped == 0


@pytest.mark.parametrize('tile_size', [1, 2, 3])
def test_to_pixels_tile_centres(tile_size):
    grid = TileGrid(tile_size=tile_size, max_sources=1)
    centres = grid.to_pixels(torch.full((1, 2, 3, 1, 2), 0.5))
    rows, cols = np.indices((2, 3))
    np.testing.assert_allclose(centres[0, ..., 0, 0].numpy(),
                               cols * tile_size + (tile_size - 1) / 2)
    np.testing.assert_allclose(centres[0, ..., 0, 1].numpy(),
                               rows * tile_size + (tile_size - 1) / 2)


def random_catalog(rng, shape, n_stars, n_bands):
    """Stars over the image and 3 pixels around it, with distinct fluxes."""
    rows, cols = shape
    x = rng.uniform(-3.5, cols + 2.5, n_stars)
    y = rng.uniform(-3.5, rows + 2.5, n_stars)
    fluxes = rng.permutation(n_stars * n_bands).reshape(n_stars, n_bands) + 1.0
    mask = rng.random(n_stars) < 0.9
    return x, y, fluxes, mask


def tensors(x, y, fluxes, mask):
    return (torch.tensor(np.stack([x, y], -1)[None], dtype=torch.float32),
            torch.tensor(fluxes[None], dtype=torch.float32), torch.tensor(mask[None]))


@pytest.mark.parametrize('seed', range(6))
def test_round_trip_random_catalogs(seed):
    rng = np.random.default_rng(seed)
    tile_size = int(rng.integers(1, 5))
    shape = tuple(int(n) for n in rng.integers(3, 20, 2))
    x, y, fluxes, mask = random_catalog(rng, shape, int(rng.integers(0, 40)), 2)
    inside = mask & (x >= -0.5) & (x < shape[1] - 0.5) & (y >= -0.5) & (y < shape[0] - 0.5)
    # independent tile assignment and counts
    tile_row = np.floor((y[inside] + 0.5) / tile_size).astype(int)
    tile_col = np.floor((x[inside] + 0.5) / tile_size).astype(int)
    grid_shape = (-(-shape[0] // tile_size), -(-shape[1] // tile_size))
    counts = np.zeros(grid_shape, dtype=int)
    np.add.at(counts, (tile_row, tile_col), 1)
    max_sources = max(int(counts.max(initial=0)), 1)   # no tile overflows
    grid = TileGrid(tile_size=tile_size, max_sources=max_sources)

    tiles = grid.to_tiles(*tensors(x, y, fluxes, mask), shape)
    assert tiles.n_dropped == 0
    np.testing.assert_array_equal(tiles.counts[0].numpy(), counts)
    assert torch.all((tiles.locs >= 0) & (tiles.locs < 1))

    locs, out_fluxes, out_mask = grid.from_tiles(tiles)
    assert out_mask.sum() == inside.sum()
    got = np.concatenate([out_fluxes[0][out_mask[0]].numpy(),
                          locs[0][out_mask[0]].numpy()], axis=1)
    expected = np.concatenate([fluxes[inside], np.stack([x, y], -1)[inside]], axis=1)
    got = got[np.argsort(got[:, 0])]
    expected = expected[np.argsort(expected[:, 0])]
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize('seed', range(4))
def test_overflow_keeps_brightest_random_catalogs(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (7, 9)
    x, y, fluxes, mask = random_catalog(rng, shape, 80, 1)
    grid = TileGrid(tile_size=3, max_sources=2)
    tiles = grid.to_tiles(*tensors(x, y, fluxes, mask), shape)

    inside = mask & (x >= -0.5) & (x < 8.5) & (y >= -0.5) & (y < 6.5)
    dropped = 0
    for i in range(3):
        for j in range(3):
            here = inside & (np.floor((y + 0.5) / 3) == i) & (np.floor((x + 0.5) / 3) == j)
            brightest = np.sort(fluxes[here, 0])[::-1]
            kept = brightest[:2]
            dropped += len(brightest) - len(kept)
            assert tiles.counts[0, i, j] == len(kept)
            # brightest first
            np.testing.assert_array_equal(tiles.fluxes[0, i, j, :len(kept), 0].numpy(), kept)
    assert dropped > 0
    assert tiles.n_dropped == dropped


def test_from_tiles_mask_follows_counts():
    grid = TileGrid(tile_size=2, max_sources=3)
    counts = torch.tensor([[[0, 3], [1, 2]]])
    tiles = TileCatalog(counts=counts, locs=torch.full((1, 2, 2, 3, 2), 0.25),
                        fluxes=torch.ones(1, 2, 2, 3, 1), n_dropped=0)
    locs, fluxes, mask = grid.from_tiles(tiles)
    assert locs.shape == (1, 12, 2)
    assert fluxes.shape == (1, 12, 1)
    assert mask[0].tolist() == ([False] * 3 + [True] * 3 + [True, False, False]
                                + [True] * 2 + [False])
    # tile (1, 0), position (0.25, 0.25) of the tile: x = 0.5 - 0.5, y = 2.5 - 0.5
    np.testing.assert_allclose(locs[0, 6].numpy(), [0.0, 2.0])


@pytest.mark.parametrize("fwhm, mu, expected", [(2.6, 0.12, 2), (4.0, 0.02, 4), (3.5, 0.05, 3),
                                                (3.5, 0.2, 1), (0.8, 0.001, 1), (9.0, 0.001, 9)])
def test_tiles_are_no_wider_than_the_psf_and_hold_half_a_star(fwhm, mu, expected):
    from starnet.tiles import choose_tile_size
    size = choose_tile_size(fwhm, mu)
    assert size == expected
    assert size <= max(fwhm, 1) and (size == 1 or mu * size ** 2 <= 0.5)


def test_default_tiles_follow_the_psf_and_the_density():
    from photutils.psf import CircularGaussianPRF
    from starnet import StarFieldPrior, StarNetDeblender
    prior = StarFieldPrior(mu=0.02, f_min=350.0, bands=["r"])
    deblender = StarNetDeblender(prior=prior, psf=CircularGaussianPRF(fwhm=4.0),
                                 background=[500.0])
    assert deblender.grid.tile_size == 4
