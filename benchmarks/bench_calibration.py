"""Calibration of a deblender on images simulated from its own model (paper Fig. A.4).

For ``--n-images`` simulated images (stars also drawn 6 pixels beyond the edges) at each
``--background-factors`` (the model's background times the factor; the deblender is told
the true background), prints for the star count the exact posterior mass of the central
intervals next to their coverage, the count bias next to the fraction of stars that the
``max_sources`` truncation drops, and the detection F1; for positions and fluxes, the
coverage of q's central intervals from the PIT of the true values (`starnet.calibration.
source_pit`), overall and by magnitude. Writes figures of count coverage against level
(``--output``), of the PIT of the true count (``--count-pit-figure``) and of the PIT of
positions and fluxes at the factor nearest 1 (``--pit-figure``).

Run::

    python benchmarks/bench_calibration.py --model sdss-m2 --n-images 200 --size 50 \\
        --background-factors 0.9 1.0 1.15 1.3 1.45 1.6

Several ``--model`` values (names or files) are compared on the same images; ``--labels``
names them in the figure's legend (by default a bundled model's name, or a model file's
variational family and training epochs)::

    python benchmarks/bench_calibration.py --model runs/a.pt runs/b.pt \
        --labels "constant rate, 64 min" "decaying rate, 80 min" --output calibration.png
``--density`` draws the images at another density than the model's prior's (the
prior's other settings kept)::

    python benchmarks/bench_calibration.py --model sdss-m2 --density 0.01 --n-images 200

``--render-psf`` renders the images through other PSFs than the model's (the ``psf``
options of `starnet.datasets.load_m2`)::

    python benchmarks/bench_calibration.py --render-psf model powerlaw kl image --n-images 20
"""

import argparse
import warnings

import matplotlib
import numpy as np

from starnet import StarNetDeblender
from starnet.calibration import (count_coverage, dropped_fraction, evaluate_on_simulations,
                                 pit_coverage)
from starnet.datasets import load_m2
from starnet.datasets.m2 import M2_NELEC_PER_NMGY

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LEVELS = (0.5, 0.8, 0.9, 0.95)
MAG_EDGES = (-np.inf, 19.0, 20.0, 21.0, 21.5, 22.0, np.inf)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sdss-m2"])
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--background-factors", type=float, nargs="+", default=[1.0])
    parser.add_argument("--density", type=float, default=None,
                        help="stars per pixel of the simulated images (default: the "
                             "model's prior's)")
    parser.add_argument("--pairing", choices=["sample", "mode"], default="sample",
                        help="pairing of true stars and q's sources (see source_pit)")
    parser.add_argument("--count-samples", type=int, default=200,
                        help="posterior draws behind a checkerboard model's count interval")
    parser.add_argument("--render-psf", nargs="+", default=["model"], metavar="PSF",
                        help="PSFs that render the images: 'model' (the model's own) or a "
                             "psf option of starnet.datasets.load_m2")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend label of each --model (default: a bundled model's name, "
                             "or a model file's family and training epochs)")
    parser.add_argument("--output", default=None, help="PNG of count coverage against level")
    parser.add_argument("--count-pit-figure", default=None,
                        help="PNG of the randomised PIT of the true count, per factor")
    parser.add_argument("--pit-figure", default=None,
                        help="PNG of the PIT of true positions and fluxes (the factor "
                             "nearest 1)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.model):
        parser.error(f"--labels needs one label per --model ({len(args.model)})")
    runs = []
    for model in args.model:
        deblender = StarNetDeblender.from_name_or_path(model)
        deblender.n_count_samples = args.count_samples
        if args.density is not None:
            deblender.prior = deblender.prior.replace(mu=args.density)
        dropped = dropped_fraction(deblender.prior, tile_size=deblender.grid.tile_size,
                                   max_sources=deblender.grid.max_sources, n_images=200,
                                   seed=args.seed)
        print(f"model {model}: the prior puts {dropped:.3%} of its stars beyond "
              f"{deblender.grid.max_sources} per tile (200 prior draws of 100 x 100)")
        for psf_name in args.render_psf:
            psf = None if psf_name == "model" else load_m2(psf=psf_name)[0].meta["psf"]
            for factor in args.background_factors:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="the image's PSF")
                    results = evaluate_on_simulations(
                        deblender, n_images=args.n_images, shape=(args.size, args.size),
                        seed=args.seed, levels=LEVELS, psf=psf, background_factor=factor,
                        pairing=args.pairing)
                name = (args.labels[args.model.index(model)] if args.labels
                        else model_label(model, deblender))
                label = f"{name}, {psf_name} PSF, background x {factor:g}"
                runs.append((label, results))
                _report(label, deblender, results, args)
    if len(runs) > 1:
        _summary(runs)
    if args.output:
        _coverage_figure(runs, args.output)
    if args.count_pit_figure:
        _count_pit_figure(runs, args.count_pit_figure)
    if args.pit_figure:
        factors = [abs(results.meta["background_factor"] - 1) for _, results in runs]
        _pit_figure(runs[int(np.argmin(factors))], args.pit_figure)


