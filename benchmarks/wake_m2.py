"""The wake phase on M2: the power-law PSF and background that the image's pixels prefer.

Draws catalogs from the bundled model's posterior for the M2 image (``load_m2(border=3)``,
background fitted by `starnet.background.fit_background`), fits the power-law PSF of each
band and a factor on the background by the expected log-likelihood (`starnet.wake`),
starting from the psField power law, and scores each candidate PSF (psField power law,
KL PSF, fitted power law) by the expected log-likelihood per pixel on the same draws
(the KL PSF also with the fitted background factor, to compare PSFs on one background).

Run::

    python benchmarks/wake_m2.py [--model sdss-m2] [--steps 100]
"""

import argparse
import warnings

from starnet import StarNetDeblender
from starnet.background import fit_background
from starnet.datasets import load_m2
from starnet.wake import expected_log_likelihood, fit_psf_to_catalogs

SHAPE = ("sigma1", "sigma2", "sigmap", "beta", "b", "p0")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--stamp-size", type=int, default=19)
    args = parser.parse_args(argv)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    image, _ = load_m2(border=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, _ = fit_background(deblender, image)
    samples = deblender.sample(image, n_samples=args.samples, seed=0, background="given")
    start = load_m2(psf="powerlaw")[0].meta["psf"]
    fit = fit_psf_to_catalogs(image, samples, psf=start, n_steps=args.steps,
                              stamp_size=args.stamp_size)
    print(f"model {args.model}; {args.samples} posterior catalogs of the M2 image, "
          f"{args.steps} steps")
    print(f"{'band':>4} {'':>10} " + " ".join(f"{name:>8}" for name in SHAPE))
    for band, before, after in zip(image.meta["bands"], start, fit.psfs):
        for label, psf in (("psField", before), ("fitted", after)):
            print(f"{band:>4} {label:>10} " + " ".join(
                f"{getattr(psf, name).value:8.3g}" for name in SHAPE))
    print("background factor on the fitted background: "
          + ", ".join(f"{b} {s:.3f}" for b, s in zip(image.meta["bands"], fit.background_scale)))
    kl = load_m2(psf="kl")[0].meta["psf"]
    print("expected log-likelihood per pixel (same draws, stamps of 25):")
    for label, psf, scale in (("psField power law", start, 1.0), ("KL PSF", kl, 1.0),
                              ("KL PSF, fitted bg", kl, fit.background_scale),
                              ("fitted power law", fit.psfs, fit.background_scale)):
        value = expected_log_likelihood(image, samples, psf=psf, background_scale=scale)
        print(f"  {label:>18} {value:.4f}")


if __name__ == "__main__":
    main()
