"""Learning curve of a model for a new survey: F1 and 90 % count coverage against training.

The worked example of docs/training.rst, end to end, for a DECam-like one-band survey:
a Gaussian PSF of FWHM 4 pixels (photutils' ``CircularGaussianPRF``) on a sky of 500
electrons per pixel.

1. The "observed" field: 300 x 300 pixels rendered by photutils (not by starnet's
   simulator) from a sky whose stars follow a Pareto law of index 0.6 down to 350
   electrons, 0.02 stars per pixel, with Poisson noise.
2. The prior is chosen from that image as the page says: ``f_min`` = 5 times the flux
   noise of an isolated star (`starnet.prior_estimate.flux_noise`, rounded), ``mu``
   and ``alpha`` fitted to its bright stars (`starnet.prior_estimate.estimate_prior`).
   Stars fainter than ``f_min`` (a third of the sky's) are not in the model.
3. One model per budget of ``--steps`` (each from scratch, its learning rate decaying
   over its own budget, as ``fit(n_steps=...)`` does), tiles of 4 pixels, saved to
   ``--folder`` and reused when there.
4. Each model catalogues ``--n-test`` further photutils-rendered 100 x 100 fields of the
   same sky; its modal catalog is scored against the true stars brighter than ``f_min``
   (one-to-one, 0.5 pixel and 0.5 mag, 4-pixel border left out), and the 90 %
   interval of its star count against their true number. photutils' DAOPHOT-like
   pipeline (`starnet.baselines.daophot_catalog`) is scored on the same fields.

Each model is also scored on fields of a sky cut at ``f_min`` (no stars fainter than
the model's prior knows), and a fourth model's prior reaches 2.5 times the flux noise
(its count and F1 are of the stars above the catalog's limit, 5 times the flux
noise, from its posterior catalogs). Prints a table and writes a figure. Run (about
45 minutes on 2 cores)::

    python benchmarks/learning_curve.py --output docs/_static/learning_curve.png
"""

import argparse
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import CircularGaussianPRF

from starnet import StarFieldPrior, StarNetDeblender, match_catalogs
from starnet.baselines import daophot_catalog
from starnet.prior_estimate import estimate_prior, flux_noise

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PSF = CircularGaussianPRF(fwhm=4.0)
SKY = 500.0
SKY_STARS = StarFieldPrior(mu=0.02, f_min=350.0, f_max=1e6, alpha=0.6, bands=["r"])
MARGIN = 8
BORDER = 4


def render_field(shape, seed, sky_stars=SKY_STARS):
    """A photutils-rendered field of the sky (NDData in electrons) and its true stars."""
    rows, cols = shape
    stars = sky_stars.sample((rows + 2 * MARGIN, cols + 2 * MARGIN), seed=seed)
    stars["x"] -= MARGIN
    stars["y"] -= MARGIN
    params = QTable({"x_0": np.asarray(stars["x"]), "y_0": np.asarray(stars["y"]),
                     "flux": np.asarray(stars["flux_r"])})
    light = make_model_image(shape, PSF, params, model_shape=(25, 25))
    rng = np.random.default_rng(10_000 + seed)
    data = rng.poisson(light + SKY).astype(np.float32)[None]
    image = NDData(data, unit=u.electron,
                   meta={"bands": ["r"], "psf": [PSF], "background": [SKY]})
    inside = ((stars["x"] >= -0.5) & (stars["x"] < cols - 0.5)
              & (stars["y"] >= -0.5) & (stars["y"] < rows - 0.5))
    return image, stars[inside]


def cut_sky(f_min):
    """The sky's stars above ``f_min`` only (the same density of those)."""
    return StarFieldPrior(mu=SKY_STARS.mu * (f_min / SKY_STARS.f_min) ** -SKY_STARS.alpha,
                          f_min=f_min, f_max=SKY_STARS.f_max, alpha=SKY_STARS.alpha,
                          bands=["r"])


