"""The background encoder estimates the factor on the nominal background from the pixels."""

import numpy as np
import pytest
import torch

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.background import BackgroundEncoder, combine_cells, fit_background

BACKGROUND = [686.0, 1123.0]
PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
# almost no stars: the background alone sets the pixel values, so the factor is identified
PRIOR = StarFieldPrior(mu=1e-4, bands=["r", "i"])
RANGE = (0.8, 1.5)


@pytest.fixture(scope="module")
def deblender():
    deblender = StarNetDeblender(prior=PRIOR, psf=PSF, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7)
    deblender.fit(n_epochs=1, batches_per_epoch=1, batch_size=2, image_shape=(16, 16),
                  n_validation=2, background_range=RANGE, progress=False)
    deblender.fit_background_encoder(n_steps=600, batch_size=8, image_shape=(32, 32),
                                     learning_rate=3e-3, progress=False)
    return deblender


def image_at(scale, seed, shape=(24, 24)):
    image, _ = simulate_starfield(shape, prior=PRIOR, psf=PSF, stamp_size=7, seed=seed,
                                  background=[scale * b for b in BACKGROUND])
    image.meta["background"] = BACKGROUND          # the first guess is not used
    return image


def test_combine_cells_weights_by_precision():
    mean, sd = combine_cells([0.0, 0.3, 1.0], [0.1, 0.1, 1e3])
    assert mean == pytest.approx(0.15, abs=1e-6)   # the vague cell hardly counts
    assert sd == pytest.approx(0.1 / np.sqrt(2), rel=1e-5)


def test_encoder_gives_one_posterior_per_cell():
    encoder = BackgroundEncoder(n_bands=2, cell_size=8, hidden=4)
    mean, sd = encoder(torch.full((3, 2, 20, 30), 700.0), torch.tensor([[[[686.0]], [[1123.0]]]]))
    assert mean.shape == sd.shape == (3, 3, 4)     # 20 x 30 pixels padded to 3 x 4 cells
    assert torch.all(sd > 0)


def test_strips_give_the_whole_image_result():
    """The encoder run strip by strip (strips of 2 cells, halos of 3) gives what one pass
    over the whole image gives, to float32 rounding, on an image with structure in every
    cell and a ragged last strip."""
    torch.manual_seed(0)
    encoder = BackgroundEncoder(n_bands=2, cell_size=4).eval()
    image = 500 + 300 * torch.rand(1, 2, 4 * 11, 4 * 9)
    nominal = torch.tensor([450.0, 650.0]).reshape(1, -1, 1, 1)
    with torch.no_grad():
        whole = encoder(image, nominal)
        strips = encoder.forward_in_strips(image, nominal, strip_cells=2)
    for a, b in zip(whole, strips):
        assert a.shape == b.shape == (1, 11, 9)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.9, 1.2, 1.4])
def test_recovers_the_background_factor(deblender, scale):
    fitted, cells = fit_background(deblender, image_at(scale, seed=int(10 * scale)))
    fit = fitted.meta["background_fit"]
    assert fit["scale"] == pytest.approx(scale, rel=0.05)
    # the map is float32: its mean is the scaled background to float32 rounding
    np.testing.assert_allclose(fitted.meta["background"].mean(axis=(1, 2)),
                               fit["scale"] * np.array(BACKGROUND),
                               rtol=8 * np.finfo(np.float32).eps)
    assert len(cells) == 9 and set(cells.colnames) == {"x", "y", "scale", "log_scale_sd"}


def test_outside_the_trained_range_warns_and_clips(deblender):
    with pytest.warns(UserWarning, match="outside the range"):
        fitted, _ = fit_background(deblender, image_at(3.0, seed=1))
    assert fitted.meta["background_fit"]["scale"] == RANGE[1]


def test_saved_with_the_model(deblender, tmp_path):
    deblender.save(tmp_path / "model.pt")
    loaded = StarNetDeblender.load(tmp_path / "model.pt")
    image = image_at(1.1, seed=4)
    assert (fit_background(loaded, image)[0].meta["background_fit"]
            == fit_background(deblender, image)[0].meta["background_fit"])
    assert len(loaded.background_history) == len(deblender.background_history)


def test_needs_a_background_encoder_trained_over_a_range():
    plain = StarNetDeblender(prior=PRIOR, psf=PSF, background=BACKGROUND, hidden=8,
                             tile_hidden=16, stamp_size=7)
    with pytest.raises(ValueError, match="no background encoder"):
        fit_background(plain, image_at(1.0, seed=0))
    with pytest.raises(ValueError, match="range of backgrounds"):
        plain.fit_background_encoder(n_steps=1)


def test_smoothing_follows_a_background_that_varies(deblender):
    scale = np.where(np.arange(80) < 40, 0.9, 1.3)
    image, _ = simulate_starfield((24, 80), prior=PRIOR, psf=PSF, stamp_size=7, seed=5,
                                  background=np.array(BACKGROUND)[:, None, None]
                                  * np.broadcast_to(scale, (24, 80)))
    image.meta["background"] = BACKGROUND
    fitted, _ = fit_background(deblender, image, smoothing=4.0)
    fitted_scale = fitted.meta["background"][0] / BACKGROUND[0]
    assert fitted.meta["background"].shape == (2, 24, 80)
    np.testing.assert_allclose(fitted.meta["background"][1] / BACKGROUND[1], fitted_scale,
                               rtol=1e-6)                     # float32 maps
    assert np.mean(fitted_scale[:, :16]) == pytest.approx(0.9, rel=0.06)
    assert np.mean(fitted_scale[:, -16:]) == pytest.approx(1.3, rel=0.06)
    # one factor for the whole image: the cells' precision-weighted mean, so within the
    # cells' range (it may sit at the right edge's level: the network is surer there)
    single, cells = fit_background(deblender, image)
    single = single.meta["background_fit"]["scale"]
    assert fitted_scale[:, :16].mean() < single
    assert np.min(cells["scale"]) <= single <= np.max(cells["scale"])
    with pytest.raises(ValueError, match="smoothing must be a positive"):
        fit_background(deblender, image, smoothing=0)


def test_bilinear_to_pixels_matches_map_coordinates():
    """The one-axis-at-a-time interpolation of a cell map equals scipy's bilinear
    map_coordinates on the pixel centres (nearest beyond the outer cell centres)."""
    from scipy.ndimage import map_coordinates

    from starnet.background import _bilinear_to_pixels
    cell_map = np.random.default_rng(0).normal(size=(5, 7))
    rows, cols, cell = 37, 53, 8
    y = (np.arange(rows) + 0.5) / cell - 0.5
    x = (np.arange(cols) + 0.5) / cell - 0.5
    expected = map_coordinates(cell_map, np.meshgrid(y, x, indexing="ij"), order=1,
                               mode="nearest")
    got = _bilinear_to_pixels(cell_map, cell, rows, cols)
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    np.testing.assert_allclose(got, expected, atol=1e-5)
