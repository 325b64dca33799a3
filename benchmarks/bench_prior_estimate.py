"""Is `starnet.prior_estimate.estimate_prior` unbiased? Fits over many photutils fields.

For each sky below, ``--n-fields`` fields are drawn from a known Pareto prior, rendered
by photutils (not by starnet's simulator) with Poisson noise and stars in an 8-pixel
margin, and the prior is estimated from each as docs/training.rst says: ``f_min`` = 2.5
times `~starnet.prior_estimate.flux_noise`, ``f_max`` fitted, the crowding bias
corrected by ``--corrections`` simulated images (0: the fit of the catalogue alone).
The true ``mu`` is the sky's density of stars above that ``f_min``. Printed per sky:
the mean estimate and its standard error over the fields against the truth, the mean
and rms of the pulls ``(estimate - truth) / stated error`` (unbiased, honest errors:
mean near 0, rms near 1), and the fraction of fields within one stated error.

* ``new-user``: issue 27's field, a photutils ``MoffatPSF(alpha=3, beta=2.367)`` (FWHM
  3.5 px), sky 300 e-, 0.05 stars/px from 300 to 1e5 e-, index 1.0, 200 x 200 px; also
  fitted with the old fixed ``f_max=1e6`` (``--old-f-max``).
* ``decam``: the training guide's Gaussian of FWHM 4 px, sky 500 e-, 0.02 stars/px
  from 350 e- to 1e6, index 0.6, 300 x 300 px.
* ``sdss``: M2's r KL PSF (bundled ``sdss-m2``), sky 686 e-, 0.06 stars/px from 250 to
  1e6 e- (0.03 above 1000 e-), index 0.5, 200 x 200 px. Each sky's stars reach below
  the ``f_min`` of the estimate, as a real sky's do (``estimate_prior`` assumes it);
  ``sdss-gap`` is the same sky without its stars under 1000 e-, the case its docstring
  warns of.

Run (about 75 minutes on one core beside another job; ``--corrections 0
--old-f-max``, the estimates before the correction and with the old fixed ``f_max``,
about 20)::

    python benchmarks/bench_prior_estimate.py --n-fields 20
"""

import argparse
import warnings

import numpy as np
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import CircularGaussianPRF, MoffatPSF

from starnet import StarFieldPrior, StarNetDeblender
from starnet.prior_estimate import estimate_prior, flux_noise

MARGIN = 8


def skies():
    """name -> (PSF, sky e-/px, prior of the sky's stars, image side)."""
    sdss_psf = StarNetDeblender.pretrained("sdss-m2").psfs[0]
    return {
        "new-user": (MoffatPSF(alpha=3.0, beta=2.367), 300.0,
                     StarFieldPrior(mu=0.05, f_min=300.0, f_max=1e5, alpha=1.0,
                                    bands=["r"]), 200),
        "decam": (CircularGaussianPRF(fwhm=4.0), 500.0,
                  StarFieldPrior(mu=0.02, f_min=350.0, f_max=1e6, alpha=0.6,
                                 bands=["r"]), 300),
        "sdss": (sdss_psf, 686.0,
                 StarFieldPrior(mu=0.06, f_min=250.0, f_max=1e6, alpha=0.5,
                                bands=["r"]), 200),
        "sdss-gap": (sdss_psf, 686.0,
                     StarFieldPrior(mu=0.03, f_min=1000.0, f_max=1e6, alpha=0.5,
                                    bands=["r"]), 200),
    }


def render(psf, sky, stars_prior, size, seed):
    """A photutils-rendered field (NDData, electrons) of the sky's stars."""
    stars = stars_prior.sample((size + 2 * MARGIN, size + 2 * MARGIN), seed=seed)
    params = QTable({"x_0": np.asarray(stars["x"]) - MARGIN,
                     "y_0": np.asarray(stars["y"]) - MARGIN,
                     "flux": np.asarray(stars["flux_r"])})
    light = make_model_image((size, size), psf, params, model_shape=(51, 51))
    data = np.random.default_rng(10_000 + seed).poisson(light + sky).astype(np.float32)
    return NDData(data[None], unit=u.electron,
                  meta={"bands": ["r"], "psf": [psf], "background": [sky]})


def tail(prior, flux):
    """The prior's probability of a star brighter than ``flux``."""
    top = (prior.f_max / prior.f_min) ** -prior.alpha
    return ((flux / prior.f_min) ** -prior.alpha - top) / (1 - top)


def summary(name, values, errors, truth):
    values, errors = np.asarray(values), np.asarray(errors)
    pulls = (values - truth) / errors
    return (f"{name:<22} {truth:>8.4g} {values.mean():>9.4g} +- "
            f"{values.std(ddof=1) / np.sqrt(len(values)):<7.2g} "
            f"{values.mean() / truth - 1:>+7.1%} {pulls.mean():>+6.2f} "
            f"{np.sqrt(np.mean(pulls ** 2)):>5.2f} {np.mean(np.abs(pulls) <= 1):>6.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-fields", type=int, default=20)
    parser.add_argument("--skies", nargs="+", default=["new-user", "decam", "sdss"],
                        choices=list(skies()))
    parser.add_argument("--old-f-max", action="store_true",
                        help="also fit the new-user fields with f_max=1e6")
    parser.add_argument("--corrections", type=int, default=3,
                        help="simulated images of the bias correction (0: none)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="photutils")
    print(f"{'sky, parameter':<22} {'truth':>8} {'mean estimate':>20} {'bias':>7} "
          f"{'pull':>6} {'rms':>5} {'in 1 sd':>6}")
    for name in args.skies:
        psf, sky, stars_prior, size = skies()[name]
        f_min = float(np.round(2.5 * flux_noise(psf, sky), -1))
        true_mu = stars_prior.mu * tail(stars_prior, f_min)
        variants = {"": None}
        if args.old_f_max and name == "new-user":
            variants[", f_max 1e6"] = 1e6
        for label, f_max in variants.items():
            fits = [estimate_prior(render(psf, sky, stars_prior, size, seed), f_min=f_min,
                                   f_max=f_max, corrections=args.corrections, seed=seed)
                    for seed in range(args.n_fields)]
            print(summary(f"{name}{label}: mu", [e.prior.mu for e in fits],
                          [e.mu_err for e in fits], true_mu))
            print(summary(f"{name}{label}: alpha", [e.prior.alpha for e in fits],
                          [e.alpha_err for e in fits], stars_prior.alpha))
            if f_max is None:
                tops = np.array([e.prior.f_max for e in fits])
                print(f"{'':<22} f_max fitted: median {np.median(tops):.3g} "
                      f"(true {stars_prior.f_max:.3g}); f_min {f_min:g}, "
                      f"{np.mean([e.n_bright for e in fits]):.0f} stars above "
                      f"{fits[0].complete_above:.0f} e- per field")


if __name__ == "__main__":
    main()
