"""Count calibration of a PSF- and prior-reading model on its own training simulator,
one condition at a time.

The images are drawn as ``scripts/train_sdss.py`` draws its training images
(`starnet.training.SimulatedBatches`: 64 x 64 pixels, stars 6 pixels beyond the
edges, the M2 sky) but with every factor pinned: a base condition (0.12 stars per
pixel, the M2 prior's f_max 1e6 e- and Pareto index 0.5, the M2 sky, SDSS's KL PSF at
the centre of field 136, the PSF told exactly, no defects, no density gradient), then
one factor changed at a time. For each condition and model: the relative bias of the
posterior mean count summed over the images, with its standard error, the fraction of
images whose 90 % count interval holds the true number (as the tiles count it: at most
the model's ``max_sources`` per tile, the truth the network is trained on; at 0.3 stars
per pixel about 4 % of the stars lie beyond it), and the dispersion (standard
deviation of the images' ``(mean - true) / posterior sd``; 1 when calibrated).

The training distribution mixes all these conditions, so a forward-KL fit can be right
on average over them and wrong at each one; this bench shows where. It takes seconds,
so it can follow a training run checkpoint by checkpoint.

Run::

    python benchmarks/bench_conditions.py --model sdss scripts/checkpoints/sdss-count.pt

``--sweeps`` sweeps the Pareto index, the FWHM of a Gaussian PSF and f_max (with
defects, so that the brightest stars saturate as in training) across the training
ranges instead.

``--near-bright`` adds, for the first model, where each condition's excess lies: the
posterior mean less the true count per tile, summed over tiles binned by the distance of
the tile's centre to the nearest star brighter than 3e5 e- (as a fraction of all the
condition's stars), with the excess per tile.

A ``--model`` ending in ``.ckpt`` is a checkpoint of ``scripts/train_sdss.py``: its
weights (averaged, if the run averages them) in a network of the bundled ``sdss``'s
architecture.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from photutils.psf import CircularGaussianPRF, MoffatPSF

from starnet import StarFieldPrior, StarNetDeblender
from starnet.datasets import load_m2
from starnet.datasets.sdss import resampled_psf
from starnet.defects import FrameDefects
from starnet.model_files import checkpoint_weights
from starnet.psf import kl_psf_from_psfield, psf_fwhm
from starnet.psf_family import PSFBank, photofield_psfs
from starnet.training import SimulatedBatches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from train_sdss import SDSS, _moffat_alpha  # noqa: E402

BASE = {"density": 0.12, "f_max": 1e6, "alpha": 0.5, "sky": 1.0, "defects": False,
        "psf": "M2 KL", "width_error": 0.0, "gradient": 0.0}

#: (label, changes to the base condition)
CONDITIONS = [
    ("base: 0.12 /px, M2 prior, PSF", {}),
    ("density 0.01", {"density": 0.01}),
    ("density 0.04", {"density": 0.04}),
    ("density 0.2", {"density": 0.2}),
    ("density 0.3", {"density": 0.3}),
    ("f_max 3e5", {"f_max": 3e5}),
    ("f_max 2e7", {"f_max": 2e7}),
    ("alpha 0.35", {"alpha": 0.35}),
    ("alpha 0.75", {"alpha": 0.75}),
    ("sky x 0.5", {"sky": 0.5}),
    ("sky x 2", {"sky": 2.0}),
    ("defects", {"defects": True}),
    ("PSF width error 3 %", {"width_error": 0.03}),
    ("density gradient up to x e", {"gradient": 1.0}),
    ("narrowest field PSF", {"psf": "narrowest"}),
    ("widest field PSF", {"psf": "widest"}),
    ("Gaussian FWHM 2 px", {"psf": "Gaussian 2"}),
    ("Moffat FWHM 5 px", {"psf": "Moffat 5"}),
]

#: one factor swept across its training range (``--sweeps``)
SWEEPS = ([(f"alpha {a}", {"alpha": a}) for a in (0.35, 0.45, 0.55, 0.65, 0.75)]
          + [(f"Gaussian FWHM {w} px", {"psf": f"Gaussian {w}"}) for w in (2, 3, 4, 5, 6)]
          + [(f"f_max {f:.0e}", {"f_max": f, "defects": True}) for f in (3e5, 1e6, 3e6, 2e7)])


def psf_pairs():
    """The (r, i) PSF pairs of the conditions."""
    psfield = SDSS / "psField-002583-2-0136.fit"
    fields = photofield_psfs(SDSS / "photoField-002583-2.fits", ("r", "i"))
    order = sorted(fields, key=lambda f: psf_fwhm(fields[f][0]))

    def field(f):
        return fields[f][0], resampled_psf(fields[f][1], 0.5, 0.5)

    moffat = MoffatPSF(alpha=_moffat_alpha(5.0, 3.0), beta=3.0)
    return {"M2 KL": (kl_psf_from_psfield(psfield, band="r", row=744, col=1024),
                      resampled_psf(kl_psf_from_psfield(psfield, band="i", row=744,
                                                        col=1024), 0.5, 0.5)),
            "narrowest": field(order[0]), "widest": field(order[-1]),
            "Moffat 5": (moffat,) * 2,
            **{f"Gaussian {w}": (CircularGaussianPRF(fwhm=float(w)),) * 2 for w in range(2, 7)}}


def load(name):
    """A deblender from a model name or file, or a train_sdss checkpoint's weights."""
    if not str(name).endswith(".ckpt"):
        return StarNetDeblender.from_name_or_path(name)
    deblender = StarNetDeblender.pretrained("sdss")
    deblender.encoder.load_state_dict(checkpoint_weights(torch.load(name, weights_only=True)))
    return deblender


