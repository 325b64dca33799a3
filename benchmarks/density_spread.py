"""Experiment: count intervals that hold the uncertainty of the density, on a frozen model.

A posterior of independent tiles leaves out the uncertainty that its tiles share: the
density of stars that they all read from the same light (docs/sdss_model.rst, "Why the
crowded intervals are too narrow"). Under a Poisson prior, multiplying the density by
``exp(delta)`` tilts each tile's count pmf by ``exp(delta * n)`` (then normalised), so a
posterior with a log-density offset ``delta ~ Normal(0, s**2)`` shared by the tiles of a
cell is a mixture over ``delta`` of tilted pmfs, and the pmf of a cell's count is the
tilted pmf of the independent tiles' count: ``P(N) exp(delta N) / Z(delta)``
(`starnet.posterior.density_mixture`).

This script fits only the spread ``s``: a 1 x 1 convolution on the frozen tile features of
``--model`` (the input of its head), ``softplus``, averaged over the 32 x 32 tiles of a
64 x 64 training image, trained with the Dawid-Sebastiani score of the counts of blocks of
16 x 16 and 32 x 32 tiles (`starnet.training.block_count_score` with ``spread``), whose
variance becomes ``V + (s V)**2`` (``V``: the sum of the
tiles' variances) on images from the model's own simulator (its training settings).
Then, on photutils-rendered M2 fields (`bench_density_sweep.field`, 100 x 100 pixels, the
true sky given, rendered through ``--psf`` and told it), it compares the count posterior
of the whole field three ways: ``independent`` (the model as it is), ``cells`` (a
``delta`` per cell of 32 x 32 tiles, independent between cells, ``s`` the cell's mean)
and ``shared`` (one ``delta`` for the field): bias, dispersion (the standard deviation
of the errors less their mean, over the root mean posterior variance; 1 when
calibrated) and 90 % coverage.

Run::

    python benchmarks/density_spread.py --model sdss --steps 2000 --n-fields 100
"""

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from astropy.nddata import NDData
from bench_density_sweep import SKY, field, integrated_psf, render_psfs

from starnet import StarFieldPrior, StarNetDeblender
from starnet.calibration import count_interval
from starnet.posterior import count_distribution, density_mixture
from starnet.tiles import TileGrid
from starnet.training import block_count_score

CELL = 32          # tiles: the 64 x 64-pixel training image of the sdss models


def tile_outputs(encoder, spread, image, background, inputs):
    """The tiles' posterior, their features and the spread map ``s`` (per tile)."""
    with torch.no_grad():
        features = encoder.tile_layers(encoder.features(image, background, **inputs))
        posterior = encoder._to_posterior(encoder.head(features))
    return posterior, F.softplus(spread(features))[:, 0]


