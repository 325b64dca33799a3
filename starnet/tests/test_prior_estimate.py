import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import CircularGaussianPRF, MoffatPSF

from starnet import StarFieldPrior, simulate_starfield
from starnet.baselines.daophot import _pixel_integrated
from starnet.psf import psf_fwhm
from starnet.prior_estimate import PriorEstimate, _corrected, estimate_prior, flux_noise

PSF = CircularGaussianPRF(fwhm=4.0)
TRUTH = StarFieldPrior(mu=0.01, f_min=700.0, alpha=0.6, bands=["r"])


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_prior_fitted_to_bright_stars_recovers_the_truth(seed):
    """Sparse fields drawn from a known prior: the fit of the bright stars alone (no
    bias correction) lies within three of its reported standard errors of the truth."""
    image, _ = simulate_starfield((200, 200), prior=TRUTH, psf=PSF, background=500.0,
                                  seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate = estimate_prior(image, f_min=700.0, corrections=0)
    assert abs(estimate.prior.alpha - 0.6) < 3 * estimate.alpha_err
    assert abs(estimate.prior.mu - 0.01) < 3 * estimate.mu_err
    assert estimate.prior.f_min == 700.0 and estimate.prior.bands == ["r"]


def test_simulated_bias_correction_removes_the_crowding_bias():
    """A crowded field rendered by photutils through a wide-winged Moffat PSF (issue
    27's survey: 0.05 stars/px, index 1 from 300 to 1e5 e-): blends steepen the fitted
    index by more than its standard error; the simulation-based correction brings it
    and the density within one standard error of the truth, and the fitted upper end
    lies within 30 % of the true 1e5."""
    psf = MoffatPSF(alpha=3.0, beta=2.367)
    sky = StarFieldPrior(mu=0.05, f_min=300.0, f_max=1e5, alpha=1.0, bands=["r"])
    stars = sky.sample((216, 216), seed=0)
    params = QTable({"x_0": np.asarray(stars["x"]) - 8, "y_0": np.asarray(stars["y"]) - 8,
                     "flux": np.asarray(stars["flux_r"])})
    light = make_model_image((200, 200), psf, params, model_shape=(51, 51))
    data = np.random.default_rng(10_000).poisson(light + 300.0).astype(float)
    image = NDData(data[None], unit=u.electron,
                   meta={"bands": ["r"], "psf": [psf], "background": [300.0]})
    true_mu = 0.05 * 300 / 330
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = estimate_prior(image, f_min=330.0, corrections=0)
        corrected = estimate_prior(image, f_min=330.0, corrections=3, seed=0)
    assert raw.prior.alpha - 1.0 > raw.alpha_err
    assert abs(corrected.prior.alpha - 1.0) < corrected.alpha_err
    assert abs(corrected.prior.mu - true_mu) < corrected.mu_err
    assert corrected.prior.f_max == pytest.approx(1e5, rel=0.3)


def _estimate(mu, mu_err, alpha, alpha_err):
    prior = StarFieldPrior(mu=mu, f_min=300.0, f_max=1e5, alpha=alpha, bands=["r"])
    return PriorEstimate(prior=prior, n_bright=100, complete_above=3000.0,
                         alpha_err=alpha_err, mu_err=mu_err)


def test_correction_removes_the_simulated_bias_and_adds_its_error():
    """The bootstrap correction: ``mu`` divided by the simulated fits' mean over the
    estimate they came from, ``alpha`` moved by the difference, and the correction's
    own error (the simulated fits' over the square root of their number) added in
    quadrature; fits that reproduce the estimate leave it where it is."""
    observed = _estimate(0.02, 0.002, 0.6, 0.03)
    simulated = [_estimate(0.021, 0.0021, 0.62, 0.04), _estimate(0.023, 0.0023, 0.64, 0.02)]
    corrected = _corrected(observed, simulated)
    assert corrected.prior.mu == pytest.approx(0.02 / 1.1)
    assert corrected.prior.alpha == pytest.approx(0.57)
    assert corrected.mu_err / corrected.prior.mu == pytest.approx(np.sqrt(0.1 ** 2 + 0.1 ** 2 / 2))
    assert corrected.alpha_err == pytest.approx(np.sqrt(0.03 ** 2 + (0.04 ** 2 + 0.02 ** 2) / 4))
    assert corrected.prior.f_max == 1e5 and corrected.n_bright == 100
    unbiased = _corrected(observed, [_estimate(0.019, 0.002, 0.58, 0.03),
                                     _estimate(0.021, 0.002, 0.62, 0.03)])
    assert unbiased.prior.mu == pytest.approx(0.02) and unbiased.prior.alpha == pytest.approx(0.6)


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
