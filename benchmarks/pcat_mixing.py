"""How fast the PCAT-like sampler approaches the posterior, by the size of its squares.

Simulates one M2-density image from a bundled model's own prior, PSFs and background
(no stars outside it, so that its truth is a posterior draw under the sampler's model),
and runs ``--n-chains`` chains of `starnet.baselines.CatalogSampler` for ``--seconds``
of wall time with each ``--region-sizes`` value, started from StarNet's draws and from
empty catalogs. It prints the sweeps made and the mean log posterior density of the
chains' last states minus the truth's (`CatalogSampler.log_posterior`): near 0 once
the chains reach the posterior's typical set. Run::

    python benchmarks/pcat_mixing.py --region-sizes 24 8
"""

import argparse

import numpy as np

from starnet import StarNetDeblender, simulate_starfield
from starnet.baselines import CatalogSampler


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--region-sizes", type=int, nargs="+", default=[24, 8])
    parser.add_argument("--n-chains", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    image, truth = simulate_starfield((args.size, args.size), prior=deblender.prior,
                                      psf=deblender.psfs, background=deblender.background,
                                      seed=args.seed, stamp_size=deblender.stamp_size)
    draws = deblender.sample(image, n_samples=args.n_chains, seed=args.seed,
                             background="given", progress=False)
    print(f"{args.model}: simulated {args.size} x {args.size} image, {len(truth)} stars; "
          f"{args.n_chains} chains, {args.seconds:g} s each run")
    print(f"{'region':>6}  {'start':<8} {'sweeps':>7} {'N mean':>7} {'log p - truth':>14}")
    for region_size in args.region_sizes:
        sampler = CatalogSampler(prior=deblender.prior, region_size=region_size)
        truth_density = sampler.log_posterior(image, truth)[0]
        for start, options in (("StarNet", {"init": draws}),
                               ("empty", {"n_chains": args.n_chains})):
            chains = sampler.sample(image, n_samples=1, time_limit=args.seconds,
                                    burn_in=0.0, seed=args.seed, **options)
            counts = np.bincount(chains["sample"], minlength=args.n_chains)
            gap = np.mean(sampler.log_posterior(image, chains)) - truth_density
            print(f"{region_size:>6}  {start:<8} {chains.meta['n_sweeps']:>7} "
                  f"{counts.mean():>7.1f} {gap:>14.0f}", flush=True)


if __name__ == "__main__":
    main()
