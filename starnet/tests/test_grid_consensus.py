"""The catalog agreed on by the shifted tile grids (starnet.grid_consensus)."""

import numpy as np
import pytest
import torch
from astropy.nddata import NDData

from starnet import StarFieldPrior, StarNetDeblender, match_catalogs, simulate_starfield
from starnet.grid_consensus import merge_grid_catalogs, shifted_input
from starnet.inference import EncoderInput


@pytest.fixture(scope="module")
def m2():
    return StarNetDeblender.pretrained("sdss-m2")


def rows(x, flux, detection=0.8):
    n = len(x)
    return {"locs": np.c_[x, np.full(n, 7.0)].reshape(n, 2), "sd": np.full((n, 2), 0.1),
            "fluxes": np.c_[flux, 2 * np.asarray(flux)].reshape(n, 2).astype(float),
            "flux_sd": np.full((n, 2), 0.2), "detection": np.full(n, detection)}


def test_shifted_input_adds_masked_background_at_the_top_left():
    """The image moves by (dy, dx); the new pixels are the background and masked; a PSF
    map that is linear in position stays linear, read at the shifted tile centres."""
    image = torch.arange(2 * 6 * 8, dtype=torch.float32).reshape(1, 2, 6, 8) + 100.0
    background = torch.tensor([10.0, 20.0]).reshape(1, 2, 1, 1)
    mask = torch.zeros(1, 2, 6, 8, dtype=torch.bool)
    rows_, cols_ = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    psf = torch.stack([rows_, cols_])[None]            # descriptor = tile centre (row, col)
    inputs = EncoderInput(image, background, {}, mask, psf, None)
    shifted = shifted_input(inputs, 1, 1, tile_size=2)
    assert shifted.shape == (7, 9)
    assert torch.equal(shifted.image[..., 1:, 1:], image)
    assert torch.equal(shifted.image[0, :, 0, :], background[0, :, 0].expand(2, 9))
    assert shifted.mask[..., 0, :].all() and shifted.mask[..., :, 0].all()
    assert not shifted.mask[..., 1:, 1:].any()
    # new tile i covers original pixels 2i - 1 .. 2i: centre 2i - 0.5 = tile 0.5 less
    assert shifted.psf.shape[-2:] == (4, 5)
    np.testing.assert_allclose(shifted.psf[0, 0, 1:3, 0], [0.5, 1.5])
    np.testing.assert_allclose(shifted.psf[0, 1, 0, 1:4], [0.5, 1.5, 2.5])
    # one axis at a time, with a background map: the map is padded by its edge values
    background_map = torch.arange(2 * 6 * 8, dtype=torch.float32).reshape(1, 2, 6, 8)
    inputs = EncoderInput(image, background_map, {}, None, psf, None)
    down = shifted_input(inputs, 1, 0, tile_size=2)
    assert down.shape == (7, 8) and down.mask is None
    assert torch.equal(down.background[..., 0, :], background_map[..., 0, :])
    assert torch.equal(down.image[..., 0, :], background_map[..., 0, :])
    np.testing.assert_allclose(down.psf[0, 0, :, 0], [0.0, 0.5, 1.5, 2.0])
    np.testing.assert_allclose(down.psf[0, 1, 0], [0.0, 1.0, 2.0, 3.0])
    right = shifted_input(inputs, 0, 1, tile_size=2)
    assert right.shape == (6, 9) and torch.equal(right.image[..., :, 1:], image)
    np.testing.assert_allclose(right.psf[0, 1, 0], [0.0, 0.5, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(right.psf[0, 0, :, 0], [0.0, 1.0, 2.0])
    assert shifted_input(inputs, 0, 0, tile_size=2) is inputs
    with pytest.raises(ValueError, match="offsets must lie in 0 .. 1"):
        shifted_input(inputs, 2, 0, tile_size=2)


def test_merge_keeps_stars_that_enough_grids_find():
    """Stars are merged under the 0.5 pixel / 0.5 magnitude rule and averaged (fluxes
    geometrically); the detection probability counts a missing grid as 0."""
    grids = [rows([3.0, 10.0, 20.0], [1000.0, 500.0, 800.0]),
             rows([3.2, 10.3], [1210.0, 5000.0]),       # the second is 2.5 mag brighter
             rows([3.1, 20.6], [1000.0, 800.0]),        # 0.6 px from the third
             rows([2.9], [1000.0], detection=0.4)]
    merged = merge_grid_catalogs(grids, min_grids=2)
    assert merged["n_grids"].tolist() == [4]
    np.testing.assert_allclose(merged["locs"], [[3.05, 7.0]])
    np.testing.assert_allclose(merged["fluxes"][0], [1000 * 1.21 ** 0.25, 2000 * 1.21 ** 0.25])
    np.testing.assert_allclose(merged["detection"], [(3 * 0.8 + 0.4) / 4])   # the mean
    # with one grid enough: 20.0 and 20.6 are two stars; 10.0 and 10.3, too far apart
    # in magnitude to be grouped, are too close to be two stars: one is left
    everything = merge_grid_catalogs(grids, min_grids=1)
    assert sorted(everything["n_grids"].tolist()) == [1, 1, 1, 4]
    assert np.sum(np.abs(everything["locs"][:, 0] - 10.15) < 0.2) == 1
    # a star that one grid reads twice: the group of fewer grids goes
    twice = merge_grid_catalogs([rows([5.0, 5.1], [1e3, 1e3]), rows([5.05], [1e3]),
                                 rows([5.0], [1e3])], min_grids=1)
    assert twice["n_grids"].tolist() == [3]
    # grids that find nothing
    empty = merge_grid_catalogs([rows([], []) for _ in range(4)], min_grids=2)
    assert empty["locs"].shape == (0, 2) and empty["fluxes"].shape == (0, 2)
    assert empty["detection"].shape == empty["n_grids"].shape == (0,)


def test_bad_requests_are_refused(m2):
    one = rows([3.0], [1e3])
    for bad in (0, 5, 2.5):
        with pytest.raises(ValueError, match="min_grids must be an integer in 1 .. 4"):
            merge_grid_catalogs([one] * 4, min_grids=bad)
    with pytest.raises(ValueError, match="at least one catalog"):
        merge_grid_catalogs([], min_grids=1)
    checkerboard = StarNetDeblender(prior=m2.prior, psf=list(m2.psfs), hidden=4,
                                    background=m2.background, tile_hidden=8, n_colors=2)
    image, _ = simulate_starfield((12, 12), prior=m2.prior, psf=list(m2.psfs),
                                  background=m2.background, seed=0)
    with pytest.raises(ValueError, match="needs a model of independent tiles"):
        checkerboard(image, background="given", grid_consensus=True)


def test_the_count_posterior_is_the_unshifted_grids(m2):
    """The catalog changes, the count posterior in its meta does not."""
    image, _ = simulate_starfield((40, 40), prior=StarFieldPrior(mu=0.1, bands=["r", "i"]),
                                  psf=list(m2.psfs), background=m2.background, seed=2)
    one = m2(image, background="given", progress=False)
    four = m2(image, background="given", progress=False, grid_consensus=True)
    for key in ("n_stars_mean", "n_stars_q05", "n_stars_q95"):
        assert four.meta[key] == one.meta[key]
    assert len(four) != len(one) or not np.allclose(four["x_fit"], one["x_fit"])
    tiles = (np.floor(four["y_fit"] + 0.5) // 2) * 20 + np.floor(four["x_fit"] + 0.5) // 2
    assert np.all(np.diff(tiles) >= 0)                # sorted by tile, as one grid's


def test_consensus_is_invariant_to_one_pixel_shifts(m2):
    """Read on every grid, an image and the same sky one pixel further right and down
    give the same stars away from the edges; one grid alone does not. The tile grids'
    placements are all read, but the context branch pools cells of 4 x 4 tiles fixed to
    the image, so a shift moves a star's context a little: the same stars, within 0.02
    pixel (a tenth of a bright star's position error), not to the last bit."""
    prior = StarFieldPrior(mu=0.04, bands=["r", "i"])
    big, _ = simulate_starfield((61, 61), prior=prior, psf=list(m2.psfs),
                                background=m2.background, seed=4, margin=6)

    def crop(offset):
        meta = dict(big.meta, background=np.asarray(big.meta["background"]))
        if np.ndim(meta["background"]) == 3:
            meta["background"] = meta["background"][:, offset:offset + 60,
                                                    offset:offset + 60]
        return NDData(big.data[:, offset:offset + 60, offset:offset + 60], unit=big.unit,
                      meta=meta)

    def interior(catalog, offset):
        x, y = catalog["x_fit"] + offset, catalog["y_fit"] + offset
        keep = (x > 14) & (x < 46) & (y > 14) & (y < 46)
        return catalog[keep], np.c_[x[keep], y[keep]]

    def agreement(**options):
        a, xy_a = interior(m2(crop(0), background="given", progress=False, **options), 0)
        b, xy_b = interior(m2(crop(1), background="given", progress=False, **options), 1)
        distance = np.sqrt(((xy_a[:, None] - xy_b[None]) ** 2).sum(-1))
        same = (distance < 0.02).sum()
        return same / max(len(a), len(b)), len(a)

    consensus, n_stars = agreement(grid_consensus=True)
    single, _ = agreement()
    assert n_stars > 20
    assert consensus >= 0.9
    assert single < 0.8


def test_consensus_finds_isolated_stars_on_every_grid(m2):
    """Bright isolated stars: every grid finds them, where they are."""
    rng = np.random.default_rng(2)
    x, y = np.meshgrid(np.arange(8.0, 44, 9), np.arange(8.0, 44, 9))
    x, y = x.ravel() + rng.uniform(-0.5, 0.5, x.size), y.ravel() + rng.uniform(-0.5, 0.5, x.size)
    from starnet.simulate import StarFieldRenderer
    renderer = StarFieldRenderer(list(m2.psfs))
    flux = torch.tensor([[3e4, 6e4]]).expand(x.size, 2)[None]
    light = renderer.render(torch.tensor(np.c_[x, y], dtype=torch.float32)[None], flux,
                            torch.ones(1, x.size, dtype=bool), (52, 52))[0].numpy()
    sky = np.asarray(m2.background).reshape(2, 1, 1) + light
    data = sky + np.sqrt(sky) * rng.standard_normal(sky.shape)
    image = NDData(data, unit="electron",
                   meta={"bands": ["r", "i"], "psf": list(m2.psfs),
                         "background": np.asarray(m2.background)})
    catalog = m2(image, background="given", progress=False, grid_consensus=True)
    truth = {"x": x, "y": y, "flux_r": np.full(x.size, 3e4)}
    match = match_catalogs(catalog, truth, band="r", max_separation=0.2)
    assert match.n_matched_true == x.size
    assert (catalog["n_grids"][match.pairs[:, 0]] == 4).all()
    assert "n_grids" not in m2(image, background="given", progress=False).colnames
