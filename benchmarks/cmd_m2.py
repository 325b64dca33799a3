"""Colour-magnitude diagram of the whole SDSS frame of M2 (the paper's Fig. 10), and
star counts by distance from the cluster beside photutils'.

Catalogs the whole frame (run 2583, camcol 2, field 136; r and i, 1489 x 2048 pixels)
with each model (``--models``), after estimating a background that varies over the
frame (`starnet.background.fit_background` with ``--smoothing`` pixels), and plots r
against r - i for all stars of the first model's modal catalog, and for the confident
ones: magnitude posterior standard deviation below ``--max-mag-err`` in both bands, and
for the stars beyond ``--outskirts`` pixels from the cluster's centre.

Then counts stars per annulus around M2's centre (RA 323.36258, Dec -0.82325, via the
frame's WCS): stars brighter than r = ``--bright`` in each model's modal catalog and in
photutils' (`starnet.baselines.daophot_catalog`: DAOStarFinder and iterative PSF
photometry, r band, on the same background), where crowding is negligible far from the
core; and each model's stars with 21.5 < r < 22.5 per 1000 pixels (the faint band that a
model made of a sparse field's missing faint light when it believed the core's density).

``--psf kl-grid`` gives the PSF as it varies over the frame, ``--fpm`` the fpM masks
(saturated, interpolated and cosmic-ray pixels) and ``--f-max`` the upper flux told to
a model that reads the prior (``sdss``).

Run::

    python benchmarks/cmd_m2.py --models sdss-m2 sdss-m2-powerlaw \
        --output docs/_static/m2_cmd.png --overwrite
    python benchmarks/cmd_m2.py --models sdss --psf kl-grid --fpm --f-max 2e6 \
        --output docs/_static/m2_cmd_sdss.png
"""

import argparse
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from astropy.coordinates import SkyCoord

from starnet import StarNetDeblender
from starnet.background import fit_background
from starnet.baselines import daophot_catalog
from starnet.datasets import load_sdss_frame
from starnet.images import with_changes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

