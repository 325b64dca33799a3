"""Which PSF does the data have? Candidate PSFs fitted to isolated stars of the M2 frame.

Uses the bundled whole SDSS frame of M2 (run 2583, camcol 2, field 136; r and i in
electrons from ``load_sdss_frame``, the i band resampled onto the r pixels as StarNet
sees it, and also the native i frame). Isolated, bright, unsaturated stars away from
the cluster core are fitted (flux, x, y and a constant local sky, weighted by the
Poisson variance, within 10 pixels of the star) with each candidate PSF. (Bilinear
resampling averages neighbouring i pixels: the variance of the resampled i band is the
Poisson variance times the sum of the squared weights, median 0.63 for these stars; the fits of
that band use it.) The candidates:

- ``powerlaw``: the power law of psField HDU 6 (the PSF of the bundled model);
- ``kl``: SDSS's KL PSF (psField HDUs 1-5) at the star's position in its band's frame;
- ``kl+resample`` (resampled i only): the KL PSF blurred by the bilinear resampling
  by which ``load_sdss_frame`` puts the i frame onto the r pixels
  (`starnet.datasets.sdss.resampled_psf`, what ``load_sdss_frame(psf='kl')`` gives);
- ``epsf``: an empirical PSF built from the frame's own stars with photutils'
  ``EPSFBuilder``, two-fold: built on one half of the stars and evaluated on the
  other half, and the other way round, so that no star is fitted with an ePSF it
  helped build.

For each band and PSF it reports the stacked fraction of the fitted flux in the core
(r < 1.5 px) and in the wings (3 < r < 8 px) of the data and of the model, chi^2 per
pixel (median over stars, and over all pixels), and the fitted flux relative to the
KL fit; ``--output FIG.png`` draws the stacked radial profiles (data and each PSF) and
the residuals, for r and i. Isolated means: no other detection (DAOStarFinder, 5
sigma, in r and in the resampled i) brighter than 1 % of the star within 10 pixels,
nor brighter than 20 % of it within 20 pixels; point sources by their concentration
(flux within 2 px over flux within 6 px within 0.1 of the stars' median, in r and i),
which leaves out galaxies: two of them would otherwise dominate the stacked wings. Run::

    python benchmarks/psf_diagnostic.py --output psf_diagnostic.png
"""

import os

# The work here is serial; OpenMP threads (torch is imported with starnet) only fight over
# the cores, which made EPSFBuilder 80x slower on a 2-core machine that was also training.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from importlib.resources import files  # noqa: E402

import numpy as np  # noqa: E402
from astropy.nddata import NDData  # noqa: E402
from astropy.table import Table  # noqa: E402
from photutils.detection import DAOStarFinder  # noqa: E402
from photutils.psf import EPSFBuilder, ImagePSF, extract_stars  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from starnet.datasets import load_sdss_frame  # noqa: E402
from starnet.datasets.sdss import resampled_psf  # noqa: E402
from starnet.psf import PowerLawPSF, kl_psf_from_psfield, pixel_stamps  # noqa: E402

FIELD = (2583, 2, 136)
PSFIELD = files("starnet") / "datasets" / "data" / "sdss" / "psField-002583-2-0136.fit"
M2_CENTRE = (323.36258, -0.82325)  # RA, Dec of NGC 7089 (deg)
FIT_RADIUS = 10  # pixels: the fit and chi^2 use the pixels within this radius
HALF = FIT_RADIUS  # the fit stamps are (2 HALF + 1) pixels wide
EPSF_SIZE = 25
CORE, WINGS = 1.5, (3.0, 8.0)
BINS = np.arange(0.0, FIT_RADIUS + 0.5, 0.5)
SATURATION_DN = 25000  # peak counts (sky included), well below SDSS saturation


def detect(image, sky):
    """DAOStarFinder at 5 sigma (Poisson noise of the median sky) on a sky-subtracted band."""
    noise = np.sqrt(np.median(sky))
    table = DAOStarFinder(threshold=5 * noise, fwhm=2.5)(image)
    return (np.asarray(table["x_centroid"], float), np.asarray(table["y_centroid"], float),
            np.asarray(table["flux"], float))


