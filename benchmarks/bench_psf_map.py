"""Time of a call with a PSF that varies over the image, beside one PSF and sdss-m2.

The 1000 x 1000 cut-out of the bundled M2 frame (rows 300:1300, cols 500:1500, r and i)
is catalogued by ``sdss-m2`` (the KL PSF at the cut-out's centre, ``psf="kl"``) and by
``sdss`` with the same PSF and with the KL PSF as a `~photutils.psf.GriddedPSFModel`
over the image (``psf="kl-grid"``), with the given and the fitted background; each
time is the best of ``--repeats`` calls, threads chosen by starnet. The models alternate
twice, so that a change of load during the run shows as a spread.

Run::

    python benchmarks/bench_psf_map.py
"""

import argparse
import time
import warnings

import numpy as np

from starnet import StarNetDeblender
from starnet.datasets import load_sdss_frame

CUTOUT = (slice(300, 1300), slice(500, 1500))
RUNS = (("sdss-m2", "kl"), ("sdss", "kl"), ("sdss", "kl-grid"),
        ("sdss-m2", "kl"), ("sdss", "kl-grid"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    images = {psf: load_sdss_frame(2583, 2, 136, ("r", "i"), cutout=CUTOUT, psf=psf)
              for psf in ("kl", "kl-grid")}
    print(f"{'model':>8} {'PSF':>8} {'background':>10} {'seconds':>8} {'stars':>6}")
    for name, psf in RUNS:
        deblender = StarNetDeblender.pretrained(name)
        for background in ("given", "fit"):
            best = np.inf
            for _ in range(args.repeats):
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # sdss-m2's PSF-check warning
                    catalog = deblender(images[psf], background=background, progress=False)
                best = min(best, time.perf_counter() - started)
            print(f"{name:>8} {psf:>8} {background:>10} {best:8.2f} {len(catalog):6d}",
                  flush=True)


if __name__ == "__main__":
    main()
