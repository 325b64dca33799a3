"""How well `starnet.background.fit_background` recovers a known background.

Simulates ``--n-images`` images of 106 x 106 pixels from the model's own prior, PSFs and
background (the truth: factor 1), starts the fit from a first guess ``--start`` times the
truth, and prints the fitted factors per band; then fits the real M2 image from the SDSS
sky. Run::

    python benchmarks/bench_background.py --model sdss-m2 --n-images 5
"""

import argparse

import numpy as np

from starnet import StarNetDeblender, simulate_starfield
from starnet.background import fit_background
from starnet.datasets import load_m2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--n-images", type=int, default=5)
    parser.add_argument("--start", type=float, default=1.2)
    args = parser.parse_args(argv)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    bands = deblender.bands
    print("image            " + "  ".join(f"fitted/true {b}" for b in bands))
    factors = []
    for seed in range(args.n_images):
        image, _ = simulate_starfield((106, 106), prior=deblender.prior, psf=deblender.psfs,
                                      background=deblender.background, seed=seed, margin=6)
        image.meta["background"] = deblender.background * args.start
        # the same factors of the truth as the model was trained on: 0.9 to 1.6
        fitted, _ = fit_background(deblender, image, bounds=(0.9 / args.start, 1.6 / args.start))
        factor = fitted.meta["background"].mean(axis=(1, 2)) / deblender.background
        factors.append(factor)
        print(f"simulated {seed:<6} " + "  ".join(f"{f:13.3f}" for f in factor))
    print("simulated mean   " + "  ".join(f"{f:13.3f}" for f in np.mean(factors, axis=0)))
    image, _ = load_m2(border=3)
    fitted, history = fit_background(deblender, image)
    sky = np.mean(image.meta["background"], axis=(1, 2))
    print("M2 from the SDSS sky: " + ", ".join(
        f"{b} {f:.0f} e- ({f / s:.3f} x sky {s:.0f})"
        for b, f, s in zip(bands, fitted.meta["background"].mean(axis=(1, 2)), sky)))


if __name__ == "__main__":
    main()
