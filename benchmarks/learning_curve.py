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

Prints a table and writes a figure. Run (about 30 minutes on 2 cores)::

    python benchmarks/learning_curve.py --steps 500 1500 4500 \\
        --output docs/_static/learning_curve.png
"""

import argparse
import time
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


def render_field(shape, seed):
    """A photutils-rendered field of the sky (NDData in electrons) and its true stars."""
    rows, cols = shape
    stars = SKY_STARS.sample((rows + 2 * MARGIN, cols + 2 * MARGIN), seed=seed)
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
                                       f"--steps {n_steps}")
    deblender.save(path)
    return deblender


def score(catalog, truth, f_min, shape):
    """One-to-one F1 against the true stars brighter than ``f_min``."""
    truth = truth[np.asarray(truth["flux_r"]) >= f_min]
    return match_catalogs(catalog, truth, band="r", border=BORDER, image_shape=shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[500, 1500, 4500])
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--folder", default="runs/learning-curve")
    parser.add_argument("--output", default=None, help="figure file (png)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="photutils")

    observed, _ = render_field((300, 300), seed=0)
    f_min = float(np.round(5 * flux_noise(PSF, SKY), -2))
    estimate = estimate_prior(observed, f_min=f_min)
    prior = estimate.prior
    true_mu = SKY_STARS.mu * (f_min / SKY_STARS.f_min) ** -SKY_STARS.alpha
    print(f"prior from the observed field: f_min {f_min:.0f}, mu {prior.mu:.4f} +- "
          f"{estimate.mu_err:.4f} (sky: {true_mu:.4f} above f_min), alpha "
          f"{prior.alpha:.2f} +- {estimate.alpha_err:.2f} (sky: {SKY_STARS.alpha}), from "
          f"{estimate.n_bright} stars above {estimate.complete_above:.0f} electrons")

    fields = [render_field((100, 100), seed=1 + k) for k in range(args.n_test)]
    shape = (100, 100)
    rows = []
    Path(args.folder).mkdir(parents=True, exist_ok=True)
    for n_steps in args.steps:
        deblender = trained_model(Path(args.folder) / f"steps-{n_steps}.pt", prior, n_steps)
        history = deblender.training_history
        f1s, covered, bias, seconds = [], 0, [], 0.0
        for image, truth in fields:
            started = time.perf_counter()
            catalog = deblender(image)
            seconds += time.perf_counter() - started
            f1s.append(score(catalog, truth, f_min, shape).f1)
            n_true = int(np.sum(np.asarray(truth["flux_r"]) >= f_min))
            low, high = catalog.meta["n_stars_q05"], catalog.meta["n_stars_q95"]
            covered += int(low <= n_true <= high)
            bias.append(catalog.meta["n_stars_mean"] / n_true - 1)
        rows.append({"method": f"StarNet {n_steps} steps",
                     "train_minutes": float(np.sum(history["seconds"])) / 60,
                     "images_per_second": float(np.median(history["images_per_second"])),
                     "val_f1": float(history["val_f1"][-1]),
                     "f1": float(np.mean(f1s)), "f1_sd": float(np.std(f1s)),
                     "count_bias": float(np.mean(bias)),
                     "coverage_90": covered / len(fields),
                     "seconds_per_field": seconds / len(fields)})
    f1s, seconds = [], 0.0
    for image, truth in fields:
        started = time.perf_counter()
        catalog = daophot_catalog(image, band="r", fwhm=4.0)
        seconds += time.perf_counter() - started
        catalog = catalog[np.asarray(catalog["flux_r"].value) >= f_min]
        f1s.append(score(catalog, truth, f_min, shape).f1)
    rows.append({"method": "photutils (DAOPHOT-like)", "train_minutes": 0.0,
                 "images_per_second": np.nan, "val_f1": np.nan, "f1": float(np.mean(f1s)),
                 "f1_sd": float(np.std(f1s)), "count_bias": np.nan,
                 "coverage_90": np.nan, "seconds_per_field": seconds / len(fields)})
    table = QTable(rows=rows)
    for name in table.colnames[1:]:
        table[name].info.format = ".3f"
    print(f"{len(fields)} test fields of 100 x 100 pixels; truth: stars above {f_min:.0f} "
          "electrons")
    table.pprint_all()
    if args.output:
        plot(table[:-1], float(table["f1"][-1]), args.output)
        print(f"wrote {args.output}")


def plot(table, daophot_f1, path):
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    minutes = np.asarray(table["train_minutes"])
    left.errorbar(minutes, table["f1"], yerr=np.asarray(table["f1_sd"]), marker="o",
                  label="StarNet")
    left.axhline(daophot_f1, color="grey", ls="--", label="photutils (DAOPHOT-like)")
    left.set_xlabel("training time on 2 cores (min)")
    left.set_ylabel("F1 (0.5 px, 0.5 mag)")
    left.legend()
    right.plot(minutes, table["coverage_90"], marker="o", label="90 % interval of N")
    right.axhline(0.9, color="grey", ls=":", label="nominal 0.9")
    right.set_xlabel("training time on 2 cores (min)")
    right.set_ylabel("fraction of fields covered")
    right.set_ylim(-0.05, 1.05)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