def fit_spread(deblender, steps, seed):
    """The spread head, trained on the frozen network; prints the score and mean ``s``."""
    encoder = deblender.encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(seed)
    spread = torch.nn.Conv2d(encoder.head.in_channels, 1, 1)
    torch.nn.init.zeros_(spread.weight)
    torch.nn.init.constant_(spread.bias, -3.5)      # s = 0.03 to begin with
    optimizer = torch.optim.Adam(spread.parameters(), lr=3e-3)
    settings = deblender.training_settings
    batches = deblender._batches(settings.image_shape, settings)
    grid = TileGrid(tile_size=encoder.tile_size, max_sources=encoder.max_sources)
    generator = torch.Generator().manual_seed(seed)
    started, scores, spreads = time.perf_counter(), [], []
    for step in range(steps):
        batch = batches.draw_batch(16, generator=generator)
        tiles = grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes, batch.catalogs.mask,
                              batch.images.shape[-2:])
        posterior, s_map = tile_outputs(encoder, spread, batch.images, batch.background,
                                        batch.encoder_inputs(encoder))
        s = s_map.mean((1, 2))
        score = sum(block_count_score(posterior.count_probs, tiles.counts, block, spread=s)
                    for block in (CELL // 2, CELL))
        optimizer.zero_grad()
        score.backward()
        optimizer.step()
        scores.append(float(score))
        spreads.append(float(s.mean()))
        if (step + 1) % 500 == 0:
            print(f"step {step + 1}: score {np.mean(scores[-500:]):.4f}, mean s "
                  f"{np.mean(spreads[-500:]):.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    return spread


def summary(pmf, truth):
    """(mean, standard deviation, 5 %, 95 % quantiles, truth) of a count pmf."""
    n = np.arange(len(pmf))
    mean = float(np.dot(n, pmf))
    low, high, _ = count_interval(pmf, 0.9)
    return mean, float(np.sqrt(np.dot((n - mean) ** 2, pmf))), low, high, truth


def field_posteriors(probs, s_map, truth):
    """The three count posteriors of a field (see the module docstring)."""
    flat = probs.reshape(-1, probs.shape[-1])
    independent = count_distribution(flat)
    cells = np.ones(1)
    for row in range(0, probs.shape[0], CELL):
        for col in range(0, probs.shape[1], CELL):
            cell = probs[row:row + CELL, col:col + CELL].reshape(-1, probs.shape[-1])
            spread = s_map[row:row + CELL, col:col + CELL].mean()
            cells = np.convolve(cells, density_mixture(count_distribution(cell), spread))
    return {"independent": summary(independent, truth), "cells": summary(cells, truth),
            "shared": summary(density_mixture(independent, s_map.mean()), truth)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.04, 0.12, 0.2])
    parser.add_argument("--n-fields", type=int, default=100)
    parser.add_argument("--psf", default="m2",
                        help="PSF of the fields, as bench_density_sweep.py's --psf (told right)")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    deblender = StarNetDeblender.from_name_or_path(args.model)
    spread = fit_spread(deblender, args.steps, args.seed)
    psfs = render_psfs(args.psf)
    told = list(deblender.psfs) if args.psf == "m2" else psfs
    rendering = [integrated_psf(psf) for psf in psfs]
    rng = np.random.default_rng(args.seed)
    print(f"\n{args.n_fields} photutils fields of 100 x 100 px per density, PSF {args.psf!r}; "
          "whole-field count: bias, dispersion, 90 % coverage")
    print(f"{'stars/px':>8} {'mean s':>7} {'posterior':>12} {'bias':>7} {'dispersion':>10} "
          f"{'90% cover':>9}")
    for density in args.densities:
        prior = StarFieldPrior(mu=density, f_min=1000.0, f_max=1e6, alpha=0.5,
                               bands=("r", "i"))
        deblender.prior = prior
        rows, spreads = {}, []
        for _ in range(args.n_fields):
            data, truth = field(prior, density, 100, rendering, rng)
            meta = {"bands": ["r", "i"], "psf": told, "background": np.array(SKY)}
            image = NDData(data, unit="electron", meta=meta)
            inputs = deblender._prepare(image)
            posterior, s_map = tile_outputs(deblender.encoder, spread, inputs.image,
                                            inputs.background, inputs.network_inputs)
            s_map = s_map[0].detach().numpy()
            spreads.append(s_map.mean())
            probs = posterior.count_probs[0].double().numpy()
            for name, row in field_posteriors(probs, s_map, len(truth)).items():
                rows.setdefault(name, []).append(row)
        for name, values in rows.items():
            mean, sd, low, high, true = np.array(values).T
            error = true - mean
            dispersion = np.std(error, ddof=1) / np.sqrt(np.mean(sd ** 2))
            cover = np.mean((low <= true) & (true <= high))
            print(f"{density:8.3f} {np.mean(spreads):7.3f} {name:>12} "
                  f"{100 * (mean.sum() - true.sum()) / true.sum():+6.1f}% {dispersion:10.2f} "
                  f"{cover:9.2f}", flush=True)


if __name__ == "__main__":
    main()
