"""Choosing the prior of a new field from the image itself: its bright stars."""

import dataclasses
import numbers
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from .baselines.daophot import _PRF_OVERSAMPLING, _pixel_integrated, daophot_catalog
from .prior import StarFieldPrior
from .psf import as_psf, choose_stamp_size, pixel_stamps, psf_fwhm
from .images import as_background
from .simulate import simulate_starfield
from .validation import check_image_meta, check_seed

__all__ = ["PriorEstimate", "estimate_prior", "flux_noise"]


@dataclass
class PriorEstimate:
    """A prior fitted to the bright stars of an image (see `estimate_prior`).

    Attributes
    ----------
    prior : `~starnet.StarFieldPrior`
        The prior, with the fitted ``mu`` and ``alpha``.
    n_bright : int
        Stars brighter than ``complete_above`` that the fit used.
    complete_above : float
        Flux (electrons, reference band) above which detection was taken to be complete.
    alpha_err, mu_err : float
        Standard errors of the fitted ``alpha`` and ``mu`` (from the Fisher information
        of ``alpha`` and the Poisson error of ``n_bright``, and the error of the bias
        correction when there is one).
    """

    prior: StarFieldPrior
    n_bright: int
    complete_above: float
    alpha_err: float
    mu_err: float


def flux_noise(psf, background, *, size=25):
    """Standard deviation (electrons) of the best flux estimate of an isolated star.

    For a star of flux ``f`` fitted with a known PSF ``p`` (normalised over pixels) on
    a background ``b`` (electrons per pixel), ``sd(f) = sqrt(b / sum(p**2))`` when the
    star is faint: the noise is the background's. (For a Gaussian PSF of width
    ``sigma`` sampled at points, ``sum(p**2) = 1 / (4 pi sigma**2)``: 135 electrons
    below; integration over pixels widens the PSF a little.)

    >>> from photutils.psf import CircularGaussianPRF
    >>> round(flux_noise(CircularGaussianPRF(fwhm=4.0), 500.0))
    137
    """
    stamp = pixel_stamps(as_psf(psf), size, [0.0], [0.0])[0]
    stamp = stamp / stamp.sum()
    return float(np.sqrt(background / np.sum(stamp ** 2)))


