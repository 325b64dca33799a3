"""Saturated stars of the real M2 frame: does the catalog flag them?

The whole SDSS frame of M2 (run 2583, camcol 2, field 136, r and i) with the fpM masks
(SATUR, INTERP, CR) and the KL PSF over the frame, catalogued by a PSF-reading model
(default call, background fitted). DAOStarFinder's r peaks at or above ``--peak``
electrons (sky included) are the candidates; for each the table says whether the fpM
marks a saturated pixel within 3 px, and how far the nearest star flagged
``saturated`` lies. A model that reads the prior is told an upper flux of ``--f-max``
(default: the model's prior).

A saturated core is clipped: its brightest pixel holds less light than the star's
unsaturated wings predict. The core test fits the frame's PSF (photutils'
`~photutils.psf.PSFPhotometry`, 5 x 5 pixels, the brightest pixel masked) to each
candidate and to the control stars whose peaks lie between ``--control`` and
``--peak`` e- with no fpM saturated pixel near, and divides the brightest pixel by
the fit's prediction. Crowding and PSF errors move the ratio too, so each candidate is
compared with its 15 nearest controls (the same crowding): the column ``rank`` is the
fraction of them with a lower ratio (a clipped core sits at 0).

Run::

    python benchmarks/bench_frame_saturation.py --model sdss
"""

import argparse
import time

import numpy as np
from astropy.table import QTable
from photutils.detection import DAOStarFinder
from photutils.psf import PSFPhotometry

from starnet import StarNetDeblender
from starnet.catalogs import decode_flags
from starnet.datasets import load_sdss_frame


def core_ratios(data, background, psf, xs, ys):
    """The brightest pixel near each star over the PSF's prediction of it from the 5 x 5
    pixels around it (that pixel masked): about 1 for an unclipped core, below 1 for a
    saturated one."""
    rows, cols = np.round(ys).astype(int), np.round(xs).astype(int)
    window = np.stack([data[rows + dr, cols + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)])
    top = window.argmax(0)
    top_rows, top_cols = rows + top // 3 - 1, cols + top % 3 - 1
    mask = np.zeros(data.shape, dtype=bool)
    mask[top_rows, top_cols] = True
    stars = QTable({"x": xs, "y": ys, "flux": 10.0 * (data - background)[top_rows, top_cols]})
    fitted = PSFPhotometry(psf, (5, 5))(data - background, mask=mask, init_params=stars,
                                        error=np.sqrt(np.maximum(data, 1.0)))
    predicted = [psf.evaluate(np.array([c]), np.array([r]), flux, x, y) for c, r, flux, x, y in zip(
        top_cols, top_rows, fitted["flux_fit"], fitted["x_fit"], fitted["y_fit"])]
    return (data - background)[top_rows, top_cols] / np.ravel(predicted)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss")
    parser.add_argument("--peak", type=float, default=205000.0)
    parser.add_argument("--control", type=float, default=100000.0,
                        help="the lowest peak of the core test's control stars, e-")
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
    peaks = np.asarray(found["peak"]) + sky[rows, cols]
    any_satur = satur.any(0)
    near = np.array([any_satur[max(r_ - 3, 0):r_ + 4, max(c_ - 3, 0):c_ + 4].any()
                     for r_, c_ in zip(rows, cols)])
    inside = (rows >= 3) & (rows < r.shape[0] - 3) & (cols >= 3) & (cols < r.shape[1] - 3)
    candidates = np.flatnonzero((peaks >= args.peak) & inside)
    controls = np.flatnonzero((peaks >= args.control) & (peaks < args.peak) & ~near & inside)
    tested = np.concatenate([candidates, controls])
    ratios = core_ratios(r, sky, frame.meta["psf"][0], xs[tested], ys[tested])
    ratio, control_ratio = ratios[:len(candidates)], ratios[len(candidates):]
    print(f"core test: {len(controls)} controls (peaks {args.control:.0f} to {args.peak:.0f} "
          f"e-, no fpM SATUR within 3 px), brightest pixel / PSF prediction percentiles "
          f"5/50/95: {np.round(np.percentile(control_ratio, [5, 50, 95]), 3).tolist()}")

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
    marked = hit = clipped = 0
    print(f"{'x':>6} {'y':>6} {'peak e-':>9} {'fpM SATUR':>9} {'flagged star, px':>16} "
          f"{'core ratio':>10} {'rank':>5}")
    for j, k in enumerate(candidates):
        distance = np.hypot(fx - xs[k], fy - ys[k]).min() if len(fx) else np.inf
        nearest = np.argsort(np.hypot(xs[controls] - xs[k], ys[controls] - ys[k]))[:15]
        rank = np.mean(control_ratio[nearest] < ratio[j])
        marked += near[k]
        hit += near[k] and distance < 2.0
        clipped += not near[k] and rank == 0
        print(f"{xs[k]:6.0f} {ys[k]:6.0f} {peaks[k]:9.0f} {'yes' if near[k] else 'no':>9} "
              f"{distance:16.1f} {ratio[j]:10.3f} {rank:5.2f}")
    print(f"{len(candidates)} peaks at or above {args.peak:.0f} e-; the fpM marks {marked} "
          f"of them saturated; a flagged star lies within 2 px of {hit} of those; of the "
          f"{len(candidates) - marked} others, {clipped} have a core ratio below all 15 of "
          f"their nearest controls")


if __name__ == "__main__":
    main()
