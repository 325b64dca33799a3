"""StarNet's amortized posterior against PCAT-like MCMC on a simulated M2-like image.

Simulates one image from a bundled model's own prior, PSFs and background (stars also
within 6 pixels outside it, as on a real sky), draws ``--n-samples`` catalogs from
StarNet's posterior and from `starnet.baselines.CatalogSampler` run for ``--minutes`` of
wall time (one chain from an empty catalog, the first half burn-in), and for a third
row from the sampler started at StarNet's draws (``--refine-sweeps`` sweeps of one
chain per draw), and prints for each the wall time, the posterior of the number of
stars (mean, 5 and 95 %) and the one-to-one F1 (0.5 pixel, 0.5 mag, r) of the draws
against the truth. The figure shows the count posteriors and the F1 of the draws. Run::

    python benchmarks/pcat_vs_starnet.py --size 64 --minutes 2 \\
        --figure docs/_static/pcat_vs_starnet.png
"""

import argparse
import time

import numpy as np
from matplotlib.figure import Figure

from starnet import StarNetDeblender, match_catalogs, simulate_starfield
from starnet.baselines import CatalogSampler


def _per_draw(samples, truth, n_draws):
    counts, f1 = [], []
    for k in range(n_draws):
        draw = samples[samples["sample"] == k]
        counts.append(len(draw))
        f1.append(match_catalogs(draw, truth, band="r").f1)
    return np.array(counts), np.array(f1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2-powerlaw")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--n-samples", type=int, default=50)
    parser.add_argument("--refine-sweeps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    shape = (args.size, args.size)
    image, truth = simulate_starfield(shape, prior=deblender.prior, psf=deblender.psfs,
                                      background=deblender.background, margin=6.0,
                                      seed=args.seed, stamp_size=deblender.stamp_size)
    inside = ((truth["x"] >= -0.5) & (truth["x"] < shape[1] - 0.5)
              & (truth["y"] >= -0.5) & (truth["y"] < shape[0] - 0.5))
    truth = truth[inside]
    print(f"{args.model}: simulated {shape[0]} x {shape[1]} image, {len(truth)} stars")
    results = {}
    start = time.perf_counter()
    starnet = deblender.sample(image, n_samples=args.n_samples, seed=args.seed,
                               background="given", progress=False)
    results["StarNet"] = (time.perf_counter() - start, starnet)
    sampler = CatalogSampler(prior=deblender.prior)
    start = time.perf_counter()
    pcat = sampler.sample(image, n_samples=args.n_samples, time_limit=60 * args.minutes,
                          seed=args.seed)
    results[f"PCAT-like, {args.minutes:g} min"] = (time.perf_counter() - start, pcat)
    print(f"  PCAT-like: {pcat.meta['n_sweeps']} sweeps, acceptance "
          + ", ".join(f"{k} {v:.2f}" for k, v in pcat.meta["acceptance"].items()))
    start = time.perf_counter()
    refined = sampler.sample(image, n_samples=1, n_sweeps=args.refine_sweeps, burn_in=0.0,
                             init=starnet, seed=args.seed)
    results[f"StarNet + {args.refine_sweeps} MCMC sweeps"] = (
        time.perf_counter() - start + results["StarNet"][0], refined)

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    print(f"{'method':<32} {'time':>8} {'N mean (5 %, 95 %)':>22} {'F1 mean +- sd':>15}")
    for name, (seconds, samples) in results.items():
        counts, f1 = _per_draw(samples, truth, args.n_samples)
        q05, q95 = np.quantile(counts, [0.05, 0.95])
        print(f"{name:<32} {seconds:>7.1f}s {counts.mean():>8.1f} ({q05:.0f}, {q95:.0f}) "
              f"{f1.mean():>9.3f} +- {f1.std():.3f}")
        label = f"{name} ({seconds:.0f} s)"
        axes[0].hist(counts, bins=20, histtype="step", linewidth=1.5, label=label)
        axes[1].hist(f1, bins=20, histtype="step", linewidth=1.5, label=label)
    axes[0].axvline(len(truth), color="k", linestyle="--", label=f"truth ({len(truth)})")
    axes[0].set_xlabel("number of stars in a posterior draw")
    axes[1].set_xlabel("F1 of a draw against the truth (one-to-one, 0.5 px, 0.5 mag)")
    for ax in axes:
        ax.set_ylabel("draws")
        ax.legend(fontsize="small")
    figure.suptitle(f"Simulated {shape[0]} x {shape[1]} M2-like image ({args.model}), "
                    f"{args.n_samples} draws each")
    if args.figure:
        figure.savefig(args.figure, dpi=90)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