def isolated(x, y, flux, others):
    """Stars with no detection of ``others`` brighter than 1 % within 10 px or 20 % within 20 px."""
    ox, oy, oflux = others
    tree = cKDTree(np.column_stack([ox, oy]))
    keep = np.ones(x.size, bool)
    for k, neighbours in enumerate(tree.query_ball_point(np.column_stack([x, y]), 20.0)):
        neighbours = np.asarray(neighbours, int)
        dist = np.hypot(ox[neighbours] - x[k], oy[neighbours] - y[k])
        other = dist > 1.5  # the star itself
        keep[k] = not np.any(other & (((dist < 10) & (oflux[neighbours] > 0.01 * flux[k]))
                                      | (oflux[neighbours] > 0.2 * flux[k])))
    return keep


def select_stars(frame, *, min_flux, core_radius):
    """Indices-free selection: (x, y, flux) of isolated bright unsaturated stars (r pixels)."""
    sub = frame.data - frame.meta["background"]
    detections = [detect(sub[b], frame.meta["background"][b]) for b in range(2)]
    x, y, flux = detections[0]
    cx, cy = frame.wcs.world_to_pixel_values(*M2_CENTRE)
    rows, cols = sub.shape[1:]
    margin = EPSF_SIZE // 2 + 12  # room for the ePSF sky ring, also in the native i frame
    keep = ((flux > min_flux) & (np.hypot(x - cx, y - cy) > core_radius)
            & (x > margin) & (x < cols - 1 - margin) & (y > margin) & (y < rows - 1 - margin))
    keep &= isolated(x, y, flux, detections[0]) & isolated(x, y, flux, detections[1])
    x, y, flux = x[keep], y[keep], flux[keep]
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    # unsaturated (peak counts with the sky) in both bands, and no masked pixel
    for b in range(2):
        gain = frame.meta["gain"][b]
        peak = np.array([frame.data[b, j - 1:j + 2, i - 1:i + 2].max() for i, j in zip(ix, iy)])
        good = peak / gain < SATURATION_DN
        good &= np.array([not frame.mask[b, j - HALF:j + HALF + 1, i - HALF:i + HALF + 1].any()
                          for i, j in zip(ix, iy)])
        x, y, flux, ix, iy = x[good], y[good], flux[good], ix[good], iy[good]
    # point sources: the concentration (flux within 2 px over flux within 6 px, local sky
    # from the median at 13-17 px) within 0.1 of the median of the stars (r: 0.64, with a
    # scatter of 0.01-0.04) in both bands; this removes galaxies and blends
    offsets = np.arange(-17, 18, dtype=float)
    radius = np.hypot(offsets[None, :], offsets[:, None])
    ring = (radius > 13) & (radius < 17)
    point = np.ones(x.size, bool)
    for b in range(2):
        concentration = np.empty(x.size)
        for k, (i, j) in enumerate(zip(ix, iy)):
            stamp = sub[b, j - 17:j + 18, i - 17:i + 18]
            stamp = stamp - np.median(stamp[ring])
            concentration[k] = stamp[radius < 2].sum() / stamp[radius < 6].sum()
        point &= np.abs(concentration - np.median(concentration)) < 0.1
    x, y, flux = x[point], y[point], flux[point]
    return x, y, flux, (float(cx), float(cy)), int((~point).sum())


def cutouts(data, variance_data, x, y, half):
    """Stamps (n, 2 half + 1, 2 half + 1) centred on the nearest pixels, and those pixels."""
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    sl = [(slice(j - half, j + half + 1), slice(i - half, i + half + 1)) for i, j in zip(ix, iy)]
    return (np.stack([data[s] for s in sl]).astype(float),
            np.stack([np.maximum(variance_data[s], 1.0) for s in sl]).astype(float), ix, iy)


