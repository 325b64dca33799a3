"""Count bias, coverage and F1 against the error of the PSF that renders the images.

Images (M2 prior and sky, 100 x 100, stars 6 pixels beyond the edges too) are rendered
through PSFs on the line between the field's SDSS KL PSF (``t = 0``; as
`starnet.datasets.load_m2` gives it with ``psf='kl'``: at the region's centre, blurred by
the resampling in i) and the psField power law (``t = 1``), band by band:
``P_t = (1 - t) P_kl + t P_powerlaw`` (pixel-integrated,
unit sum; negative pixels of an extrapolation are clipped). Each model catalogs the same
images; the table gives the relative bias of the posterior mean count, the coverage of
the 90 % count interval and the detection F1 (one-to-one, 0.5 px, 0.5 mag).

Run::

    python benchmarks/bench_psf_error.py --model sdss-m2 sdss-m2-powerlaw --n-images 10
"""

import argparse
import warnings

import numpy as np
from photutils.psf import ImagePSF

from starnet import StarNetDeblender
from starnet.calibration import count_coverage, evaluate_on_simulations
from starnet.datasets import load_m2
from starnet.psf import pixel_stamps


def psf_between(t, size=25):
    """PSFs of the r and i bands at ``t`` on the line from the KL PSF to the power law."""
    images = load_m2(psf="kl")[0].meta["psf"]
    laws = load_m2(psf="powerlaw")[0].meta["psf"]
    psfs = []
    for image, law in zip(images, laws):
        a = pixel_stamps(image, size, [0.0], [0.0])[0]
        b = pixel_stamps(law, size, [0.0], [0.0])[0]
        mixed = np.clip((1 - t) * a / a.sum() + t * b / b.sum(), 0, None)
        psfs.append(ImagePSF(mixed / mixed.sum()))
    return psfs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sdss-m2", "sdss-m2-powerlaw"])
    parser.add_argument("--t", type=float, nargs="+", default=[-0.5, 0.0, 0.5, 1.0],
                        help="positions on the line from the KL PSF (0) to the power law (1)")
    parser.add_argument("--n-images", type=int, default=10)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2000)
    args = parser.parse_args(argv)
    deblenders = {m: StarNetDeblender.from_name_or_path(m) for m in args.model}
    print(f"{args.n_images} images of {args.size} x {args.size} per row, seeds from "
          f"{args.seed}; t = 0: the SDSS KL PSF, t = 1: the psField power law")
    print(f"{'model':>20} {'t':>6} {'count bias':>11} {'90 % coverage':>14} {'F1':>6}")
    for t in args.t:
        psf = psf_between(t)
        for name, deblender in deblenders.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="the image's PSF")
                results = evaluate_on_simulations(deblender, n_images=args.n_images,
                                                  shape=(args.size, args.size),
                                                  seed=args.seed, levels=(0.9,), psf=psf)
            coverage = count_coverage(results)
            print(f"{name:>20} {t:6.2f} {coverage.meta['relative_bias']:+11.2%} "
                  f"{coverage['coverage'][0]:14.2f} {np.mean(results['f1']):6.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
