import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData
from photutils.psf import CircularGaussianPRF

from starnet import StarFieldPrior, simulate_starfield
from starnet.baselines.daophot import _pixel_integrated
from starnet.psf import psf_fwhm
from starnet.prior_estimate import estimate_prior, flux_noise

PSF = CircularGaussianPRF(fwhm=4.0)
TRUTH = StarFieldPrior(mu=0.01, f_min=700.0, alpha=0.6, bands=["r"])


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_prior_fitted_to_bright_stars_recovers_the_truth(seed):
    """Fields drawn from a known prior: the fitted mu and alpha lie within three of
    their reported standard errors of the truth."""
    image, _ = simulate_starfield((200, 200), prior=TRUTH, psf=PSF, background=500.0,
                                  seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate = estimate_prior(image, f_min=700.0)
    assert abs(estimate.prior.alpha - 0.6) < 3 * estimate.alpha_err
    assert abs(estimate.prior.mu - 0.01) < 3 * estimate.mu_err
    assert estimate.prior.f_min == 700.0 and estimate.prior.bands == ["r"]


def test_flux_noise_of_a_wide_gaussian_is_the_analytic_value():
    """For a PSF much wider than a pixel, sum(p^2) = 1 / (4 pi sigma^2)."""
    sigma = 5.0
    psf = CircularGaussianPRF(fwhm=sigma * 2 * np.sqrt(2 * np.log(2)))
    assert flux_noise(psf, 100.0, size=61) == pytest.approx(np.sqrt(100 * 4 * np.pi * sigma ** 2),
                                                            rel=0.01)


def test_fwhm_of_a_photutils_gaussian():
    assert psf_fwhm(_pixel_integrated(CircularGaussianPRF(fwhm=4.0))) == pytest.approx(4.0, abs=0.2)


def test_too_few_bright_stars_is_an_error():
    rng = np.random.default_rng(0)
    image = NDData(rng.normal(500, np.sqrt(500), (1, 60, 60)), unit=u.electron,
                   meta={"bands": ["r"], "psf": [PSF], "background": [500.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="too few to fit the prior"):
            estimate_prior(image, f_min=700.0)
