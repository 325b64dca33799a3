"""Colour-magnitude diagram of the whole SDSS frame of M2 (the paper's Fig. 10).

Catalogs the whole frame (run 2583, camcol 2, field 136; r and i, 1489 x 2048 pixels)
with the bundled model, after estimating a background that varies over the frame
(`starnet.background.fit_background` with ``--smoothing`` pixels), and plots r against
r - i for all stars of the modal catalog, and for the confident ones: magnitude
posterior standard deviation below ``--max-mag-err`` in both bands.

Run::

    python benchmarks/cmd_m2.py --output docs/_static/m2_cmd.png --overwrite
"""

import argparse
import time
from pathlib import Path

import matplotlib
import numpy as np

from starnet import StarNetDeblender
from starnet.background import fit_background
from starnet.datasets import load_sdss_frame

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--output", default="m2_cmd.png")
    parser.add_argument("--max-mag-err", type=float, default=0.2)
    parser.add_argument("--smoothing", type=float, default=64.0,
                        help="width (pixels) of the window of the background estimate")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists; pass --overwrite to replace it")

    image = load_sdss_frame(2583, 2, 136, ("r", "i"), psf="kl")
    deblender = StarNetDeblender.from_name_or_path(args.model)
    started = time.perf_counter()
    image, _ = fit_background(deblender, image, smoothing=args.smoothing)
    catalog = deblender(image)
    seconds = time.perf_counter() - started
    confident = (catalog["mag_r_err"].value < args.max_mag_err) & \
        (catalog["mag_i_err"].value < args.max_mag_err)
    scale = image.meta["background"][0] / deblender.background[0]
    print(f"whole frame {image.data.shape[1]} x {image.data.shape[2]}: background "
          f"{np.median(scale):.3f} times the model's (SDSS sky) in the median, from "
          f"{scale.min():.3f} to {scale.max():.3f}; {len(catalog)} stars in {seconds:.1f} s "
          f"(estimate included); {int(confident.sum())} with magnitude errors below "
          f"{args.max_mag_err} in r and i")

    r = catalog["mag_r"].value
    color = r - catalog["mag_i"].value
    figure, axes = plt.subplots(1, 2, figsize=(9, 5), sharex=True, sharey=True)
    for ax, keep, title in ((axes[0], np.ones(len(r), bool), "all stars of the modal catalog"),
                            (axes[1], confident, f"mag errors < {args.max_mag_err}")):
        ax.scatter(color[keep], r[keep], s=1, alpha=0.4, color="k")
        ax.set_title(f"{title} ({int(keep.sum())})")
        ax.set_xlabel("r - i")
    axes[0].set_ylabel("r")
    axes[0].set_xlim(-1, 1.5)
    axes[0].set_ylim(23.5, 14)
    figure.suptitle("M2, SDSS run 2583 camcol 2 field 136, StarNet (starnet)")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
