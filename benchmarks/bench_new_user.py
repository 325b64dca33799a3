"""A new user's survey, from the training guide alone: does a model trained in the
guide's budget beat photutils, with a count interval that holds the truth?

Issue 27's run, repeated as docs/training.rst says, on whatever else the machine is
doing (run it beside another job to see a laptop's figures):

1. The "observed" field: 200 x 200 pixels rendered by photutils (not by starnet's
   simulator) through a photutils ``MoffatPSF(alpha=3, beta=2.367)`` (FWHM 3.5 px,
   wide wings: a 25-pixel stamp holds 98.6 % of its light), sky 300 e-/px, 0.05
   stars/px with Pareto fluxes (index 1) from 300 to 1e5 e-, Poisson noise.
2. The prior from the image (`starnet.prior_estimate.estimate_prior`, ``f_min`` =
   2.5 times the flux noise), the model from the image
   (`~starnet.StarNetDeblender.from_nddata`: tile and stamp sizes from the PSF).
3. ``fit(max_time=...)`` for ``--minutes`` (threads chosen by starnet), the photutils
   F1 of the validation images beside the model's after each epoch.
4. The score on the observed field and on ``--n-test`` further fields of the same
   sky: one-to-one F1 (0.5 px, 0.5 mag, 4-px border left out) of the stars brighter
   than 700 e- (5.9 times the flux noise), and the 90 % interval of their number from
   200 posterior catalogs; beside photutils' DAOPHOT-like pipeline
   (`starnet.baselines.daophot_catalog`: local MMM background, ``min_separation=1``)
   with its defaults and with the best of 18 settings (detection threshold 3, 5 or 8
   sky sigmas, fitted square 3, 5 or 7 px, detection kernel 0.75 or 1 times the PSF's
   FWHM), chosen by its F1 on the observed field against the truth (an advantage
   starnet does not get).

Run::

    python benchmarks/bench_new_user.py --minutes 15 --folder runs/new-user
"""

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import MoffatPSF

from starnet import StarFieldPrior, StarNetDeblender, match_catalogs
from starnet.baselines import daophot_catalog
from starnet.prior_estimate import estimate_prior, flux_noise
from starnet.psf import psf_fwhm

PSF = MoffatPSF(alpha=3.0, beta=2.367)
SKY = 300.0
SKY_STARS = StarFieldPrior(mu=0.05, f_min=300.0, f_max=1e5, alpha=1.0, bands=["r"])
LIMIT = 700.0
MARGIN = 8
BORDER = 4


def render_field(seed, size=200):
    """A photutils-rendered field (NDData in electrons) and its true stars."""
    stars = SKY_STARS.sample((size + 2 * MARGIN, size + 2 * MARGIN), seed=seed)
    stars["x"] -= MARGIN
    stars["y"] -= MARGIN
    params = QTable({"x_0": np.asarray(stars["x"]), "y_0": np.asarray(stars["y"]),
                     "flux": np.asarray(stars["flux_r"])})
    light = make_model_image((size, size), PSF, params, model_shape=(51, 51))
    data = np.random.default_rng(10_000 + seed).poisson(light + SKY).astype(np.float32)
    image = NDData(data[None], unit=u.electron,
                   meta={"bands": ["r"], "psf": [PSF], "background": [SKY]})
    inside = ((stars["x"] >= -0.5) & (stars["x"] < size - 0.5)
              & (stars["y"] >= -0.5) & (stars["y"] < size - 0.5))
    return image, stars[inside]


def f1(catalog, truth, shape):
    """One-to-one F1 of the catalog's stars above the limit against the true ones."""
    truth = truth[np.asarray(truth["flux_r"]) >= LIMIT]
    catalog = catalog[u.Quantity(catalog["flux_r"], u.electron).value >= LIMIT]
    return match_catalogs(catalog, truth, band="r", border=BORDER, image_shape=shape).f1


def best_photutils(image, truth, shape):
    """The settings of `daophot_catalog` with the best F1 on ``image``, and that F1."""
    fwhm = psf_fwhm(PSF)
    scores = {}
    for threshold in (3.0, 5.0, 8.0):
        for fit_shape in (3, 5, 7):
            for factor in (0.75, 1.0):
                settings = dict(threshold=threshold, fit_shape=fit_shape, fwhm=factor * fwhm)
                scores[tuple(settings.items())] = f1(
                    daophot_catalog(image, band="r", **settings), truth, shape)
    best = max(scores, key=scores.get)
    return dict(best), scores[best]