class Fitter:
    """Weighted least-squares fit of flux, position and a constant sky on a stamp."""

    def __init__(self):
        offsets = np.arange(-HALF, HALF + 1, dtype=float)
        self.r_pix = np.hypot(offsets[None, :], offsets[:, None])
        self.mask = self.r_pix <= FIT_RADIUS

    def _solve(self, stamp, weight, models):
        """Best flux, sky and chi^2 for each model stamp (n, S, S)."""
        w = weight[self.mask]
        d = stamp[self.mask]
        m = models[:, self.mask]
        # normal equations of [model, 1]
        smm, sm1, s11 = (w * m * m).sum(1), (w * m).sum(1), w.sum()
        smd, s1d = (w * m * d).sum(1), (w * d).sum()
        det = smm * s11 - sm1 ** 2
        flux = (s11 * smd - sm1 * s1d) / det
        sky = (smm * s1d - sm1 * smd) / det
        chi2 = (w * (d - flux[:, None] * m - sky[:, None]) ** 2).sum(1)
        return flux, sky, chi2

    def fit(self, stamp, variance, psf, dx0, dy0):
        """(flux, sky, dx, dy, chi2, model) with ``model`` the unit-flux stamp at (dx, dy)."""
        weight = 1.0 / variance
        centre = np.array([dx0, dy0])
        for step, n in ((0.2, 4), (0.05, 2)):
            grid = np.arange(-n, n + 1) * step
            gx, gy = np.meshgrid(centre[0] + grid, centre[1] + grid)
            models = pixel_stamps(psf, 2 * HALF + 1, gx.ravel(), gy.ravel())
            chi2 = self._solve(stamp, weight, models)[2].reshape(gx.shape)
            j, i = np.unravel_index(np.argmin(chi2), chi2.shape)
            j, i = np.clip(j, 1, 2 * n - 1), np.clip(i, 1, 2 * n - 1)
            centre = np.array([gx[j, i], gy[j, i]])
        # a parabola through the 3 x 3 chi^2 around the best point of the fine grid
        c = chi2[j - 1:j + 2, i - 1:i + 2]
        ddx, ddy = c[1, 2] + c[1, 0] - 2 * c[1, 1], c[2, 1] + c[0, 1] - 2 * c[1, 1]
        if ddx > 0:
            centre[0] -= step * 0.5 * (c[1, 2] - c[1, 0]) / ddx * (abs(c[1, 2] - c[1, 0]) < 2 * ddx)
        if ddy > 0:
            centre[1] -= step * 0.5 * (c[2, 1] - c[0, 1]) / ddy * (abs(c[2, 1] - c[0, 1]) < 2 * ddy)
        model = pixel_stamps(psf, 2 * HALF + 1, [centre[0]], [centre[1]])
        flux, sky, chi2 = self._solve(stamp, weight, model)
        return flux[0], sky[0], centre[0], centre[1], chi2[0], model[0]


def build_epsf(sub, x, y, *, oversampling):
    """photutils ePSF from stars at (x, y), each with its local sky (median at 13-17 px) removed."""
    data = np.array(sub, dtype=float)
    half = EPSF_SIZE // 2 + 2
    offsets = np.arange(-half - 3, half + 4)
    ring = ((np.hypot(offsets[None, :], offsets[:, None]) > 13)
            & (np.hypot(offsets[None, :], offsets[:, None]) < 17))
    for i, j in zip(np.rint(x).astype(int), np.rint(y).astype(int)):
        box = (slice(j - half - 3, j + half + 4), slice(i - half - 3, i + half + 4))
        data[box] -= np.median(data[box][ring])
    stars = extract_stars(NDData(data), Table({"x": x, "y": y}), size=EPSF_SIZE)
    builder = EPSFBuilder(oversampling=oversampling, maxiters=8, progress_bar=False)
    epsf, _ = builder(stars)
    return ImagePSF(np.asarray(epsf.data, float), oversampling=epsf.oversampling)


def band_sets(frame, native_i, x, y):
    """Per band: name, sky-subtracted image, variance image, star positions, psField band."""
    sub = frame.data - frame.meta["background"]
    ra, dec = frame.wcs.pixel_to_world_values(x, y)
    xi, yi = native_i.wcs.world_to_pixel_values(ra, dec)
    return [("r", sub[0], frame.data[0], x, y, "r", (y, x)),
            ("i", sub[1], frame.data[1], x, y, "i", (yi, xi)),
            ("i native", native_i.data[0] - native_i.meta["background"][0],
             native_i.data[0], xi, yi, "i", (yi, xi))]


