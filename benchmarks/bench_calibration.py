"""Calibration of a deblender on images simulated from its own model (paper Fig. A.4).

For ``--n-images`` simulated 100 x 100 images (stars also drawn 6 pixels beyond the
edges), prints the coverage of the central posterior intervals of the star count at
several levels, the mean relative bias of the count, the detection F1, and the coverage of
per-star intervals of position and flux for matched stars; writes a PNG of coverage
against nominal level.

Run::

    python benchmarks/bench_calibration.py --model sdss-m2 --n-images 200 --output calibration.png

Several ``--model`` values (names or files) are compared on the same images; ``--labels``
names them in the figure's legend (by default a bundled model's name, or a model file's
variational family and training epochs)::

    python benchmarks/bench_calibration.py --model runs/a.pt runs/b.pt \
        --labels "constant rate, 64 min" "decaying rate, 80 min" --output calibration.png
``--render-psf`` renders the images through other PSFs than the model's (the ``psf``
options of `starnet.datasets.load_m2`: the field's power law, KL PSF or PSF images), to
show what a PSF error does to the count::

    python benchmarks/bench_calibration.py --render-psf model powerlaw kl image --n-images 20
"""

import argparse
import warnings

import matplotlib
import numpy as np

from starnet import StarNetDeblender
from starnet.calibration import count_coverage, evaluate_on_simulations
from starnet.datasets import load_m2

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sdss-m2"])
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--count-samples", type=int, default=200,
                        help="posterior draws behind a checkerboard model's count interval")
    parser.add_argument("--render-psf", nargs="+", default=["model"], metavar="PSF",
                        help="PSFs that render the images: 'model' (the model's own) or a "
                             "psf option of starnet.datasets.load_m2")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend label of each --model (default: a bundled model's name, "
                             "or a model file's family and training epochs)")
    parser.add_argument("--output", default=None, help="PNG of coverage against level")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.model):
        parser.error(f"--labels needs one label per --model ({len(args.model)})")
    figure, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1)
    runs = [(model, psf) for model in args.model for psf in args.render_psf]
    for model, psf_name in runs:
        deblender = StarNetDeblender.from_name_or_path(model)
        deblender.n_count_samples = args.count_samples
        psf = None if psf_name == "model" else load_m2(psf=psf_name)[0].meta["psf"]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the image's PSF")
            results = evaluate_on_simulations(deblender, n_images=args.n_images,
                                              shape=(args.size, args.size), seed=args.seed,
                                              levels=LEVELS, psf=psf)
        coverage = count_coverage(results)
        print(f"model {model} (checkerboard colours: {deblender.encoder.n_colors}), "
              f"images rendered with the {psf_name} PSF, "
              f"{args.n_images} images of {args.size} x {args.size}"
              + (f", count intervals from {args.count_samples} draws"
                 if deblender.encoder.n_colors > 1 else ", exact count intervals"))
        print(f"  true count {np.mean(results['n_true']):.1f} per image; posterior mean "
              f"{np.mean(results['n_stars_mean']):.1f}; relative bias "
              f"{coverage.meta['relative_bias']:+.2%}")
        print(f"  detection (one-to-one, 0.5 px, 0.5 mag): TPR {np.mean(results['tpr']):.3f} "
              f"PPV {np.mean(results['ppv']):.3f} F1 {np.mean(results['f1']):.3f}")
        print("  level   count coverage   " + "   ".join(
            f"{name} coverage" for name in results.meta["source_coverage"]))
        for i, level in enumerate(LEVELS):
            sources = "   ".join(f"{values[i]:13.3f}"
                                 for values in results.meta["source_coverage"].values())
            print(f"  {level:5.2f}   {coverage['coverage'][i]:14.3f}   {sources}")
        label = (args.labels[args.model.index(model)] if args.labels
                 else model_label(model, deblender))
        ax.plot(LEVELS, coverage["coverage"], "o-",
                label=label if len(args.render_psf) == 1 else f"{label}, {psf_name} PSF")
    ax.set_xlabel("nominal level of the star-count interval")
    ax.set_ylabel("fraction of images covered")
    ax.legend()
    if args.output:
        figure.savefig(args.output, dpi=120)
        print(f"wrote {args.output}")


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