def estimate_prior(nddata, *, f_min, f_max=None, complete_above=None, threshold=3.0,
                   corrections=3, seed=0):
    """Fit the density ``mu`` and Pareto index ``alpha`` of the prior to an image.

    The reference band (the first of ``meta['bands']``) is catalogued with
    `~starnet.baselines.daophot_catalog` (its detection kernel as wide as the PSF: the
    narrower default, tuned for crowded M2, misses isolated stars of a wide PSF).
    Above a flux ``complete_above`` where every star is found, the fluxes are taken
    for a sample of the prior's truncated Pareto law: ``alpha`` is their
    maximum-likelihood index, and ``mu`` is their number per pixel divided by the
    prior's probability of a star being that bright, ``P(f > complete_above | f_min
    <= f <= f_max)``. Without a given ``f_max``, the upper end of the law is fitted
    too: the brightest star's flux (its maximum-likelihood value) raised by the
    expected gap between the brightest of ``n`` stars and the end of the law.

    In a crowded field the catalogue's fluxes are not such a sample: faint
    neighbours add their light and blends are measured as one star, which steepens
    ``alpha`` and raises the count above the limit. The bias is measured and
    removed by simulation (a parametric bootstrap): ``corrections`` images of the
    same shape, PSF and background (with stars beyond the edges too, and the PSF's
    wings to 99.5 % of its light) are simulated from the first estimate, fitted in
    the same way, and each parameter is moved by the difference between the
    simulated fits and the estimate they came from (``mu`` by its ratio); the
    stated errors add the correction's own. Over 20 photutils-rendered fields of
    issue 27's survey (a wide-winged Moffat PSF, 0.05 stars per pixel) this took
    the mean ``alpha`` from 1.084 to 1.042 (true 1.0) and ``mu`` from +27 % to +9 %,
    a quarter of a stated error on average; over three skies the mean error is at
    most 0.6 of a stated error (``benchmarks/bench_prior_estimate.py``).

    Colours keep the defaults of `~starnet.StarFieldPrior`.

    ``f_min`` is the faintest star the model knows. It should reach below the
    faintest star to be catalogued, or the sky's fainter stars are taken for
    brighter ones: in ``benchmarks/learning_curve.py`` (docs/training.rst) a prior
    from 5 times `flux_noise` counted the stars above that limit 14 % too high, one
    from 2.5 times was unbiased.

    Parameters
    ----------
    nddata : `~astropy.nddata.NDData`
        Image in electrons with ``meta['bands']``, ``['psf']`` and ``['background']``.
    f_min : float
        Faintest flux of the prior, electrons in the reference band.
    f_max : float, optional
        Brightest flux of the prior; default: fitted (above).
    complete_above : float, optional
        Default: the larger of ``2 * f_min`` and 20 times `flux_noise`.
    threshold : float, optional
        Detection threshold of the catalogue, in units of the sky noise.
    corrections : int, optional
        Simulated images behind the bias correction (0: none).
    seed : int or `numpy.random.Generator`, optional
        Seed of the simulated images.

    Returns
    -------
    estimate : `PriorEstimate`

    Raises
    ------
    ValueError
        If fewer than 20 stars are brighter than ``complete_above``: too few to fit;
        give the prior by hand.

    Examples
    --------
    >>> from photutils.psf import CircularGaussianPRF
    >>> from starnet import StarFieldPrior, simulate_starfield
    >>> truth_prior = StarFieldPrior(mu=0.01, f_min=700.0, alpha=0.6, bands=["r"])
    >>> image, _ = simulate_starfield((200, 200), prior=truth_prior,
    ...                               psf=CircularGaussianPRF(fwhm=4.0), background=500.0,
    ...                               seed=1)
    >>> estimate = estimate_prior(image, f_min=700.0)
    >>> print(f"mu {estimate.prior.mu:.4f} +- {estimate.mu_err:.4f}, "  # doctest: +ELLIPSIS
    ...       f"alpha {estimate.prior.alpha:.1f} +- {estimate.alpha_err:.2f}")
    mu 0.009... +- 0.001..., alpha 0.6 +- 0.07
    """
    meta = check_image_meta(nddata)
    bands = list(meta["bands"])
    psfs = meta["psf"]
    psfs = list(psfs) if isinstance(psfs, (list, tuple)) else [psfs] * len(bands)
    background = as_background(meta["background"], len(bands)).reshape(len(bands), -1)
    background = np.median(background, axis=1)
    upper = np.inf if f_max is None else f_max
    if not 0 < f_min < upper:
        raise ValueError(f"need 0 < f_min < f_max, got f_min={f_min}, f_max={f_max}")
    if complete_above is None:
        complete_above = max(2 * f_min, 20 * flux_noise(psfs[0], background[0]))
    if not f_min <= complete_above < upper:
        raise ValueError(f"complete_above={complete_above} must lie in [f_min, f_max)")
    if isinstance(corrections, bool) or not isinstance(corrections, numbers.Integral) \
            or corrections < 0:
        raise ValueError(f"corrections must be a whole number >= 0, got {corrections!r}")
    rng = np.random.default_rng(check_seed(seed))
    shape = np.shape(nddata.data)[-2:]
    estimate = _fit_bright(nddata, bands, psfs[0], f_min, f_max, complete_above, threshold)
    if corrections:
        # neighbours beyond the edges and the PSF's wings crowd the image's stars too
        margin = 2 * psf_fwhm(psfs[0])
        stamp_size = choose_stamp_size(psfs)
        simulated = []
        for _ in range(corrections):
            image, _ = simulate_starfield(shape, prior=estimate.prior, psf=psfs,
                                          background=background, noise="poisson",
                                          margin=margin, stamp_size=stamp_size, seed=rng)
            # the same estimator as the image's: f_max fitted unless it was given
            simulated.append(_fit_bright(image, bands, psfs[0], f_min, f_max,
                                         complete_above, threshold))
        estimate = _corrected(estimate, simulated)
    return estimate