def analyse(name, sub, variance_data, x, y, band, kl_pos, *, halves, oversampling, fitter,
            resample_fractions=None):
    """Fit every star with every candidate PSF; return per-PSF stacked results."""
    stamps, variances, ix, iy = cutouts(sub, variance_data, x, y, HALF)
    dx0, dy0 = x - ix, y - iy
    power_law = PowerLawPSF.from_psfield(PSFIELD, band=band)
    epsfs = [build_epsf(sub, x[h], y[h], oversampling=oversampling) for h in halves]
    candidates = {"powerlaw": lambda k: power_law,
                  "kl": lambda k: kl_psf_from_psfield(PSFIELD, band=band, row=kl_pos[0][k],
                                                      col=kl_pos[1][k])}
    if resample_fractions is not None:
        fx, fy = resample_fractions
        candidates["kl+resample"] = lambda k: resampled_psf(
            kl_psf_from_psfield(PSFIELD, band=band, row=kl_pos[0][k], col=kl_pos[1][k]),
            fx[k], fy[k])
    # the ePSF built on the other half
    other = np.empty(x.size, int)
    other[halves[0]], other[halves[1]] = 1, 0
    candidates["epsf"] = lambda k: epsfs[other[k]]
    results = {}
    for psf_name, get_psf in candidates.items():
        fits_ = [fitter.fit(stamps[k], variances[k], get_psf(k), dx0[k], dy0[k])
                 for k in range(x.size)]
        flux = np.array([f[0] for f in fits_])
        sky = np.array([f[1] for f in fits_])
        centre = np.array([[f[2], f[3]] for f in fits_])
        chi2 = np.array([f[4] for f in fits_])
        models = np.stack([f[5] for f in fits_]) * flux[:, None, None]
        data = stamps - sky[:, None, None]
        offsets = np.arange(-HALF, HALF + 1, dtype=float)
        r = np.hypot(offsets[None, None, :] - centre[:, 0, None, None],
                     offsets[None, :, None] - centre[:, 1, None, None])
        inside = r <= FIT_RADIUS
        core, wings = r < CORE, (r > WINGS[0]) & (r < WINGS[1])
        total = flux.sum()
        which = np.digitize(r, BINS) - 1
        n_bins = BINS.size - 1
        profile = {}
        for key, values in (("data", data), ("model", models), ("residual", data - models)):
            sums = np.bincount(which[inside], weights=values[inside], minlength=n_bins)[:n_bins]
            # per bin: sum of values / sum of (flux x pixels): surface brightness / flux
            weights = np.bincount(which[inside], weights=np.broadcast_to(
                flux[:, None, None], r.shape)[inside], minlength=n_bins)[:n_bins]
            profile[key] = sums / np.where(weights > 0, weights, np.nan)
        results[psf_name] = {
            "flux": flux,
            "core_data": (data * core).sum() / total, "core_model": (models * core).sum() / total,
            "wings_data": (data * wings).sum() / total,
            "wings_model": (models * wings).sum() / total,
            "chi2_median": float(np.median(chi2 / fitter.mask.sum())),
            "chi2_all": float(chi2.sum() / (fitter.mask.sum() * x.size)),
            "profile": profile}
    return results


def table_of(all_results, n_stars):
    rows = []
    for band, results in all_results.items():
        kl_flux = results["kl"]["flux"]
        for psf_name, res in results.items():
            rows.append((band, psf_name, n_stars, res["core_data"], res["core_model"],
                         res["wings_data"], res["wings_model"], res["chi2_median"],
                         res["chi2_all"], float(np.median(res["flux"] / kl_flux))))
    table = Table(rows=rows, names=("band", "psf", "n_stars", "core_data", "core_model",
                                    "wings_data", "wings_model", "chi2_pix_median",
                                    "chi2_pix_all", "flux_vs_kl"))
    for col in ("core_data", "core_model", "wings_data", "wings_model", "flux_vs_kl"):
        table[col].format = ".4f"
    for col in ("chi2_pix_median", "chi2_pix_all"):
        table[col].format = ".2f"
    return table