def draw(condition, psfs, sky, n_images, size, seed):
    """``n_images`` training-like images under ``condition``, in batches of 16."""
    c = dict(BASE, **condition)
    prior = StarFieldPrior(mu=0.12, f_min=1000.0, f_max=1e6, alpha=0.5, bands=("r", "i"))
    batches = SimulatedBatches(
        prior, PSFBank([psfs[c["psf"]]], width_error=c["width_error"]), sky, (size, size),
        margin=6.0, background_range=(c["sky"],) * 2, density_range=(c["density"],) * 2,
        density_gradient=c["gradient"], defects=FrameDefects() if c["defects"] else None,
        f_max_range=(c["f_max"],) * 2, alpha_range=(c["alpha"],) * 2)
    generator = torch.Generator().manual_seed(seed)
    return [batches.draw_batch(min(16, n_images - start), generator=generator)
            for start in range(0, n_images, 16)]


@torch.no_grad()
def tile_counts(deblender, batch):
    """The posterior of the batch's tiles and each tile's true count."""
    encoder = deblender.encoder.eval()
    tiles = deblender.grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes,
                                    batch.catalogs.mask, batch.images.shape[-2:])
    features = encoder.features(batch.images, batch.background,
                                **batch.encoder_inputs(encoder))
    return encoder.tile_posterior(features), tiles.counts.numpy()


def count_errors(deblender, batches):
    """Posterior mean, variance, 5 and 95 % quantiles and truth of each image's count."""
    rows = []
    for batch in batches:
        posterior, counts = tile_counts(deblender, batch)
        for index, n in enumerate(counts.sum(axis=(1, 2))):
            pmf = posterior.image(index).count_pmf()
            k = np.arange(len(pmf))
            mean = pmf @ k
            cdf = np.cumsum(pmf)
            rows.append((mean, pmf @ (k - mean) ** 2, np.searchsorted(cdf, 0.05),
                         np.searchsorted(cdf, 0.95), n))
    return np.array(rows, dtype=float)


DISTANCE_EDGES = (0, 2, 4, 6, 8, 10, 12, 16, np.inf)