def count_interval(deblender, image, seed, n_samples=200):
    """Posterior mean and 90 % interval of the number of stars above the limit."""
    samples = deblender.sample(image, n_samples=n_samples, seed=seed, progress=False)
    bright = np.asarray(u.Quantity(samples["flux_r"], u.electron).value) >= LIMIT
    counts = np.bincount(samples["sample"][bright], minlength=n_samples)
    return counts.mean(), *np.quantile(counts, [0.05, 0.95])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget")
    parser.add_argument("--n-test", type=int, default=10)
    parser.add_argument("--folder", default="runs/new-user")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="photutils")
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (200, 200)

    observed, truth = render_field(seed=0)
    started = time.perf_counter()
    f_min = float(np.round(2.5 * flux_noise(PSF, SKY), -1))
    estimate = estimate_prior(observed, f_min=f_min)
    prior = estimate.prior
    true_mu = SKY_STARS.mu * (f_min / SKY_STARS.f_min) ** -SKY_STARS.alpha
    print(f"prior: f_min {f_min:g}, mu {prior.mu:.4f} +- {estimate.mu_err:.4f} (true "
          f"{true_mu:.4f}), alpha {prior.alpha:.2f} +- {estimate.alpha_err:.2f} (true 1.0), "
          f"f_max {prior.f_max:.3g} (true 1e5)")
    deblender = StarNetDeblender.from_nddata(observed, prior=prior)
    print(f"tile {deblender.grid.tile_size} px, stamp {deblender.stamp_size} px")
    path = folder / f"model-{args.minutes:g}min.pt"
    if path.exists():
        deblender = StarNetDeblender.load(path)
    else:
        history = deblender.fit(max_time=args.minutes * 60, n_epochs=10 ** 6,
                                batches_per_epoch=100,
                                margin=round(2 * psf_fwhm(PSF)),
                                checkpoint=folder / f"model-{args.minutes:g}min.ckpt")
        deblender.provenance["command"] = (f"python benchmarks/bench_new_user.py "
                                           f"--minutes {args.minutes:g}")
        deblender.save(path)
        for name in ("val_f1", "baseline_f1", "val_count_bias", "val_coverage",
                     "images_per_second"):
            history[name].info.format = ".3f"
        history["epoch", "steps", "val_f1", "baseline_f1", "val_count_bias",
                "val_coverage", "images_per_second"].pprint_all()
        print(f"trained: {int(history['steps'].sum())} steps, prior and training "
              f"{(time.perf_counter() - started) / 60:.1f} min")

    best, best_f1 = best_photutils(observed, truth, shape)
    print(f"photutils' best settings on the observed field: {best} (F1 {best_f1:.3f})")
    fields = [(observed, truth)] + [render_field(seed=1 + k) for k in range(args.n_test)]
    rows = []
    for k, (image, stars) in enumerate(fields):
        n_true = int(np.sum(np.asarray(stars["flux_r"]) >= LIMIT))
        mean, low, high = count_interval(deblender, image, seed=k)
        rows.append({"field": k, "n_true": n_true,
                     "starnet_f1": f1(deblender(image, progress=False), stars, shape),
                     "photutils_f1": f1(daophot_catalog(image, band="r"), stars, shape),
                     "photutils_best_f1": f1(daophot_catalog(image, band="r", **best),
                                             stars, shape),
                     "count": mean, "low": low, "high": high,
                     "covered": bool(low <= n_true <= high)})
    table = QTable(rows=rows)
    for name in ("starnet_f1", "photutils_f1", "photutils_best_f1"):
        table[name].info.format = ".3f"
    for name in ("count", "low", "high"):
        table[name].info.format = ".1f"
    table.pprint_all()
    first, rest = table[0], table[1:]
    print(f"observed field: starnet F1 {first['starnet_f1']:.3f}, photutils "
          f"{first['photutils_f1']:.3f} (best settings {first['photutils_best_f1']:.3f}); "
          f"count {first['count']:.1f} ({first['low']:.0f}, {first['high']:.0f}) for "
          f"{first['n_true']} true")
    if len(rest):
        bias = np.mean(rest["count"] / rest["n_true"] - 1)
        print(f"{len(rest)} further fields: starnet F1 {np.mean(rest['starnet_f1']):.3f}, "
              f"photutils {np.mean(rest['photutils_f1']):.3f} (best settings "
              f"{np.mean(rest['photutils_best_f1']):.3f}); count bias {bias:+.1%}, "
              f"90 % interval covers {int(np.sum(rest['covered']))}/{len(rest)}")


if __name__ == "__main__":
    main()
