"""A simulated whole frame: count bias, 90 % count coverage and F1 by distance from a cluster.

Simulates SDSS-sized frames (1489 x 2048 pixels, r and i) of a globular cluster whose
star density follows a King profile with an infinite tidal radius,
``n(r) = 0.12 / (1 + (r / r_c)^2)`` stars per pixel with ``r_c = 150`` px, centred on the
frame: 0.12 per pixel in the core, 0.0025 at the middle of the long edges and 0.0017
in the corners (`starnet.simulate_starfield` with a ``density`` map; the first model's
PSFs and sky, the prior's fluxes and colours). Each model catalogs the whole frame.
Per annulus:

* ``N``: the true number of stars in it, and ``bias``: the posterior mean count's
  relative error (`StarNetDeblender.count_posterior` with the annulus as region);
* ``cover``: the fraction of the annulus' sectors (``--sectors`` per annulus and frame)
  whose 90 % count interval holds the true count;
* ``F1``: one-to-one matching of the modal catalog with the truth in the annulus
  (0.5 px, 0.5 mag in r).

``--grid-consensus`` adds, per model, the F1 of the catalog that the shifted tile grids
agree on (``grid_consensus=True``; ``F1 4 grids``).

Run (``--reference`` adds models trained at one density, to compare at the annulus
whose density is closest to theirs)::

    python benchmarks/bench_whole_frame.py --models sdss-m2-powerlaw sdss-m2 \\
        --seeds 0 1 --output docs/_static/whole_frame.png

``--labels`` names the models in the figure's legend (by default a bundled model's name,
or the densities a model file was trained at).
"""

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from starnet import StarNetDeblender, match_catalogs, simulate_starfield

SHAPE = (1489, 2048)
PEAK, CORE_RADIUS = 0.12, 150.0
EDGES = (0, 50, 150, 300, 500, 750, 1000, 1300)


def king_density(shape, *, peak=PEAK, core_radius=CORE_RADIUS):
    """Stars per pixel of a King profile with infinite tidal radius, centred on the frame,
    and each pixel's distance from the centre."""
    rows, cols = np.indices(shape)
    radius = np.hypot(rows - (shape[0] - 1) / 2, cols - (shape[1] - 1) / 2)
    return peak / (1 + (radius / core_radius) ** 2), radius


def sector_regions(radius, n_sectors):
    """Boolean maps (annulus, sector, rows, cols) and each annulus' map."""
    rows, cols = np.indices(radius.shape)
    angle = np.arctan2(rows - (radius.shape[0] - 1) / 2, cols - (radius.shape[1] - 1) / 2)
    sector = np.minimum(((angle + np.pi) / (2 * np.pi) * n_sectors).astype(int), n_sectors - 1)
    annuli = [(radius >= low) & (radius < high) for low, high in zip(EDGES[:-1], EDGES[1:])]
    return annuli, [[annulus & (sector == s) for s in range(n_sectors)] for annulus in annuli]