def excess_near_bright(deblender, batches, *, bright=3e5):
    """Sum over tiles of (posterior mean - true count) and number of tiles, binned by
    the distance (px) of the tile's centre to the nearest star brighter than
    ``bright`` in the first band; and the total true count."""
    excess = np.zeros(len(DISTANCE_EDGES) - 1)
    n_tiles = np.zeros_like(excess)
    total = 0
    size = deblender.grid.tile_size
    for batch in batches:
        posterior, counts = tile_counts(deblender, batch)
        probs = posterior.count_probs.double().numpy()
        mean = probs @ np.arange(probs.shape[-1])
        rows, cols = np.indices(mean.shape[1:]) * size + (size - 1) / 2
        for i in range(len(mean)):
            stars = batch.catalogs.mask[i].numpy()
            locs = batch.catalogs.locs[i].numpy()[stars]
            locs = locs[batch.catalogs.fluxes[i].numpy()[stars, 0] > bright]
            distance = np.full(mean.shape[1:], np.inf)
            for x, y in locs:
                distance = np.minimum(distance, np.hypot(cols - x, rows - y))
            bins = np.minimum(np.digitize(distance, DISTANCE_EDGES) - 1, len(excess) - 1)
            np.add.at(excess, bins, mean[i] - counts[i])
            np.add.at(n_tiles, bins, 1)
            total += counts[i].sum()
    return excess, n_tiles, total


def summary(rows):
    """Bias, its standard error, 90 % coverage and dispersion of `count_errors` rows."""
    mean, variance, low, high, true = rows.T
    bias = (mean.sum() - true.sum()) / true.sum()
    error = np.std(mean - true, ddof=1) * np.sqrt(len(true)) / true.sum()
    coverage = np.mean((low <= true) & (true <= high))
    return bias, error, coverage, np.std((mean - true) / np.sqrt(variance))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sdss"])
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sweeps", action="store_true",
                        help="sweep alpha, a Gaussian PSF's FWHM and f_max (with defects) "
                             "instead of changing one factor at a time")
    parser.add_argument("--near-bright", action="store_true",
                        help="where the first model's excess lies (see above)")
    args = parser.parse_args(argv)

    deblenders = [load(m) for m in args.model]
    image, _ = load_m2(border=3)
    sky = np.median(np.asarray(image.meta["background"]).reshape(2, -1), axis=1)
    psfs = psf_pairs()
    print(f"{args.n_images} images of {args.size} x {args.size} px per condition; per model: "
          "count bias +- standard error, 90 % coverage, dispersion")
    width = 34
    print(f"{'condition':30s} {'stars':>6s}  " + "  ".join(f"{Path(m).stem:>{width}s}"
                                                           for m in args.model))
    conditions = SWEEPS if args.sweeps else CONDITIONS
    biases = np.zeros((len(conditions), len(deblenders)))
    for c, (label, condition) in enumerate(conditions):
        batches = draw(condition, psfs, sky, args.n_images, args.size, args.seed)
        cells = []
        for d, deblender in enumerate(deblenders):
            rows = count_errors(deblender, batches)
            bias, error, coverage, dispersion = summary(rows)
            biases[c, d] = bias
            cells.append(f"{bias:+6.1%} +- {error:.1%}, {coverage:.2f}, {dispersion:.2f}")
        print(f"{label:30s} {rows[:, 4].mean():6.0f}  "
              + "  ".join(f"{cell:>{width}s}" for cell in cells), flush=True)
    print(f"{'mean |bias|':30s} {'':6s}  " + "  ".join(
        f"{np.mean(np.abs(biases[:, d])):>{width}.1%}" for d in range(len(deblenders))))
    if args.near_bright:
        print(f"\n{args.model[0]}: excess count (% of all stars; per tile) by distance (px) of "
              "the tile to the nearest star brighter than 3e5 e-")
        print(f"{'condition':30s} " + " ".join(
            f"{f'{lo:g}-{hi:g}':>13s}" for lo, hi in zip(DISTANCE_EDGES, DISTANCE_EDGES[1:])))
        for label, condition in conditions:
            batches = draw(condition, psfs, sky, args.n_images, args.size, args.seed)
            excess, n_tiles, total = excess_near_bright(deblenders[0], batches)
            print(f"{label:30s} " + " ".join(
                f"{e / total:+6.1%};{e / max(n, 1):+.3f}" for e, n in zip(excess, n_tiles)),
                flush=True)


if __name__ == "__main__":
    main()
