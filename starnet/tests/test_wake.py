import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable

from starnet import PowerLawPSF
from starnet.simulate import StarFieldRenderer, add_noise
from starnet.wake import expected_log_likelihood, fit_psf_to_catalogs

TRUE = PowerLawPSF(sigma1=1.0, sigma2=2.4, sigmap=3.0, beta=3.0, b=0.08, p0=0.005)
SHAPE = (40, 40)
BACKGROUND = 500.0


@pytest.fixture(scope='module')
def field():
    """Bright, well-separated stars through a known PSF, with their true catalog."""
    rng = np.random.default_rng(4)
    x = np.array([8.3, 20.6, 31.1, 9.8, 27.4, 18.2])
    y = np.array([9.1, 8.4, 12.7, 29.9, 30.6, 20.3])
    flux = rng.uniform(3e4, 1e5, len(x))
    stars = StarFieldRenderer([TRUE], stamp_size=25).render(
        torch.tensor(np.stack([x, y], -1), dtype=torch.float32)[None],
        torch.tensor(flux, dtype=torch.float32)[None, :, None],
        torch.ones(1, len(x), dtype=torch.bool), SHAPE)
    data = add_noise(stars + BACKGROUND, generator=torch.Generator().manual_seed(0))
    image = NDData(data[0].double().numpy(), unit=u.electron,
                   meta={'bands': ['r'], 'psf': [TRUE], 'background': [BACKGROUND]})
    truth = QTable({'sample': np.zeros(len(x), dtype=int), 'x': x, 'y': y,
                    'flux_r': flux * u.electron})
    return image, truth


def test_recovers_the_psf_and_background(field):
    image, truth = field
    wrong = PowerLawPSF(sigma1=1.3, sigma2=2.4, sigmap=3.0, beta=3.0, b=0.08, p0=0.005)
    low_sky = NDData(image.data, unit=image.unit,
                     meta={**image.meta, 'background': [0.9 * BACKGROUND]})
    fit = fit_psf_to_catalogs(low_sky, truth, psf=[wrong], n_steps=300, learning_rate=0.03)
    assert fit.psfs[0].sigma1.value == pytest.approx(1.0, rel=0.04)
    assert fit.background_scale[0] == pytest.approx(1 / 0.9, rel=0.01)
    assert fit.log_likelihood['fitted'] > fit.log_likelihood['start']


def test_true_psf_scores_best(field):
    image, truth = field
    wide = PowerLawPSF(sigma1=1.2, sigma2=2.4, sigmap=3.0, beta=3.0, b=0.08, p0=0.005)
    assert (expected_log_likelihood(image, truth, psf=[TRUE])
            > expected_log_likelihood(image, truth, psf=[wide]))


def test_needs_power_law_psfs(field):
    image, truth = field
    with pytest.raises(ValueError, match='power-law'):
        fit_psf_to_catalogs(image, truth, psf=[np.ones((5, 5))], n_steps=1)
