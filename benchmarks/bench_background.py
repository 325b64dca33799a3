"""How well `starnet.background.fit_background` recovers a known background factor.

Simulates ``--n-images`` images of 106 x 106 pixels (the size of the M2 region) from the
model's own prior and PSFs, at each of several true factors on its nominal background,
and prints the mean and spread of the estimated factor, the mean of its reported standard
deviation, and the detection F1 and count bias of the catalogs made with the estimated
and with the true background; then estimates the factor of the real M2 image. Run::

    python benchmarks/bench_background.py --model sdss-m2 --n-images 10
"""

import argparse

import numpy as np

from starnet import StarNetDeblender, match_catalogs, simulate_starfield
from starnet.background import fit_background
from starnet.datasets import load_m2

SHAPE = (106, 106)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--n-images", type=int, default=10)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.15, 1.3, 1.45])
    args = parser.parse_args(argv)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    band = deblender.bands[0]
    print(f"{args.n_images} simulated images of {SHAPE[0]} x {SHAPE[1]} per true factor")
    print("true   estimated (mean +- sd)   reported sd   F1 estimated / true bg   "
          "N bias estimated / true bg")
    for scale in args.scales:
        estimates, reported, f1, bias = [], [], {"fit": [], "true": []}, {"fit": [], "true": []}
        for seed in range(args.n_images):
            image, truth = simulate_starfield(
                SHAPE, prior=deblender.prior, psf=deblender.psfs, margin=6.0, seed=seed,
                background=[scale * b for b in deblender.background],
                stamp_size=deblender.stamp_size)
            inside = ((truth["x"] >= -0.5) & (truth["x"] < SHAPE[1] - 0.5)
                      & (truth["y"] >= -0.5) & (truth["y"] < SHAPE[0] - 0.5))
            truth = truth[inside]
            fitted, _ = fit_background(deblender, image)
            estimates.append(fitted.meta["background_fit"]["scale"])
            reported.append(fitted.meta["background_fit"]["scale_sd"])
            for key, nddata in (("fit", fitted), ("true", image)):
                catalog = deblender(nddata, background="given")
                f1[key].append(match_catalogs(catalog, truth, band=band).f1)
                bias[key].append(catalog.meta["n_stars_mean"] / len(truth) - 1)
        print(f"{scale:4.2f}   {np.mean(estimates):.3f} +- {np.std(estimates):.3f}"
              f"{np.mean(reported):17.3f}   {np.mean(f1['fit']):10.3f} / "
              f"{np.mean(f1['true']):.3f}   {np.mean(bias['fit']):+13.2%} / "
              f"{np.mean(bias['true']):+.2%}")
    image, _ = load_m2(border=3)
    fitted, _ = fit_background(deblender, image)
    fit = fitted.meta["background_fit"]
    print(f"M2: factor {fit['scale']:.3f} +- {fit['scale_sd']:.3f} on the nominal background ("
          + ", ".join(f"{b} {fit['scale'] * v:.0f} e-"
                      for b, v in zip(deblender.bands, deblender.background)) + ")")


if __name__ == "__main__":
    main()
