"""fit_background finds the background that makes the residual of zero median."""

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable

from starnet.background import fit_background

SHAPE = (40, 50)


class PerfectDeblender:
    """Stands in for a deblender whose catalog reproduces the star light exactly."""

    bands = ["r", "i"]
    training_settings = None

    def __init__(self, starlight):
        self.starlight = starlight
        self.backgrounds_seen = []

    def __call__(self, nddata):
        self.backgrounds_seen.append(np.mean(nddata.meta["background"], axis=(1, 2)))
        return QTable({"x_fit": [1.0], "y_fit": [2.0], "flux_r": [1.0] * u.electron,
                       "flux_i": [1.0] * u.electron})

    def render(self, catalog, shape):
        return self.starlight


def _image(true_background, guess, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    starlight = np.stack([5000 * np.exp(-((x - 20) ** 2 + (y - 15) ** 2) / 8.0)] * 2)
    expected = starlight + np.asarray(true_background)[:, None, None]
    data = rng.normal(expected, np.sqrt(expected))
    meta = {"bands": ["r", "i"], "background": np.asarray(guess, dtype=float), "psf": None}
    return NDData(data, unit=u.electron, meta=meta), starlight


def test_recovers_the_background_of_each_band():
    image, starlight = _image([800.0, 1300.0], guess=[686.0, 1123.0])
    deblender = PerfectDeblender(starlight)
    fitted, history = fit_background(deblender, image, n_iterations=12)
    means = fitted.meta["background"].mean(axis=(1, 2))
    # the noise's median is zero: the fit recovers the truth to well under its noise
    np.testing.assert_allclose(means, [800.0, 1300.0], rtol=0.01)
    assert len(history) == 12
    assert fitted.meta["background_fit"]["scales"] == pytest.approx(
        [800 / 686, 1300 / 1123], rel=0.01)
    # every round cataloged the image with the background it was testing
    np.testing.assert_allclose(deblender.backgrounds_seen[-1],
                               [history["background_r"][-1], history["background_i"][-1]])


def test_masked_and_non_finite_pixels_are_left_out():
    image, starlight = _image([800.0, 1300.0], guess=[686.0, 1123.0])
    data = image.data.copy()
    data[:, 5:15, 5:45] = np.nan          # a quarter of the pixels
    data[:, 20:25, :] = 1e6               # saturated, but masked
    mask = np.zeros(data.shape, dtype=bool)
    mask[:, 20:25, :] = True
    broken = NDData(data, mask=mask, unit=image.unit, meta=image.meta)
    fitted, _ = fit_background(PerfectDeblender(starlight), broken, n_iterations=12)
    np.testing.assert_allclose(fitted.meta["background"].mean(axis=(1, 2)), [800.0, 1300.0],
                               rtol=0.01)


def test_stays_within_bounds():
    image, starlight = _image([3000.0, 3000.0], guess=[686.0, 1123.0])
    fitted, _ = fit_background(PerfectDeblender(starlight), image, bounds=(0.9, 1.6))
    assert np.all(fitted.meta["background"].mean(axis=(1, 2)) <= 1.6 * np.array([686, 1123]))


def test_errors():
    image, starlight = _image([800.0, 1300.0], guess=[686.0, 1123.0])
    with pytest.raises(ValueError, match="bounds must be increasing"):
        fit_background(PerfectDeblender(starlight), image, bounds=(1.5, 1.0))
    with pytest.raises(ValueError, match="too small"):
        fit_background(PerfectDeblender(starlight), image, edge=30)
