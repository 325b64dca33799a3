"""Count intervals with and without the density spread of a model, on photutils fields.

A posterior of independent tiles leaves out the uncertainty that its tiles share: the
density of stars that they all read from the same light (docs/sdss_model.rst, "Why the
crowded intervals were too narrow"). A model with a density spread
(`starnet.StarNetDeblender.fit_density_spread`) gives each cell of its tiles a
log-density offset of standard deviation ``s`` (`starnet.posterior.TiledPosterior`).
On photutils-rendered M2 fields (`bench_density_sweep.field`, 100 x 100 pixels, the
true sky given, rendered through ``--psf`` and told it) this script compares the count
posterior of the whole field three ways: ``independent`` (the spread dropped),
``cells`` (the model as it is: an offset per cell, independent between cells) and
``shared`` (one offset for the whole field, ``s`` the mean of the cells'): bias,
dispersion (the standard deviation of the errors less their mean, over the root mean
posterior variance; 1 when calibrated) and 90 % coverage.

Run::

    python benchmarks/density_spread.py --model sdss --n-fields 100
"""

import argparse
import warnings

import numpy as np
import torch
from astropy.nddata import NDData
from bench_density_sweep import SKY, field, integrated_psf, render_psfs

from starnet import StarFieldPrior, StarNetDeblender
from starnet.calibration import count_interval
from starnet.posterior import TiledPosterior, density_mixture


def summary(pmf, truth):
    """(mean, standard deviation, 5 %, 95 % quantiles, truth) of a count pmf."""
    n = np.arange(len(pmf))
    mean = float(np.dot(n, pmf))
    low, high, _ = count_interval(pmf, 0.9)
    return mean, float(np.sqrt(np.dot((n - mean) ** 2, pmf))), low, high, truth


def field_posteriors(posterior, truth):
    """The three count posteriors of a field (see the module docstring)."""
    independent = TiledPosterior(posterior.count_logits, posterior.loc_mean, posterior.loc_sd,
                                 posterior.log_flux_mean, posterior.log_flux_sd).count_pmf()
    shared = density_mixture(independent, float(posterior.cell_spread().mean()))
    return {"independent": summary(independent, truth),
            "cells": summary(posterior.count_pmf(), truth), "shared": summary(shared, truth)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.04, 0.12, 0.2])
    parser.add_argument("--n-fields", type=int, default=100)
    parser.add_argument("--psf", default="m2",
                        help="PSF of the fields, as bench_density_sweep.py's --psf (told right)")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    deblender = StarNetDeblender.from_name_or_path(args.model)
    if not deblender.encoder.density_cells:
        parser.error(f"{args.model} has no density spread (see scripts/fit_density_spread.py)")
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
            with torch.no_grad():
                posterior = deblender.encoder(inputs.image, inputs.background,
                                              **inputs.network_inputs)
            spreads.append(float(posterior.cell_spread().mean()))
            for name, row in field_posteriors(posterior, len(truth)).items():
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