def _corrected(estimate, simulated):
    """``estimate`` less the bias of the fits of images simulated from it.

    ``mu`` is divided by the ratio of the simulated fits' mean to ``estimate``'s, and
    ``alpha`` moved by their difference; the errors add the correction's own (the
    simulated fits' errors over the square root of their number).
    """
    prior, n = estimate.prior, len(simulated)
    mu_sims = np.array([fit.prior.mu for fit in simulated])
    ratio = mu_sims.mean() / prior.mu
    shift = np.mean([fit.prior.alpha for fit in simulated]) - prior.alpha
    mu = prior.mu / ratio
    relative_mu_err = np.sqrt((estimate.mu_err / prior.mu) ** 2
                              + np.mean(([fit.mu_err for fit in simulated] / mu_sims) ** 2) / n)
    alpha_err = np.sqrt(estimate.alpha_err ** 2
                        + np.mean([fit.alpha_err ** 2 for fit in simulated]) / n)
    corrected = StarFieldPrior(mu=mu, f_min=prior.f_min, f_max=prior.f_max,
                               alpha=max(prior.alpha - shift, 1e-3), bands=prior.bands)
    return dataclasses.replace(estimate, prior=corrected, mu_err=float(mu * relative_mu_err),
                               alpha_err=float(alpha_err))


def _fit_bright(nddata, bands, psf, f_min, f_max, complete_above, threshold):
    """The `PriorEstimate` of the catalogue's stars above ``complete_above``."""
    catalog = daophot_catalog(nddata, band=bands[0], threshold=threshold,
                              fwhm=psf_fwhm(_pixel_integrated(psf),
                                            step=1 / _PRF_OVERSAMPLING))
    flux = np.asarray(catalog[f"flux_{bands[0]}"].value if len(catalog) else [], float)
    bright = flux[(flux >= complete_above) & (flux <= (np.inf if f_max is None else f_max))]
    if len(bright) < 20:
        raise ValueError(f"only {len(bright)} stars are brighter than {complete_above:.0f} "
                         "electrons: too few to fit the prior; give StarFieldPrior(mu=..., "
                         "alpha=...) by hand")
    if f_max is None:
        f_max = _pareto_end(bright, complete_above)
    alpha, alpha_err = _truncated_pareto_index(bright, complete_above, f_max)
    n_pixels = np.prod(np.shape(nddata.data)[-2:])
    brighter = _pareto_tail(complete_above, alpha, f_min, f_max)
    mu = len(bright) / n_pixels / brighter
    # error of mu from the Poisson error of the count and the error of alpha
    step = 1e-4
    slope = (np.log(_pareto_tail(complete_above, alpha + step, f_min, f_max))
             - np.log(brighter)) / step
    mu_err = mu * np.sqrt(1 / len(bright) + (slope * alpha_err) ** 2)
    prior = StarFieldPrior(mu=mu, f_min=f_min, f_max=f_max, alpha=alpha, bands=bands)
    return PriorEstimate(prior=prior, n_bright=len(bright), complete_above=complete_above,
                         alpha_err=alpha_err, mu_err=mu_err)


def _pareto_end(flux, low):
    """Upper end of the Pareto law of the fluxes above ``low``: the brightest, raised
    by the expected gap (in log flux) between the brightest of ``n`` draws and the
    end, ``1 / (n p(top))`` with ``p`` the density of the log flux at the top."""
    top = flux.max()
    alpha, _ = _truncated_pareto_index(flux, low, top)
    tail = (top / low) ** -alpha
    density = len(flux) * alpha * tail / (1 - tail)
    return float(top * np.exp(1 / density))


def _pareto_tail(flux, alpha, f_min, f_max):
    """``P(f > flux)`` under the Pareto law of index ``alpha`` on ``[f_min, f_max]``."""
    top = (f_max / f_min) ** -alpha
    return ((flux / f_min) ** -alpha - top) / (1 - top)


def _truncated_pareto_index(flux, low, high):
    """Maximum-likelihood Pareto index of ``flux`` on ``[low, high]``, and its error."""
    logs = np.log(flux / low)
    ratio = np.log(high / low)

    def negative_log_likelihood(alpha):
        return -(len(flux) * (np.log(alpha) - np.log1p(-np.exp(-alpha * ratio)))
                 - alpha * logs.sum())

    alpha = minimize_scalar(negative_log_likelihood, bounds=(1e-3, 10.0),
                            method="bounded", options={"xatol": 1e-6}).x
    # Fisher information: n / alpha^2 minus the truncation term
    e = np.exp(-alpha * ratio)
    information = len(flux) * (1 / alpha ** 2 - ratio ** 2 * e / (1 - e) ** 2)
    return float(alpha), float(1 / np.sqrt(information))
