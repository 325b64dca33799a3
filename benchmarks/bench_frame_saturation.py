"""Saturated stars of the real M2 frame: does the catalog flag them?

The whole SDSS frame of M2 (run 2583, camcol 2, field 136, r and i) with the fpM masks
(SATUR, INTERP, CR) and the KL PSF over the frame, catalogued by a PSF-reading model
(default call, background fitted). DAOStarFinder's r peaks at or above ``--peak``
electrons (sky included) are the candidates; for each the table says whether the fpM
marks a saturated pixel within 3 px, and how far the nearest star flagged
``saturated`` lies. A model that reads the prior is told an upper flux of ``--f-max``
(default: the model's prior).

Run::

    python benchmarks/bench_frame_saturation.py --model sdss
"""

import argparse
import time

import numpy as np
from photutils.detection import DAOStarFinder

from starnet import StarNetDeblender
from starnet.catalogs import decode_flags
from starnet.datasets import load_sdss_frame


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss")
    parser.add_argument("--peak", type=float, default=205000.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--f-max", type=float, default=None,
                        help="the upper flux told to a model that reads the prior, e-")
    args = parser.parse_args(argv)

    frame = load_sdss_frame(2583, 2, 136, psf="kl-grid",
                            fpm_planes=("SATUR", "INTERP", "CR"))
    r = np.asarray(frame.data[0])
    sky = np.asarray(frame.meta["background"][0])
    satur = np.asarray(frame.meta["saturated"]).reshape(-1, *r.shape)
    print(f"fpM SATUR pixels per band {dict(zip(frame.meta['bands'], satur.sum((1, 2))))}")
    found = DAOStarFinder(fwhm=2.7, threshold=5 * np.sqrt(np.median(sky)))(r - sky)
    xs, ys = np.asarray(found["x_centroid"]), np.asarray(found["y_centroid"])
    cols, rows = np.round(xs).astype(int), np.round(ys).astype(int)
    candidates = np.flatnonzero(np.asarray(found["peak"]) + sky[rows, cols] >= args.peak)

    started = time.perf_counter()
    deblender = StarNetDeblender.from_name_or_path(args.model)
    if args.f_max is not None:
        deblender.prior = deblender.prior.replace(f_max=args.f_max)
    catalog = deblender(frame, progress=False, threads=args.threads)
    seconds = time.perf_counter() - started
    flagged = np.array(["saturated" in names for names in decode_flags(catalog["flags"])])
    fx, fy = np.asarray(catalog["x_fit"])[flagged], np.asarray(catalog["y_fit"])[flagged]
    print(f"model {args.model} (prior f_max {deblender.prior.f_max:.2g}): {len(catalog)} "
          f"stars, N {catalog.meta['n_stars_mean']:.0f} "
          f"({catalog.meta['n_stars_q05']:.0f}, {catalog.meta['n_stars_q95']:.0f}), "
          f"{flagged.sum()} flagged saturated, {seconds:.0f} s")

    flux = np.asarray(catalog["flux_r"].value)
    edges = [3e5, 6e5, 1e6, 2e6, 4e6, np.inf]
    counts = np.histogram(flux, edges)[0]
    print(f"brightest r flux {flux.max():.3g} e-; stars per r flux bin "
          + ", ".join(f"{lo:.0e}-{hi:.0e}: {n}" for lo, hi, n in zip(edges, edges[1:], counts)))
    any_satur = satur.any(0)
    marked = hit = 0
    print(f"{'x':>6} {'y':>6} {'peak e-':>9} {'fpM SATUR':>9} {'flagged star, px':>16}")
    for k in candidates:
        near = any_satur[max(rows[k] - 3, 0):rows[k] + 4, max(cols[k] - 3, 0):cols[k] + 4].any()
        distance = np.hypot(fx - xs[k], fy - ys[k]).min() if len(fx) else np.inf
        marked += near
        hit += near and distance < 2.0
        print(f"{xs[k]:6.0f} {ys[k]:6.0f} {found['peak'][k] + sky[rows[k], cols[k]]:9.0f} "
              f"{'yes' if near else 'no':>9} {distance:16.1f}")
    print(f"{len(candidates)} peaks at or above {args.peak:.0f} e-; the fpM marks {marked} "
          f"of them saturated; a flagged star lies within 2 px of {hit} of those")


if __name__ == "__main__":
    main()
