"""StarNet's posterior against MCMC under the same model, star by star.

Simulates ``--n-images`` M2-like images from a bundled model's own prior, PSFs and
background, with no stars outside them (``--margin 0``), so that the images are drawn
from exactly the model that `starnet.baselines.CatalogSampler` samples. It draws
``--n-draws`` catalogs from StarNet's posterior and runs as many chains of the sampler
from two starts:

* StarNet's draws, one chain each: MCMC refining the amortized posterior;
* the true catalog, in every chain: the truth is a draw from the posterior of its own
  image (it was drawn from the prior and the image from the likelihood), so chains
  started there sample the posterior from the start. They explore its local
  uncertainty (positions, fluxes, nearby splits and merges) but, with the slow mixing
  of trans-dimensional MCMC, rarely leave the true configuration's mode: their spread
  is a lower bound on the posterior's.

The chains' states after each of ``--sweeps`` sweeps are MCMC's draws. For each set of
draws it prints the count posterior against the truth, the mean log posterior density
of the draws relative to the truth's (`CatalogSampler.log_posterior`: near 0 for draws
from the posterior's typical set) and, by true r flux, each true star's detection
probability and 90 % intervals (`starnet.calibration.star_intervals`: counterparts
matched within 1 pixel): how often the truth's randomised PIT among the draws falls in
the central 90 % (calibrated: 0.9; the quantile intervals of 50 draws themselves hold
only about 0.9 x 49 / 51 = 0.86 of exchangeable truths), their median widths, and the
median ratio of each method's widths to the reference chains' (from the truth, most
sweeps) for the same stars. The figure compares StarNet with the reference star by
star. Run::

    python benchmarks/posterior_vs_mcmc.py --n-images 3 --density 0.03 --sweeps 100 400 \\
        --figure docs/_static/posterior_vs_mcmc.png
"""

import argparse
import time

import numpy as np
from astropy.table import vstack
from matplotlib.figure import Figure

from starnet import StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.baselines import CatalogSampler
from starnet.calibration import pit_coverage, star_intervals

FLUX_BINS = (0.0, 1000.0, 3000.0, 10000.0, np.inf)
"""Edges of the true r flux bins, electrons (1000 e- is the M2 evaluation's limit)."""


def _subset(samples, chain_draws, k):
    """The draws of `CatalogSampler.sample` taken at the ``k``-th kept sweep of every
    chain, renumbered 0 .. n_chains - 1."""
    draw = np.asarray(samples["sample"])
    keep = draw % chain_draws == k
    table = samples[keep]
    table["sample"] = draw[keep] // chain_draws
    table.meta["n_samples"] = samples.meta["n_samples"] // chain_draws
    return table


def _widths(intervals, name):
    """Interval widths: pixels for positions, dex for fluxes."""
    low, high = intervals[f"{name}_low"], intervals[f"{name}_high"]
    if name.startswith("flux"):
        return np.log10(np.asarray(high / low))            # a ratio: no unit
    return np.asarray(high - low)


def _counts(samples, n_draws):
    return np.bincount(np.asarray(samples["sample"]), minlength=n_draws)


def _replicate(truth, n_draws):
    """The true catalog as ``n_draws`` identical draws (one chain each)."""
    table = vstack([truth] * n_draws, metadata_conflicts="silent")
    table["sample"] = np.repeat(np.arange(n_draws), len(truth))
    table.meta["n_samples"] = n_draws
    return table


