r"""Count bias of a model trained over PSF variants and sky levels, one condition at a time.

A model trained with PSF variants (the ``sdss-m2`` bundled until 2026-12-08, now
``scripts/checkpoints/sdss-m2-gradient-spread.pt``) is trained on images whose star light
is moved towards (or away from) the psField power-law PSF by a fraction drawn from its
training settings' ``psf_variant_range`` (-0.5 to 0.5), and whose sky is its background
times a factor from ``background_range`` (0.9 to 1.6); the network is told the sky, not
the fraction. (The bundled ``sdss-m2`` is trained without variants, range 0 to 0: its
fraction rows say what a PSF error along that line does to it.) A
forward-KL fit can then be right on average over the training mix and wrong at each
fraction. This bench draws images as training does (`starnet.training.SimulatedBatches`
with the model's training settings, uniform density, stars 6 px beyond the edges) with
the fraction and the sky factor pinned, one at a time, and once as in training (the
``training mix`` row: both drawn, density still pinned). Each row gives the relative
bias of the posterior mean count (summed over the images; the truth is the tiles'
count, at most ``max_sources`` per tile, as in training) and its standard error over
the images. The benchmarks of issue 22 (photutils fields, ``bench_calibration.py``) sit
at fraction 0 (the declared PSF) and factor 1 (the true sky).

Run::

    python benchmarks/bench_variant_bias.py \
        --model scripts/checkpoints/sdss-m2-gradient-spread.pt --density 0.002 0.04
"""

import argparse
import dataclasses
import warnings

import numpy as np
import torch

from starnet import StarNetDeblender
from starnet.tiles import TileGrid


def count_bias(deblender, batches, *, n_images, batch_size=8, seed=3):
    """Relative bias of the posterior mean count over ``n_images`` drawn from
    ``batches``, and its standard error."""
    encoder = deblender.encoder.eval()
    grid = TileGrid(tile_size=encoder.tile_size, max_sources=encoder.max_sources)
    generator = torch.Generator().manual_seed(seed)
    estimates, truths = [], []
    for _ in range(-(-n_images // batch_size)):
        batch = batches.draw_batch(batch_size, generator=generator)
        tiles = grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes, batch.catalogs.mask,
                              batch.images.shape[-2:])
        with torch.no_grad():
            probs = encoder(batch.images, batch.background,
                            **batch.encoder_inputs(encoder)).count_probs
        means = (probs * torch.arange(probs.shape[-1], dtype=probs.dtype)).sum(-1)
        estimates += means.sum((1, 2)).tolist()
        truths += tiles.counts.sum((1, 2)).tolist()
    estimates, truths = np.array(estimates), np.array(truths, dtype=float)
    errors = (estimates - truths) / truths.mean()
    return estimates.sum() / truths.sum() - 1, errors.std(ddof=1) / np.sqrt(len(errors))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sdss-m2"])
    parser.add_argument("--density", type=float, nargs="+", default=[0.002, 0.04],
                        help="stars per pixel")
    parser.add_argument("--variants", type=float, nargs="+",
                        default=[-0.5, -0.25, 0.0, 0.25, 0.5],
                        help="pinned PSF variant fractions (sky factor 1)")
    parser.add_argument("--sky-factors", type=float, nargs="+", default=[0.9, 1.3, 1.6],
                        help="pinned sky factors (fraction 0)")
    parser.add_argument("--n-images", type=int, default=480)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    conditions = ([(f"fraction {v:+.2f}, sky 1", (v, 1.0)) for v in args.variants]
                  + [(f"fraction +0.00, sky {s:g}", (0.0, s)) for s in args.sky_factors
                     if s != 1.0]
                  + [("training mix", None)])
    print(f"{args.n_images} images of {args.size} x {args.size} per row; bias of the "
          "posterior mean count (standard error)")
    print(f"{'model':>24} {'stars/px':>8}  {'condition':<26} {'bias':>14}")
    for name in args.model:
        deblender = StarNetDeblender.from_name_or_path(name)
        settings = deblender.training_settings
        for density in args.density:
            for label, pinned in conditions:
                changes = {"density_gradient": 0.0, "density_range": (density, density)}
                if pinned is not None:
                    changes.update(psf_variant_range=(pinned[0], pinned[0]),
                                   background_range=(pinned[1], pinned[1]))
                batches = deblender._batches((args.size, args.size),
                                             dataclasses.replace(settings, **changes))
                bias, error = count_bias(deblender, batches, n_images=args.n_images)
                print(f"{name[-24:]:>24} {density:8g}  {label:<26} "
                      f"{bias:+7.2%} ({error:.2%})", flush=True)


if __name__ == "__main__":
    main()
