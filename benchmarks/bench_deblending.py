"""Deblending power (paper appendix C.1): when does the posterior see two stars, not one?

A one-band model with a wide Gaussian PSF (FWHM 4.2 pixels), tiles of 10 pixels and a
sparse prior (0.01 stars per pixel, Pareto index 0.5 above 5000 electrons, so that every
star of the prior is plainly visible on the background of 1000 electrons) is trained on
simulated 40 x 40 images (``--epochs`` of 1600 images; saved to ``--model`` and reused
when that file exists). Two stars of equal flux (``--flux``,
signal-to-noise about 50 each) are then placed at separation delta along x on 30 x 30
images, their midpoint either at the centre of a tile or at a corner shared by four tiles,
and ``--n-images`` noise draws are catalogued at each delta. For each delta the script
prints the mean over the draws of the posterior probability P(N = 2) of the image's star
count and of E[N], writes a figure (``--output``) and reports the smallest delta at which
P(N = 2) exceeds 0.9. Run::

    python benchmarks/bench_deblending.py --epochs 150 --output docs/_static/deblending.png
"""

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import torch
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable

from starnet import StarFieldPrior, StarNetDeblender
from starnet.simulate import add_noise
from starnet.training import TrainingSettings

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FWHM = 4.2
F_MIN = 5000.0
BACKGROUND = 1000.0
SHAPE = (30, 30)


def midpoints(tile_size):
    """A tile centre and a corner shared by four tiles, near the image centre (tile
    ``j`` covers ``j R - 0.5 <= x < (j + 1) R - 0.5``)."""
    centre = tile_size * (SHAPE[1] // 2 // tile_size) + (tile_size - 1) / 2
    corner = tile_size * round(SHAPE[1] / 2 / tile_size) - 0.5
    return {"tile centre": (centre, centre), "tile corner": (corner, corner)}


def gaussian_psf(fwhm, size=25):
    """A normalised Gaussian PSF image, integrated over pixels (fine sub-sampling)."""
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    fine = (np.arange(size * 5) - (size * 5 - 1) / 2) / 5
    profile = np.exp(-0.5 * (fine / sigma) ** 2).reshape(size, 5).sum(axis=1)
    image = np.outer(profile, profile)
    return image / image.sum()


def trained_deblender(path, epochs, tile_size, seed):
    """Load the experiment's model from ``path``, or train it for ``epochs`` and save it.

    Adam's rate decays from 1e-3 to 1e-5 by a cosine over the steps.
    """
    if Path(path).exists():
        return StarNetDeblender.load(path)
    prior = StarFieldPrior(mu=0.01, f_min=F_MIN, f_max=1e6, alpha=0.5, bands=("r",))
    deblender = StarNetDeblender(prior=prior, psf=gaussian_psf(FWHM), background=[BACKGROUND],
                                 tile_size=tile_size, max_sources=3, seed=seed)
    settings = TrainingSettings(image_shape=(40, 40), batch_size=32, batches_per_epoch=50,
                                margin=8.0, learning_rate=1e-3, final_learning_rate=1e-5,
                                seed=seed)
    deblender.fit(settings=settings, checkpoint=Path(path).with_suffix(".ckpt"),
                  n_epochs=epochs)
    deblender.provenance["command"] = (f"python benchmarks/bench_deblending.py --epochs {epochs}"
                                       f" --tile-size {tile_size} --seed {seed}")
    deblender.save(path)
    return deblender


def pair_counts(deblender, separation, midpoint, flux, n_images, generator):
    """Mean over noise draws of P(N = 2) and E[N] for a pair at ``separation``."""
    x0, y0 = midpoint
    pair = QTable({"x": [x0 - separation / 2, x0 + separation / 2], "y": [y0, y0],
                   "flux_r": [flux, flux] * u.electron})
    expected = torch.from_numpy(deblender.render(pair, SHAPE) + BACKGROUND)
    p_two, mean = [], []
    for _ in range(n_images):
        data = add_noise(expected, generator=generator).numpy()
        image = NDData(data, unit=u.electron, meta={"bands": ["r"], "psf": deblender.psfs,
                                                    "background": [BACKGROUND]})
        pmf = deblender.count_posterior(image)
        p_two.append(pmf[2] if len(pmf) > 2 else 0.0)
        mean.append(np.dot(np.arange(len(pmf)), pmf))
    return float(np.mean(p_two)), float(np.mean(mean))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/deblending.pt")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--tile-size", type=int, default=10)
    parser.add_argument("--flux", type=float, default=1e4)
    parser.add_argument("--n-images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="PNG of P(N=2) and E[N] against delta")
    args = parser.parse_args(argv)
    deblender = trained_deblender(args.model, args.epochs, args.tile_size, args.seed)
    separations = np.arange(0.0, 5.01, 0.25)
    generator = torch.Generator().manual_seed(args.seed + 1)
    results = {name: np.array([pair_counts(deblender, delta, midpoint, args.flux,
                                           args.n_images, generator)
                               for delta in separations])
               for name, midpoint in midpoints(args.tile_size).items()}
    print(f"two stars of {args.flux:g} e- each, Gaussian PSF FWHM {FWHM} px, background "
          f"{BACKGROUND:g} e-/px, tile {args.tile_size} px; mean over {args.n_images} noise draws")
    print("delta (px) | " + " | ".join(f"{name}: P(N=2), E[N]" for name in results))
    for k, delta in enumerate(separations):
        print(f"{delta:10.2f} | " + " | ".join(f"{values[k, 0]:.3f}, {values[k, 1]:.2f}"
                                               for values in results.values()))
    for name, values in results.items():
        above = np.flatnonzero(values[:, 0] > 0.9)
        if len(above):
            delta = separations[above[0]]
            print(f"{name}: P(N=2) > 0.9 from delta = {delta:.2f} px ({delta / FWHM:.2f} FWHM)")
        else:
            print(f"{name}: P(N=2) never exceeds 0.9")
    if args.output:
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for name, values in results.items():
            axes[0].plot(separations, values[:, 0], marker="o", label=name)
            axes[1].plot(separations, values[:, 1], marker="o", label=name)
        axes[0].axhline(0.9, color="grey", ls=":")
        axes[0].set(xlabel="separation (pixels)", ylabel="P(N = 2)", ylim=(0, 1.02))
        axes[1].axhline(2, color="grey", ls=":")
        axes[1].set(xlabel="separation (pixels)", ylabel="E[N]")
        axes[0].legend()
        figure.suptitle(f"Two equal stars, PSF FWHM {FWHM} px, tile {args.tile_size} px")
        figure.tight_layout()
        figure.savefig(args.output, dpi=120)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