def _report(label, deblender, results, args):
    coverage = count_coverage(results)
    pits = results.meta["source_pit"]
    print(f"\n{label}: {args.n_images} images of {args.size} x {args.size}"
          + (f", count intervals from {args.count_samples} draws"
             if deblender.encoder.n_colors > 1 else ", exact count pmf"))
    print(f"  true count {np.mean(results['n_true']):.1f} per image; posterior mean "
          f"{np.mean(results['n_stars_mean']):.1f}; relative bias "
          f"{coverage.meta['relative_bias']:+.2%} +- {coverage.meta['relative_bias_err']:.2%}"
          f"; stars beyond max_sources per tile in these images "
          f"{coverage.meta['dropped_fraction']:.2%}")
    print(f"  detection (one-to-one, 0.5 px, 0.5 mag): F1 {np.mean(results['f1']):.3f}")
    print("  count:  level   exact mass   coverage (+- binomial s.e.)")
    for row in coverage:
        print(f"          {row['level']:5.2f}   {row['mass']:10.3f}   "
              f"{row['coverage']:.3f} +- {row['coverage_err']:.3f}")
    print(f"  positions and fluxes: PIT of {len(pits)} true stars "
          f"({results.meta['source_fraction']:.1%} of all) in tiles whose modal count is "
          f"the true count, pairing '{results.meta['pairing']}'")
    _print_coverage("level", pit_coverage(pits, LEVELS), LEVELS)
    band = deblender.bands[0]
    mag = 22.5 - 2.5 * np.log10(np.asarray(pits[f"flux_{band}"]) / M2_NELEC_PER_NMGY)
    print(f"  by true {band} magnitude (SDSS zero point of M2), coverage of the 90 % "
          "intervals:")
    names = [name for name in pits.colnames if name.startswith("pit_")]
    print(f"  {'magnitude':>13} {'stars':>6} " + " ".join(f"{n[4:]:>8}" for n in names))
    for low, high in zip(MAG_EDGES[:-1], MAG_EDGES[1:]):
        selected = pits[(mag >= low) & (mag < high)]
        table = pit_coverage(selected, (0.9,))
        print(f"  {low:6.1f}-{high:<6.1f} {len(selected):6d} "
              + " ".join(f"{table[n][0]:8.3f}" for n in names))


def _print_coverage(key, table, levels):
    names = [name for name in table.colnames if name.startswith("pit_")]
    print(f"  {key:>7} " + " ".join(f"{n[4:]:>8}" for n in names))
    for i, level in enumerate(levels):
        print(f"  {level:7.2f} " + " ".join(f"{table[n][i]:8.3f}" for n in names))


def _summary(runs):
    print("\nsummary (90 % intervals)")
    print(f"{'run':>45} {'bias':>8} {'+-':>6} {'dropped':>8} {'mass':>6} {'coverage':>9} "
          f"{'+-':>6} {'F1':>6} {'stars':>6} {'x':>6} {'y':>6} {'fluxes':>13}")
    for label, results in runs:
        coverage = count_coverage(results)
        row = coverage[coverage["level"] == 0.9][0]
        pit = pit_coverage(results.meta["source_pit"], (0.9,))
        fluxes = " ".join(f"{pit[n][0]:.3f}" for n in pit.colnames if n.startswith("pit_flux"))
        print(f"{label:>45} {coverage.meta['relative_bias']:+8.2%} "
              f"{coverage.meta['relative_bias_err']:6.2%} "
              f"{coverage.meta['dropped_fraction']:8.2%} {row['mass']:6.3f} "
              f"{row['coverage']:9.3f} {row['coverage_err']:6.3f} "
              f"{np.mean(results['f1']):6.3f} {results.meta['source_fraction']:6.1%} "
              f"{pit['pit_x'][0]:6.3f} {pit['pit_y'][0]:6.3f} {fluxes:>13}")


def _coverage_figure(runs, path):
    figure, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.4, 1], [0.4, 1], color="grey", lw=1, label="nominal level")
    for label, results in runs:
        coverage = count_coverage(results)
        line = ax.errorbar(coverage["level"], coverage["coverage"],
                           yerr=coverage["coverage_err"], marker="o", capsize=2, label=label)
        ax.plot(coverage["level"], coverage["mass"], ls=":", color=line[0].get_color())
    ax.set_xlabel("nominal level of the star-count interval")
    ax.set_ylabel("fraction of images covered (dotted: exact posterior mass)")
    ax.legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def _histogram(ax, values, title, bins):
    values = np.asarray(values, dtype=float)
    ax.hist(values, bins=bins, range=(0, 1), color="C0")
    expected = len(values) / bins
    spread = 2 * np.sqrt(expected * (1 - 1 / bins))
    ax.axhspan(expected - spread, expected + spread, color="grey", alpha=0.3)
    ax.set_title(title, fontsize="small")
    ax.set_xlabel("PIT")


def _count_pit_figure(runs, path):
    figure, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 2.8), squeeze=False)
    for ax, (label, results) in zip(axes[0], runs):
        _histogram(ax, results["count_pit"], label.split(", ")[-1], bins=10)
    axes[0, 0].set_ylabel("images")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def _pit_figure(run, path):
    label, results = run
    pits = results.meta["source_pit"]
    names = [name for name in pits.colnames if name.startswith("pit_")]
    figure, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        _histogram(ax, pits[name], name[4:], bins=20)
    axes[0, 0].set_ylabel("true stars")
    figure.suptitle(label, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def model_label(model, deblender):
    """A bundled model's name, or a model file's variational family and training epochs."""
    if str(model) in StarNetDeblender.available():
        return str(model)
    n_colors = deblender.encoder.n_colors
    family = "independent tiles" if n_colors == 1 else f"checkerboard, {n_colors} colours"
    settings = deblender.training_settings
    return family if settings is None else f"{family}, {settings.n_epochs} epochs"


if __name__ == "__main__":
    main()