def tile_of(catalog, tile_size, shape):
    """Row and column of the central pixel of each star's tile (the count_posterior rule)."""
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    tile_row = np.floor((y + 0.5) / tile_size).astype(int)
    tile_col = np.floor((x + 0.5) / tile_size).astype(int)
    row = np.minimum(tile_row * tile_size + (tile_size - 1) // 2, shape[0] - 1)
    col = np.minimum(tile_col * tile_size + (tile_size - 1) // 2, shape[1] - 1)
    return row, col


def interval(pmf):
    cdf = np.cumsum(pmf)
    return int(np.searchsorted(cdf, 0.05)), int(np.searchsorted(cdf, 0.95))


def score(deblender, image, truth, annuli, sectors, grid_consensus=False):
    """Per annulus: true count, posterior mean count, covered sectors, sectors, F1, TPR,
    PPV, and the F1 of the grid consensus (NaN without ``grid_consensus``)."""
    shape = image.data.shape[1:]
    inside = ((truth["x"] >= -0.5) & (truth["x"] < shape[1] - 0.5)
              & (truth["y"] >= -0.5) & (truth["y"] < shape[0] - 0.5))
    truth = truth[inside]
    row, col = tile_of(truth, deblender.grid.tile_size, shape)
    started = time.perf_counter()
    catalog = deblender(image, background="given")
    seconds = time.perf_counter() - started
    consensus = (deblender(image, background="given", grid_consensus=True)
                 if grid_consensus else None)
    regions = [region for annulus in sectors for region in annulus if region.any()]
    pmfs = iter(deblender.count_posterior(image, region=regions, background="given"))

    def pixels(table):
        return (np.clip(np.round(np.asarray(table["y_fit"])).astype(int), 0, shape[0] - 1),
                np.clip(np.round(np.asarray(table["x_fit"])).astype(int), 0, shape[1] - 1))

    x_true = np.clip(np.round(np.asarray(truth["x"])).astype(int), 0, shape[1] - 1)
    y_true = np.clip(np.round(np.asarray(truth["y"])).astype(int), 0, shape[0] - 1)
    rows = []
    for annulus, annulus_sectors in zip(annuli, sectors):
        n_true = n_mean = covered = n_sectors = 0
        for region in annulus_sectors:
            if not region.any():
                continue
            pmf = next(pmfs)
            true = int(region[row, col].sum())
            low, high = interval(pmf)
            n_true += true
            n_mean += float(pmf @ np.arange(len(pmf)))
            covered += low <= true <= high
            n_sectors += 1
        in_truth = truth[annulus[y_true, x_true]]
        match = match_catalogs(catalog[annulus[pixels(catalog)]], in_truth, band="r")
        f1_grids = (np.nan if consensus is None else match_catalogs(
            consensus[annulus[pixels(consensus)]], in_truth, band="r").f1)
        rows.append((n_true, n_mean, covered, n_sectors, match.f1, match.tpr, match.ppv,
                     f1_grids))
    return np.array(rows), seconds, len(catalog)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sdss-m2"])
    parser.add_argument("--reference", nargs="*", default=[], metavar="MODEL",
                        help="models trained at one density (their prior's mu), compared "
                             "at the annulus whose density is closest")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sectors", type=int, default=8)
    parser.add_argument("--output", default=None, help="figure of bias and F1 by radius")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend label of each of --models (default: a bundled model's "
                             "name, or the densities a model file was trained at)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--grid-consensus", action="store_true",
                        help="also the F1 of the catalog the shifted tile grids agree on")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.models):
        parser.error(f"--labels needs one label per model of --models ({len(args.models)})")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise SystemExit(f"{args.output} exists; pass --overwrite to replace it")

    models = {name: StarNetDeblender.from_name_or_path(name)
              for name in [*args.models, *args.reference]}
    first = models[args.models[0]]
    density, radius = king_density(SHAPE)
    annuli, sectors = sector_regions(radius, args.sectors)
    mean_density = [float(density[a].mean()) for a in annuli]
    results = {name: 0 for name in models}
    for seed in args.seeds:
        image, truth = simulate_starfield(SHAPE, prior=first.prior, psf=first.psfs,
                                          background=first.background, density=density,
                                          margin=6, seed=seed)
        for name, deblender in models.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the reference models' PSF check
                rows, seconds, n_catalog = score(deblender, image, truth, annuli, sectors,
                                                 args.grid_consensus)
            print(f"seed {seed}, {name}: {n_catalog} stars in the modal catalog of the "
                  f"frame ({len(truth)} true, margin included), {seconds:.1f} s")
            results[name] = results[name] + rows
    n_frames = len(args.seeds)
    print(f"\n{n_frames} simulated {SHAPE[0]} x {SHAPE[1]} frames, King profile 0.12 / "
          f"(1 + (r / {CORE_RADIUS:g})^2) stars per pixel; {args.sectors} sectors per annulus "
          "and frame for the 90 % coverage; F1 pooled over the frames")
    header = f"{'radius px':>11} {'stars/px':>8} {'N true':>7}"
    for name in args.models:
        header += f" | {name[-18:]:>18}: {'bias':>6} {'cover':>5} {'F1':>5}"
        header += f" {'F1 4 grids':>10}" if args.grid_consensus else ""
    print(header)
    for a, (low, high) in enumerate(zip(EDGES[:-1], EDGES[1:])):
        line = f"{low:>5}-{high:<5} {mean_density[a]:8.4f} {int(results[args.models[0]][a, 0]):7d}"
        for name in args.models:
            n_true, n_mean, covered, n_sectors, f1 = results[name][a, :5]
            line += (f" | {'':>18}  {(n_mean - n_true) / n_true:+6.1%} "
                     f"{covered / n_sectors:5.2f} {f1 / n_frames:5.3f}")
            if args.grid_consensus:
                line += f" {results[name][a, 7] / n_frames:10.3f}"
        print(line)
    for name in args.reference:
        mu = models[name].prior.mu
        a = int(np.argmin(np.abs(np.log(mean_density) - np.log(mu))))
        n_true, n_mean, covered, n_sectors, f1 = results[name][a, :5]
        print(f"reference {name} (trained at {mu:g} stars/px) in annulus {EDGES[a]}-"
              f"{EDGES[a + 1]}: bias {(n_mean - n_true) / n_true:+.1%}, cover "
              f"{covered / n_sectors:.2f}, F1 {f1 / n_frames:.3f}")
    if args.output:
        plot(args, results, n_frames, models)


def plot(args, results, n_frames, models):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    middle = [(low + high) / 2 for low, high in zip(EDGES[:-1], EDGES[1:])]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharex=True)
    for i, name in enumerate(args.models):
        label = args.labels[i] if args.labels else density_label(name, models[name])
        n_true, n_mean, covered, n_sectors, f1 = results[name][:, :5].T
        axes[0].plot(middle, 100 * (n_mean - n_true) / n_true, "o-", label=label)
        axes[1].plot(middle, covered / n_sectors, "o-", label=label)
        axes[2].plot(middle, f1 / n_frames, "o-", label=label)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[1].axhline(0.9, color="grey", lw=0.8)
    for ax, label in zip(axes, ("count bias (%)", "90 % interval coverage", "F1")):
        ax.set_xlabel("distance from the cluster centre (px)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    figure.suptitle("simulated 1489 x 2048 frame, King profile (0.12 stars / px in the core)")
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


def density_label(model, deblender):
    """A bundled model's name, or the star densities a model file was trained at."""
    if str(model) in StarNetDeblender.available():
        return str(model)
    settings = deblender.training_settings
    if settings is None or settings.density_range is None:
        return f"trained at {deblender.prior.mu:g} stars / px"
    return "trained at {:g} to {:g} stars / px".format(*settings.density_range)


if __name__ == "__main__":
    main()