def _run_chains(sampler, image, init, sweeps, seed, label, log):
    """Chains from ``init`` (one per draw), their draws at each of ``sweeps`` and the
    seconds to reach them."""
    start = time.perf_counter()
    per_chain = sweeps[-1] // sweeps[0]
    chains = sampler.sample(image, n_samples=per_chain, n_sweeps=sweeps[-1], burn_in=0.0,
                            init=init, seed=seed)
    elapsed = time.perf_counter() - start
    log(f"  from {label}: {chains.meta['n_chains']} chains x {sweeps[-1]} sweeps in "
        f"{elapsed:.0f} s; acceptance "
        + ", ".join(f"{k} {v:.2f}" for k, v in chains.meta["acceptance"].items()))
    return {s: (_subset(chains, per_chain, s // sweeps[0] - 1), elapsed * s / sweeps[-1])
            for s in sweeps}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--margin", type=float, default=0.0,
                        help="pixels around the image holding stars too (default 0: the "
                             "sampler's own model)")
    parser.add_argument("--density", type=float, default=None,
                        help="stars per pixel (default: the model's prior, 0.12 for "
                             "sdss-m2, M2's density; the model was trained over 0.001-0.2)")
    parser.add_argument("--n-images", type=int, default=3)
    parser.add_argument("--n-draws", type=int, default=50)
    parser.add_argument("--sweeps", type=int, nargs="+", default=[100, 400],
                        help="sweep counts at which the chains' states are taken")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    sweeps = sorted(args.sweeps)
    if any(s % sweeps[0] for s in sweeps):
        parser.error("every --sweeps value must be a multiple of the smallest")
    deblender = StarNetDeblender.from_name_or_path(args.model)
    prior = deblender.prior
    if args.density is not None:
        prior = StarFieldPrior(mu=args.density, f_min=prior.f_min, f_max=prior.f_max,
                               alpha=prior.alpha, color_mean=prior.color_mean,
                               color_sd=prior.color_sd, bands=prior.bands)
    sampler = CatalogSampler(prior=prior)
    shape = (args.size, args.size)
    reference = f"MCMC from truth, {sweeps[-1]}"
    methods = (["StarNet"] + [f"MCMC from StarNet, {s}" for s in sweeps]
               + [f"MCMC from truth, {s}" for s in sweeps])
    per_star = {name: [] for name in methods}
    truths, count_rows = [], []
    for image_index in range(args.n_images):
        seed = args.seed + image_index
        image, truth = simulate_starfield(shape, prior=prior, psf=deblender.psfs,
                                          background=deblender.background,
                                          margin=args.margin, seed=seed,
                                          stamp_size=deblender.stamp_size)
        inside = ((truth["x"] >= -0.5) & (truth["x"] < shape[1] - 0.5)
                  & (truth["y"] >= -0.5) & (truth["y"] < shape[0] - 0.5))
        truth = truth[inside]
        truths.append(truth)
        print(f"image {image_index} (seed {seed}): {len(truth)} true stars", flush=True)
        start = time.perf_counter()
        draws = {"StarNet": (deblender.sample(image, n_samples=args.n_draws, seed=seed,
                                              background="given", progress=False),
                             time.perf_counter() - start)}
        for label, init in (("StarNet", draws["StarNet"][0]),
                            ("truth", _replicate(truth, args.n_draws))):
            for s, result in _run_chains(sampler, image, init, sweeps, seed, label,
                                         lambda text: print(text, flush=True)).items():
                draws[f"MCMC from {label}, {s}"] = result
        true_density = sampler.log_posterior(image, truth)[0]
        for name in methods:
            samples, seconds = draws[name]
            counts = _counts(samples, args.n_draws)
            q05, q95 = np.quantile(counts, [0.05, 0.95])
            gap = np.mean(sampler.log_posterior(image, samples)) - true_density
            count_rows.append((image_index, len(truth), name, counts.mean(), q05, q95, gap,
                               seconds))
            per_star[name].append(star_intervals(samples, truth, seed=seed))

    print(f"\ncount posterior ({args.n_draws} draws; log p: mean log posterior density of "
          "the draws minus the truth's; time for all draws)")
    print(f"{'image':>5} {'truth':>6}  {'method':<24} {'N mean (5 %, 95 %)':>22} "
          f"{'covers':>7} {'log p':>10} {'time':>8}")
    for image_index, n_true, name, mean, q05, q95, gap, secs in count_rows:
        covers = "yes" if q05 <= n_true <= q95 else "no"
        print(f"{image_index:>5} {n_true:>6}  {name:<24} {mean:>8.1f} ({q05:>4.0f}, "
              f"{q95:>4.0f}) {covers:>7} {gap:>10.0f} {secs:>7.1f}s")

    flux = np.concatenate([np.asarray(t["flux_r"].value) for t in truths])
    tables = {name: _stack(parts) for name, parts in per_star.items()}
    print(f"\nper true star, by true r flux (e-): P(found) over all stars; 90 % intervals "
          f"over the stars found in at least half the draws of both StarNet and {reference}; "
          f"width / ref: median ratio of x / flux widths to the reference's")
    print(f"{'r flux':>13} {'stars':>6}  {'method':<24} {'P(found)':>8} {'x cov':>6} "
          f"{'flux cov':>8} {'x width':>8} {'flux dex':>8} {'width / ref':>12}")
    both = ((tables["StarNet"]["detection_probability"] >= 0.5)
            & (tables[reference]["detection_probability"] >= 0.5))
    for low, high in zip(FLUX_BINS[:-1], FLUX_BINS[1:]):
        in_bin = (flux >= low) & (flux < high)
        if not in_bin.any():
            continue
        label = f"{low:.0f}-{high:.0f}" if np.isfinite(high) else f">= {low:.0f}"
        sel = in_bin & both
        for name in methods:
            t = tables[name]
            x_width, f_width = _widths(t, "x")[sel], _widths(t, "flux_r")[sel]
            ratio_x = x_width / _widths(tables[reference], "x")[sel]
            ratio_f = f_width / _widths(tables[reference], "flux_r")[sel]
            ratio = (f"{np.median(ratio_x):.2f} / {np.median(ratio_f):.2f}"
                     if sel.any() else "-")
            print(f"{label:>13} {int(in_bin.sum()):>6}  {name:<24} "
                  f"{np.mean(t['detection_probability'][in_bin]):>8.2f} "
                  f"{_covered(t[sel], 'x'):>6} {_covered(t[sel], 'flux_r'):>8} "
                  f"{_median(x_width, '.3f'):>8} {_median(f_width, '.3f'):>8} {ratio:>12}")
    if args.figure:
        _figure(tables, reference, flux, both, prior.mu, args).savefig(args.figure, dpi=90)
        print(f"wrote {args.figure}")


def _stack(parts):
    return vstack(parts, metadata_conflicts="silent")


def _covered(table, name):
    """Fraction of the stars whose PIT of ``name`` lies in the central 90 %."""
    return f"{pit_coverage(table, (0.9,))[f'pit_{name}'][0]:.2f}" if len(table) else "-"


def _mean(values):
    return f"{np.mean(values):.2f}" if len(values) else "-"


def _median(values, fmt):
    return format(np.median(values), fmt) if len(values) else "-"


def _figure(tables, reference, flux, both, mu, args):
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    axes = figure.subplots(1, 3)
    starnet, mcmc = tables["StarNet"], tables[reference]
    log_flux = np.log10(flux)
    points = axes[0].scatter(mcmc["detection_probability"], starnet["detection_probability"],
                             c=log_flux, s=8, cmap="viridis")
    axes[0].set_xlabel(f"P(found), {reference}")
    axes[0].set_ylabel("P(found), StarNet")
    for ax, name, unit in ((axes[1], "x", "pixels"), (axes[2], "flux_r", "dex")):
        a, b = _widths(mcmc, name)[both], _widths(starnet, name)[both]
        ax.scatter(a, b, c=log_flux[both], s=8, cmap="viridis")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"90 % width of {name}, {reference} ({unit})")
        ax.set_ylabel(f"90 % width of {name}, StarNet ({unit})")
    for ax in axes:
        low, high = ax.get_xlim()
        low, high = min(low, ax.get_ylim()[0]), max(high, ax.get_ylim()[1])
        ax.plot([low, high], [low, high], color="k", linewidth=0.8, linestyle="--")
    figure.colorbar(points, ax=axes, label="log10 true r flux (e-)")
    figure.suptitle(f"{args.n_images} simulated {args.size} x {args.size} images, "
                    f"{mu:g} stars per pixel "
                    f"({args.model}): StarNet's draws against MCMC chains from the truth")
    return figure


if __name__ == "__main__":
    main()