def plot(all_results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = 0.5 * (BINS[1:] + BINS[:-1])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True,
                             gridspec_kw={"height_ratios": [2, 1]})
    for column, band in enumerate(("r", "i")):
        results = all_results[band]
        top, bottom = axes[0, column], axes[1, column]
        top.semilogy(centres, np.abs(results["kl"]["profile"]["data"]), "k.", ms=8,
                     label="data (KL fit)")
        for psf_name, res in results.items():
            line, = top.semilogy(centres, np.abs(res["profile"]["model"]), "-", label=psf_name)
            bottom.plot(centres, res["profile"]["residual"], "-", color=line.get_color(),
                        label=psf_name)
        bottom.axhline(0, color="k", lw=0.5)
        top.set_title(f"{band} band" + (" (resampled onto r, as StarNet sees it)"
                                        if band == "i" else ""))
        top.set_ylabel("surface brightness / flux (per px)")
        bottom.set_ylabel("(data - model) / flux")
        bottom.set_xlabel("radius (pixels)")
        top.legend(fontsize=8)
    fig.suptitle("Stacked radial profiles of isolated stars, SDSS 2583-2-136 (M2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", metavar="FIG.png", help="write the figure here")
    parser.add_argument("--min-flux", type=float, default=1e4,
                        help="smallest r flux (electrons, DAOStarFinder) of the stars")
    parser.add_argument("--core-radius", type=float, default=700.0,
                        help="stars closer than this to the centre of M2 are left out (pixels)")
    parser.add_argument("--oversampling", type=int, default=2, help="of the ePSF")
    parser.add_argument("--seed", type=int, default=0, help="of the split into two halves")
    args = parser.parse_args(argv)
    started = time.time()
    frame = load_sdss_frame(*FIELD, ("r", "i"))
    native_i = load_sdss_frame(*FIELD, ("i",))
    x, y, flux, centre, n_extended = select_stars(frame, min_flux=args.min_flux,
                                                  core_radius=args.core_radius)
    # halves of similar fluxes: pairs in flux order, one star of each pair drawn at random
    order = np.argsort(flux)
    rng = np.random.default_rng(args.seed)
    first = np.zeros(x.size, bool)
    for pair in range(0, x.size - 1, 2):
        first[order[pair + rng.integers(2)]] = True
    halves = (np.flatnonzero(first), np.flatnonzero(~first))
    print(f"M2 centre at x={centre[0]:.0f}, y={centre[1]:.0f} (column, row); {x.size} "
          f"isolated stars beyond {args.core_radius:.0f} px, r flux "
          f"{flux.min():.3g}..{flux.max():.3g} e- (median {np.median(flux):.3g}); ePSF halves "
          f"{halves[0].size} + {halves[1].size}; {n_extended} extended sources left out")
    fitter = Fitter()
    all_results = {}
    for name, sub, variance_data, bx, by, band, kl_pos in band_sets(frame, native_i, x, y):
        fractions = None
        if name == "i":
            # load_sdss_frame interpolates the i frame bilinearly: the r pixels around a
            # star fall at these fractions of the i pixels (the mapping is a translation
            # to 1e-4 px over a stamp); the noise variance shrinks by sum(weights**2)
            fx, fy = (np.mod(kl_pos[1] - x, 1.0), np.mod(kl_pos[0] - y, 1.0))
            fractions = (fx, fy)
            factor = np.median(((1 - fx) ** 2 + fx ** 2) * ((1 - fy) ** 2 + fy ** 2))
            variance_data = variance_data * factor
            print(f"resampled i: fractions of i pixels dx {np.median(fx):.3f}, dy "
                  f"{np.median(fy):.3f}; variance factor {factor:.3f}")
        all_results[name] = analyse(name, sub, variance_data, bx, by, band, kl_pos,
                                    halves=halves, oversampling=args.oversampling,
                                    fitter=fitter, resample_fractions=fractions)
    table = table_of(all_results, x.size)
    table.pprint(max_lines=-1, max_width=-1)
    print("core: fraction of the fitted flux at r < 1.5 px; wings: at 3 < r < 8 px "
          "(data: minus the fitted sky); chi2 per pixel within 10 px; flux_vs_kl: median "
          "fitted flux over the KL fit's")
    if args.output:
        plot(all_results, args.output)
        print(f"figure written to {args.output}")
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