def trained_model(path, prior, n_steps, seed=0):
    """The model trained for ``n_steps`` (loaded from ``path`` when it exists)."""
    if Path(path).exists():
        return StarNetDeblender.load(path)
    deblender = StarNetDeblender(prior=prior, psf=PSF, background=[SKY], tile_size=4,
                                 seed=seed)
    deblender.fit(n_steps=n_steps, batches_per_epoch=100, batch_size=16,
                  image_shape=(64, 64), margin=MARGIN, seed=seed,
                  checkpoint=Path(path).with_suffix(".ckpt"), progress=False)
    deblender.provenance["command"] = ("python benchmarks/learning_curve.py "
                                       f"(prior f_min {prior.f_min:g}, {n_steps} steps)")
    deblender.save(path)
    return deblender


def score(catalog, truth, limit, shape):
    """One-to-one F1 of the stars brighter than ``limit`` against the true ones."""
    truth = truth[np.asarray(truth["flux_r"]) >= limit]
    catalog = catalog[u.Quantity(catalog["flux_r"], u.electron).value >= limit]
    return match_catalogs(catalog, truth, band="r", border=BORDER, image_shape=shape)


def evaluate(deblender, fields, limit, shape, n_samples):
    """Mean F1, count bias and 90 % coverage of the number of stars above ``limit``
    (from ``n_samples`` posterior catalogs: the 5 and 95 % quantiles of their counts),
    over the fields."""
    f1s, covered, bias = [], 0, []
    for k, (image, truth) in enumerate(fields):
        f1s.append(score(deblender(image, progress=False), truth, limit, shape).f1)
        samples = deblender.sample(image, n_samples=n_samples, seed=k, progress=False)
        # a model whose prior starts at the limit counts all its stars (q may put a
        # flux a little below f_min); one whose prior reaches fainter, those above it
        bright = (np.asarray(samples["flux_r"]) >= limit if deblender.prior.f_min < limit
                  else np.ones(len(samples), bool))
        counts = np.bincount(samples["sample"][bright], minlength=n_samples)
        low, high = np.quantile(counts, [0.05, 0.95])
        n_true = int(np.sum(np.asarray(truth["flux_r"]) >= limit))
        covered += int(low <= n_true <= high)
        bias.append(counts.mean() / n_true - 1)
    return {"f1": float(np.mean(f1s)), "count_bias": float(np.mean(bias)),
            "coverage_90": covered / len(fields)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[500, 1500, 4500])
    parser.add_argument("--low-f-min-steps", type=int, default=4500,
                        help="steps of the model whose prior reaches 2.5 times the flux "
                             "noise (0: none)")
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--n-samples", type=int, default=100,
                        help="posterior catalogs per field behind the count interval")
    parser.add_argument("--folder", default="runs/learning-curve")
    parser.add_argument("--output", default=None, help="figure file (png)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="photutils")

    observed, _ = render_field((300, 300), seed=0)
    noise = flux_noise(PSF, SKY)
    limit = float(np.round(5 * noise, -2))     # the catalog's limit: 5 x the flux noise
    models = [(limit, n_steps) for n_steps in args.steps]
    if args.low_f_min_steps:
        models.append((float(np.round(2.5 * noise, -1)), args.low_f_min_steps))
    priors = {}
    for f_min in sorted({f_min for f_min, _ in models}):
        estimate = estimate_prior(observed, f_min=f_min)
        priors[f_min] = estimate.prior
        print(f"prior from the observed field for f_min {f_min:.0f}: mu "
              f"{estimate.prior.mu:.4f} +- {estimate.mu_err:.4f} (sky: "
              f"{cut_sky(f_min).mu:.4f} above f_min), alpha {estimate.prior.alpha:.2f} +- "
              f"{estimate.alpha_err:.2f} (sky: {SKY_STARS.alpha}), from {estimate.n_bright} "
              f"stars above {estimate.complete_above:.0f} electrons")

    shape = (100, 100)
    skies = {"faint": SKY_STARS, "cut": cut_sky(limit)}
    fields = {name: [render_field(shape, 1 + k, sky) for k in range(args.n_test)]
              for name, sky in skies.items()}
    rows = []
    Path(args.folder).mkdir(parents=True, exist_ok=True)
    for f_min, n_steps in models:
        name = f"steps-{n_steps}" + ("" if f_min == limit else f"-fmin-{f_min:g}")
        deblender = trained_model(Path(args.folder) / f"{name}.pt", priors[f_min], n_steps)
        history = deblender.training_history
        row = {"method": f"StarNet, f_min {f_min:g}, {n_steps} steps", "prior_f_min": f_min,
               "steps": n_steps,
               "train_minutes": float(np.sum(history["seconds"])) / 60,
               "images_per_second": float(np.median(history["images_per_second"]))}
        for sky, sky_fields in fields.items():
            scores = evaluate(deblender, sky_fields, limit, shape, args.n_samples)
            row.update({f"{key}_{sky}": value for key, value in scores.items()})
        rows.append(row)
    row = {"method": "photutils (DAOPHOT-like)", "prior_f_min": np.nan, "steps": 0,
           "train_minutes": 0.0,
           "images_per_second": np.nan}
    for sky, sky_fields in fields.items():
        f1s = [score(daophot_catalog(image, band="r", fwhm=4.0), truth, limit, shape).f1
               for image, truth in sky_fields]
        row.update({f"f1_{sky}": float(np.mean(f1s)), f"count_bias_{sky}": np.nan,
                    f"coverage_90_{sky}": np.nan})
    rows.append(row)
    table = QTable(rows=rows)
    for name in table.colnames[1:]:
        table[name].info.format = ".3f"
    print(f"{args.n_test} test fields of 100 x 100 pixels; scored: stars above {limit:.0f} "
          f"electrons. Sky 'faint': stars down to {SKY_STARS.f_min:.0f} electrons; sky "
          f"'cut': only those above {limit:.0f}")
    table.pprint_all()
    if args.output:
        plot(table, limit, args.output)
        print(f"wrote {args.output}")


def plot(table, limit, path):
    """F1 and count coverage against training steps, on both skies (the table gives
    the minutes each fit took)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    f_min = np.asarray(table["prior_f_min"])
    curve = np.flatnonzero(f_min == limit)
    others = np.flatnonzero(np.isfinite(f_min) & (f_min != limit))
    minutes = np.asarray(table["steps"])
    for sky, style in (("faint", "o-"), ("cut", "s--")):
        label = {"faint": "sky with fainter stars", "cut": "sky cut at the limit"}[sky]
        left.plot(minutes[curve], np.asarray(table[f"f1_{sky}"])[curve], style, label=label)
        right.plot(minutes[curve], np.asarray(table[f"coverage_90_{sky}"])[curve], style,
                   label=label)
        for i in others:
            left.plot(minutes[i], table[f"f1_{sky}"][i], "*", ms=12, color="C3",
                      label="prior to 2.5 x flux noise" if sky == "faint" else None)
            right.plot(minutes[i], table[f"coverage_90_{sky}"][i], "*", ms=12, color="C3",
                       label="prior to 2.5 x flux noise" if sky == "faint" else None)
        left.axhline(table[f"f1_{sky}"][-1], color="grey", ls=style[1:] or "-", lw=1,
                     label=f"photutils, {label}")
    left.set_xlabel("training steps (16 images of 64 x 64 each)")
    left.set_ylabel("F1 (0.5 px, 0.5 mag)")
    left.legend(fontsize=7)
    right.axhline(0.9, color="grey", ls=":", label="nominal 0.9")
    right.set_xlabel("training steps (16 images of 64 x 64 each)")
    right.set_ylabel("fields whose 90 % interval of N holds the truth")
    right.set_ylim(-0.05, 1.05)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
