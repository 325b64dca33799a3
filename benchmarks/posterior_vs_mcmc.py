"""StarNet's posterior against MCMC under the same model, star by star.

Simulates ``--n-images`` M2-like images from a bundled model's own prior, PSFs and
background (stars also within 6 pixels outside them, as on a real sky), draws
``--n-draws`` catalogs from StarNet's posterior and starts one chain of
`starnet.baselines.CatalogSampler` from each draw. The chains' states after each of
``--sweeps`` sweeps (one state per chain) are MCMC's draws: if the amortized posterior
were exact, MCMC would leave it where it is. For each set of draws it prints the count
posterior against the truth and, by true r flux, each true star's detection probability
and 90 % intervals (`starnet.calibration.star_intervals`: counterparts matched within
1 pixel): how often they hold the truth, their median widths, and the median ratio of
StarNet's widths to MCMC's for the same stars. The figure compares the two star by star.
Run::

    python benchmarks/posterior_vs_mcmc.py --n-images 3 --sweeps 100 400 \\
        --figure docs/_static/posterior_vs_mcmc.png
"""

import argparse
import time

import numpy as np
from astropy.table import vstack
from matplotlib.figure import Figure

from starnet import StarNetDeblender, simulate_starfield
from starnet.baselines import CatalogSampler
from starnet.calibration import star_intervals

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
        return np.log10(np.asarray(high.value if hasattr(high, "value") else high)
                        / np.asarray(low.value if hasattr(low, "value") else low))
    return np.asarray(high - low)


def _counts(samples, n_draws):
    return np.bincount(np.asarray(samples["sample"]), minlength=n_draws)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n-images", type=int, default=3)
    parser.add_argument("--n-draws", type=int, default=100)
    parser.add_argument("--sweeps", type=int, nargs="+", default=[100, 400],
                        help="sweep counts at which the chains' states are taken")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    sweeps = sorted(args.sweeps)
    if any(s % sweeps[0] for s in sweeps):
        parser.error("every --sweeps value must be a multiple of the smallest")
    deblender = StarNetDeblender.from_name_or_path(args.model)
    sampler = CatalogSampler(prior=deblender.prior)
    shape = (args.size, args.size)
    methods = ["StarNet"] + [f"MCMC, {s} sweeps" for s in sweeps]
    per_star = {name: [] for name in methods}
    truths, count_rows = [], []
    for image_index in range(args.n_images):
        seed = args.seed + image_index
        image, truth = simulate_starfield(shape, prior=deblender.prior, psf=deblender.psfs,
                                          background=deblender.background, margin=6.0,
                                          seed=seed, stamp_size=deblender.stamp_size)
        inside = ((truth["x"] >= -0.5) & (truth["x"] < shape[1] - 0.5)
                  & (truth["y"] >= -0.5) & (truth["y"] < shape[0] - 0.5))
        truth = truth[inside]
        truths.append(truth)
        start = time.perf_counter()
        draws = {"StarNet": deblender.sample(image, n_samples=args.n_draws, seed=seed,
                                             background="given", progress_bar=False)}
        seconds = {"StarNet": time.perf_counter() - start}
        start = time.perf_counter()
        chain_draws = sweeps[-1] // sweeps[0]
        chains = sampler.sample(image, n_samples=chain_draws, n_sweeps=sweeps[-1],
                                burn_in=0.0, init=draws["StarNet"], seed=seed)
        elapsed = time.perf_counter() - start
        for s in sweeps:
            name = f"MCMC, {s} sweeps"
            draws[name] = _subset(chains, chain_draws, s // sweeps[0] - 1)
            seconds[name] = elapsed * s / sweeps[-1]
        print(f"image {image_index} (seed {seed}): {len(truth)} true stars; "
              f"{args.n_draws} chains x {sweeps[-1]} sweeps in {elapsed:.0f} s; acceptance "
              + ", ".join(f"{k} {v:.2f}" for k, v in chains.meta["acceptance"].items()),
              flush=True)
        for name in methods:
            counts = _counts(draws[name], args.n_draws)
            q05, q95 = np.quantile(counts, [0.05, 0.95])
            count_rows.append((image_index, len(truth), name, counts.mean(), q05, q95,
                               seconds[name]))
            per_star[name].append(star_intervals(draws[name], truth))

    print(f"\ncount posterior ({args.n_draws} draws; time for all draws)")
    print(f"{'image':>5} {'truth':>6}  {'method':<20} {'N mean (5 %, 95 %)':>22} "
          f"{'covers':>7} {'time':>8}")
    for image_index, n_true, name, mean, q05, q95, secs in count_rows:
        covers = "yes" if q05 <= n_true <= q95 else "no"
        print(f"{image_index:>5} {n_true:>6}  {name:<20} {mean:>8.1f} ({q05:>4.0f}, "
              f"{q95:>4.0f}) {covers:>7} {secs:>7.1f}s")

    flux = np.concatenate([np.asarray(t["flux_r"].value if hasattr(t["flux_r"], "value")
                                      else t["flux_r"]) for t in truths])
    tables = {name: _stack(parts) for name, parts in per_star.items()}
    reference = methods[-1]
    print(f"\nper true star, by true r flux (e-); intervals at 90 %, over the stars found in "
          f"at least half the draws of both StarNet and {reference}")
    print(f"{'r flux':>13} {'stars':>6}  {'method':<20} {'P(found)':>8} {'x cov':>6} "
          f"{'flux cov':>8} {'x width':>8} {'flux width':>10} {'width / MCMC':>13}")
    both = ((tables["StarNet"]["detection_probability"] >= 0.5)
            & (tables[reference]["detection_probability"] >= 0.5))
    for low, high in zip(FLUX_BINS[:-1], FLUX_BINS[1:]):
        in_bin = (flux >= low) & (flux < high)
        label = f"{low:.0f}-{high:.0f}" if np.isfinite(high) else f">= {low:.0f}"
        for name in methods:
            t = tables[name]
            sel = in_bin & both
            x_width, f_width = _widths(t, "x")[sel], _widths(t, "flux_r")[sel]
            ratio_x = x_width / _widths(tables[reference], "x")[sel]
            ratio_f = f_width / _widths(tables[reference], "flux_r")[sel]
            ratio = (f"{np.median(ratio_x):.2f} / {np.median(ratio_f):.2f}"
                     if sel.any() else "-")
            print(f"{label:>13} {int(in_bin.sum()):>6}  {name:<20} "
                  f"{np.mean(t['detection_probability'][in_bin]):>8.2f} "
                  f"{_mean(t['covered_x'][sel]):>6} {_mean(t['covered_flux_r'][sel]):>8} "
                  f"{_median(x_width, '.3f'):>8} {_median(f_width, '.3f'):>10} {ratio:>13}")
    if args.figure:
        _figure(tables, methods, reference, flux, both, args).savefig(args.figure, dpi=90)
        print(f"wrote {args.figure}")


def _stack(parts):
    return vstack(parts, metadata_conflicts="silent")


def _mean(values):
    return f"{np.mean(values):.2f}" if len(values) else "-"


def _median(values, fmt):
    return format(np.median(values), fmt) if len(values) else "-"


def _figure(tables, methods, reference, flux, both, args):
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
    figure.suptitle(f"{args.n_images} simulated {args.size} x {args.size} M2-like images "
                    f"({args.model}): StarNet's draws against MCMC chains started from them")
    return figure


if __name__ == "__main__":
    main()