M2_CENTRE = SkyCoord(323.362583, -0.823250, unit="deg")
EDGES = (0, 100, 200, 400, 700, 1000, 1400, 2100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sdss-m2"])
    parser.add_argument("--output", default="m2_cmd.png")
    parser.add_argument("--max-mag-err", type=float, default=0.2)
    parser.add_argument("--bright", type=float, default=20.5,
                        help="r magnitude limit of the counts compared with photutils")
    parser.add_argument("--outskirts", type=float, default=700.0,
                        help="distance (pixels) from M2's centre beyond which the third "
                             "panel of the diagram shows the stars")
    parser.add_argument("--smoothing", type=float, default=64.0,
                        help="width (pixels) of the window of the background estimate")
    parser.add_argument("--psf", choices=("kl", "kl-grid"), default="kl",
                        help="the frame's KL PSF at its centre, or as it varies over the frame")
    parser.add_argument("--fpm", action="store_true",
                        help="mask the fpM's SATUR, INTERP and CR pixels (models that read "
                             "the mask)")
    parser.add_argument("--f-max", type=float, default=None,
                        help="the upper flux told to models that read the prior, e-")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists; pass --overwrite to replace it")

    frame = load_sdss_frame(2583, 2, 136, ("r", "i"), psf=args.psf,
                            fpm_planes=("SATUR", "INTERP", "CR") if args.fpm else None)
    centre = np.array(frame.wcs.world_to_pixel(M2_CENTRE), dtype=float)
    rows, cols = np.indices(frame.data.shape[1:])
    radius_map = np.hypot(cols - centre[0], rows - centre[1])
    area = [int(((radius_map >= low) & (radius_map < high)).sum())
            for low, high in zip(EDGES[:-1], EDGES[1:])]
    counts, catalogs = {}, {}
    for name in args.models:
        deblender = StarNetDeblender.from_name_or_path(name)
        if args.f_max is not None and deblender.encoder.prior_features:
            deblender.prior = deblender.prior.replace(f_max=args.f_max)
        started = time.perf_counter()
        image, _ = fit_background(deblender, frame, smoothing=args.smoothing)
        catalog = deblender(image, background="given")
        seconds = time.perf_counter() - started
        scale = image.meta["background"][0] / deblender.background[0]
        print(f"{name}: background {np.median(scale):.3f} times the model's (SDSS sky) in "
              f"the median, from {scale.min():.3f} to {scale.max():.3f}; {len(catalog)} "
              f"stars in {seconds:.1f} s (estimate included)")
        catalogs[name] = catalog
        r = catalog["mag_r"].value
        counts[name] = (annulus_counts(catalog, centre, r < args.bright),
                        annulus_counts(catalog, centre, (r > 21.5) & (r < 22.5)))
        if name == args.models[0]:
            first_image = image
    if args.psf != "kl":     # photutils' PSF photometry takes one PSF: the frame's centre's
        kl = load_sdss_frame(2583, 2, 136, ("r", "i"), psf="kl").meta["psf"]
        first_image = with_changes(first_image, meta=dict(first_image.meta, psf=kl))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        photutils = daophot_catalog(first_image, band="r")
    print(f"photutils (DAOStarFinder + iterative PSF photometry, r, background of "
          f"{args.models[0]}): {len(photutils)} stars in {time.perf_counter() - started:.1f} s")
    bright = annulus_counts(photutils, centre, photutils["mag_r"].value < args.bright)

    print(f"\nstars with r < {args.bright} by distance from M2's centre (x {centre[0]:.0f}, "
          f"y {centre[1]:.0f}); 'faint': 21.5 < r < 22.5 per 1000 pixels")
    line = f"{'radius px':>11} {'pixels':>8} {'photutils':>9}"
    for name in args.models:
        line += f" | {name[-18:]:>18} {'ratio':>6} {'faint':>6}"
    print(line)
    for a, (low, high) in enumerate(zip(EDGES[:-1], EDGES[1:])):
        if area[a] == 0:
            continue
        line = f"{low:>5}-{high:<5} {area[a]:8d} {bright[a]:9d}"
        for name in args.models:
            ours, faint = counts[name][0][a], counts[name][1][a]
            ratio = f"{ours / bright[a]:6.3f}" if bright[a] else f"{'-':>6}"
            line += f" | {ours:18d} {ratio} {1000 * faint / area[a]:6.2f}"
        print(line)
    plot_cmd(catalogs[args.models[0]], centre, args)


def annulus_counts(catalog, centre, keep):
    """Number of ``keep`` stars of ``catalog`` in each annulus around ``centre``."""
    radius = np.hypot(np.asarray(catalog["x_fit"]) - centre[0],
                      np.asarray(catalog["y_fit"]) - centre[1])[keep]
    return np.histogram(radius, bins=EDGES)[0]


def plot_cmd(catalog, centre, args):
    confident = (catalog["mag_r_err"].value < args.max_mag_err) & \
        (catalog["mag_i_err"].value < args.max_mag_err)
    outskirts = np.hypot(np.asarray(catalog["x_fit"]) - centre[0],
                         np.asarray(catalog["y_fit"]) - centre[1]) > args.outskirts
    print(f"{args.models[0]}: {int(confident.sum())} stars with magnitude errors below "
          f"{args.max_mag_err} in r and i; {int(outskirts.sum())} beyond {args.outskirts:g} px")
    r = catalog["mag_r"].value
    color = r - catalog["mag_i"].value
    figure, axes = plt.subplots(1, 3, figsize=(13, 5), sharex=True, sharey=True)
    for ax, keep, title in ((axes[0], np.ones(len(r), bool), "all stars of the modal catalog"),
                            (axes[1], confident, f"mag errors < {args.max_mag_err}"),
                            (axes[2], outskirts, f"beyond {args.outskirts:g} px of the centre")):
        ax.scatter(color[keep], r[keep], s=1, alpha=0.4, color="k")
        ax.set_title(f"{title} ({int(keep.sum())})")
        ax.set_xlabel("r - i (mag)")
    axes[0].set_ylabel("r (mag)")
    axes[0].set_xlim(-1, 1.5)
    axes[0].set_ylim(23.5, min(14.0, np.floor(2 * np.nanmin(r)) / 2))
    figure.suptitle(f"M2, SDSS run 2583 camcol 2 field 136, StarNet ({args.models[0]})")
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
