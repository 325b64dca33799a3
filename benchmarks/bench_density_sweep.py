"""Count calibration and F1 across star densities, on fields rendered by photutils.

Fields are drawn from the M2 prior (Pareto index 0.5 from 1000 e- to ``--f-max``, 1e6
by default, r and i) at each density of ``--densities`` (stars per pixel), with stars
in a 6-pixel margin too, rendered by photutils' ``make_model_image`` (not by starnet's
renderer) through ``--psf`` over the M2 sky with Poisson noise, and catalogued with the
background given.
For each density the table gives the fields, the mean true count, the count bias of the
posterior mean (sum over fields of the estimate minus the truth, over the truth), the
fraction of fields whose 90 % count interval holds the truth (with its binomial
standard error) and the one-to-one F1 of the modal catalog (stars above 1000 e-).
Images are 100 x 100 where that holds at least 300 stars, else 200 x 200.

``--psf``: ``m2`` (the field's KL PSF, as `starnet.datasets.load_m2` gives it), ``field
N`` (the photoField power law of field N of run 2583 camcol 2, i resampled as the
frames are) or ``moffat`` (alpha 3 in photutils' sense of the power index, FWHM 3.5 px,
both bands). ``--told-scale`` tells the model a PSF whose FWHM is that many times the
rendering one (a PSF-reading model only). A model that reads the prior is told the
fields' prior (its upper flux and Pareto index), or an upper flux of ``--told-f-max``.

``--pixels``: photutils renders through the PSF integrated over each pixel
(``integrated``, the default: a `~photutils.psf.ImagePSF` of the pixel-integrated PSF
sampled every fifth of a pixel, `integrated_psf`), as a detector records a star and as
starnet renders and describes a PSF; or through photutils' own evaluation of a
point-value model (``MoffatPSF``, starnet's ``PowerLawPSF``) at pixel centres
(``sampled``), whose peak pixel is 4 % (the Moffat) to 11 % (a power law) higher. The
two are the same for the pixel-integrated KL PSF of ``--psf m2``.

``--grid-consensus``: also the F1 of the catalog that the shifted tile grids agree on
(``grid_consensus=True`` of `StarNetDeblender.__call__`), on the same fields.

``--star-draws K``: for the first ``--star-fields`` fields of each density, also ``K``
whole catalogs are drawn (`StarNetDeblender.sample`) and every true star inside the
image gets the randomised PITs of `starnet.calibration.star_intervals` (matching radius
1 pixel; a draw without a counterpart gives the star flux 0, so faint stars that most
draws leave out are counted, not dropped). A second table gives, by true r magnitude
(M2 zero point), the stars, their mean detection probability and the fraction whose
x, y and r-flux PITs lie in the central 90 % (a star no draw finds holds neither x nor
y).

``--block-sizes S ...``: the count posterior is also taken for the square blocks of S x
S pixels that partition each image (`StarNetDeblender.count_posterior` with regions),
and a third table gives, per density and block size, the blocks' bias, the spread of
their count errors over the spread the posterior claims (``dispersion``: the standard
deviation over blocks of the error, true count minus posterior mean, after the mean
error is removed, over the root mean posterior variance; 1 for a calibrated
posterior) and the 90 % coverage. Tiles that are independent in the variational
posterior but whose errors are not (a density misread over a region wider than a tile)
show as a dispersion that grows with the block.

``--bright-flux F``: for each field, the error of its count (posterior mean minus true
count) is set against the chance excess of stars brighter than ``F`` e- (their true
number less its mean over the density's fields). A fourth table gives per density the
dispersion of the field counts (as above), the correlation of the errors with the
excess, the slope (extra stars counted per extra bright star, beside the bright star
itself) and the dispersion left once that linear dependence is removed. A network that
reads the density from the stars it sees counts more faint stars where chance put more
bright ones; a posterior of independent tiles leaves that shared uncertainty out of
its interval, and the dispersion it explains is the part that a posterior over the
local density would restore.

``--tile-errors``: a last table, from the tiles' own count probabilities (without the
density spread), per density: the mean squared error of a block's posterior mean count
(a bias included) over the variance that independent tiles claim for it, for blocks of
1, 2, 5, 10 and 25 tiles a side, and the mean product of the errors of neighbouring
tiles over a tile's claimed variance (`starnet.calibration.tile_count_errors`;
independent tiles only). Where a star near a tile boundary is claimed in part by both
tiles, their errors anti-correlate and the claimed variance of a block exceeds its
error's.

Run::

    python benchmarks/bench_density_sweep.py --model sdss-m2 --n-fields 100
"""

import argparse
import time
from importlib.resources import files

import numpy as np
import torch
from astropy.nddata import NDData
from astropy.table import QTable, vstack
from photutils.datasets import make_model_image

from starnet import StarFieldPrior, StarNetDeblender, match_catalogs
from starnet.calibration import (count_interval, pit_coverage, star_intervals,
                                 tile_count_errors)
from starnet.datasets import M2_NELEC_PER_NMGY, load_m2
from starnet.devices import PRECISIONS, as_precision
from starnet.inference import encode

SKY = (686.0, 1123.0)
MAG_EDGES = (-np.inf, 19, 20, 21, 21.5, 22, np.inf)


def render_psfs(name):
    """The (r, i) PSFs that fields are rendered with."""
    if name == "m2":
        return list(load_m2()[0].meta["psf"])
    if name == "moffat":
        from photutils.psf import MoffatPSF
        beta = 3.0
        alpha = 3.5 / (2 * np.sqrt(2 ** (1 / beta) - 1))
        return [MoffatPSF(alpha=alpha, beta=beta)] * 2
    if name.startswith("field"):
        from starnet.datasets.sdss import resampled_psf
        from starnet.psf_family import photofield_psfs
        field = int(name.split()[1])
        path = files("starnet") / "datasets" / "data" / "sdss" / "photoField-002583-2.fits"
        r, i = photofield_psfs(path, ("r", "i"), fields=[field])[field]
        return [r, resampled_psf(i, 0.42, 0.28)]
    raise ValueError(f"unknown --psf {name!r}")


def integrated_psf(psf, *, size=25, oversampling=5):
    """A photutils `~photutils.psf.ImagePSF` whose values at pixel centres are those
    of ``psf`` integrated over the pixel (`starnet.psf.pixel_stamps`), for star
    positions every ``1 / oversampling`` pixel."""
    from photutils.psf import ImagePSF
    from starnet.psf import pixel_stamps
    half = oversampling // 2
    data = np.zeros((size * oversampling, size * oversampling))
    for row in range(-half, half + 1):
        for col in range(-half, half + 1):
            stamp = pixel_stamps(psf, size, [-col / oversampling], [-row / oversampling])[0]
            data[row + half::oversampling, col + half::oversampling] = stamp
    return ImagePSF(data, oversampling=oversampling)


def field(prior, density, size, psfs, rng):
    """One photutils-rendered field: (NDData, truth inside the image)."""
    margin = 6
    extent = size + 2 * margin
    n = rng.poisson(density * extent ** 2)
    x = rng.uniform(-0.5 - margin, size - 0.5 + margin, n)
    y = rng.uniform(-0.5 - margin, size - 0.5 + margin, n)
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    fluxes = prior.sample_fluxes(n, generator=generator).double().numpy()
    data = np.empty((2, size, size))
    for b, psf in enumerate(psfs):
        table = QTable({"x_0": x, "y_0": y, "flux": fluxes[:, b]})
        expected = make_model_image((size, size), psf, table, model_shape=(25, 25)) + SKY[b]
        data[b] = rng.poisson(np.clip(expected, 0, None))
    inside = (x > -0.5) & (x < size - 0.5) & (y > -0.5) & (y < size - 0.5)
    truth = QTable({"x": x[inside], "y": y[inside], "flux_r": fluxes[inside, 0]})
    return data, truth


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.002, 0.01, 0.04, 0.12, 0.2])
    parser.add_argument("--n-fields", type=int, default=100)
    parser.add_argument("--psf", default="m2")
    parser.add_argument("--told-scale", type=float, default=1.0)
    parser.add_argument("--f-max", type=float, default=1e6,
                        help="the fields' brightest flux, e- (default 1e6: the M2 prior)")
    parser.add_argument("--told-f-max", type=float, default=None,
                        help="the upper flux a prior-reading model is told (default: "
                        "--f-max)")
    parser.add_argument("--pixels", choices=("integrated", "sampled"), default="integrated")
    parser.add_argument("--star-draws", type=int, default=0,
                        help="catalog draws per field for the per-star intervals (0: none)")
    parser.add_argument("--star-fields", type=int, default=20,
                        help="fields per density that get --star-draws")
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[],
                        help="sides in pixels of square blocks whose counts are checked "
                        "too (each divides the image side and is a multiple of the tile)")
    parser.add_argument("--bright-flux", type=float, default=None, metavar="F",
                        help="set each field's count error against its chance excess of "
                             "stars brighter than F e-")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="of the network (default float32; starnet.devices)")
    parser.add_argument("--grid-consensus", action="store_true",
                        help="also the F1 of the catalog the shifted tile grids agree on")
    parser.add_argument("--tile-errors", action="store_true",
                        help="also the table of how tiles' count errors add up over blocks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    deblender = StarNetDeblender.from_name_or_path(args.model)
    if args.tile_errors and deblender.encoder.n_colors != 1:
        parser.error("--tile-errors needs a model of independent tiles (this one is a "
                     f"checkerboard of {deblender.encoder.n_colors} colours)")
    psfs = render_psfs(args.psf)
    told = psfs
    if args.told_scale != 1.0:
        from starnet.psf_family import widened_psf
        if args.told_scale < 1:
            raise ValueError("--told-scale below 1 is not supported (a PSF cannot be "
                             "narrowed exactly); render with a wider PSF instead")
        told = [widened_psf(psf, args.told_scale) for psf in psfs]
    if args.psf == "m2":
        told = list(deblender.psfs) if args.told_scale == 1.0 else told
    rng = np.random.default_rng(args.seed)
    rendering = [integrated_psf(psf) for psf in psfs] if args.pixels == "integrated" else psfs
    print(f"model {args.model}; fields rendered by photutils with PSF {args.psf!r} "
          f"({args.pixels})"
          f" (told scale {args.told_scale}); fluxes 1000 to {args.f_max:.0e} e-"
          f"{'' if args.told_f_max is None else f' (told {args.told_f_max:.0e})'}; background "
          f"given; {args.n_fields} fields per density"
          + (f"; network in {args.precision}" if args.precision else ""))
    print(f"{'stars/px':>8} {'size':>5} {'fields':>6} {'true N':>8} {'bias':>7} "
          f"{'90% cover':>10} {'F1':>6} {'s/field':>8}"
          + (f" {'F1 grid consensus':>17}" if args.grid_consensus else ""))
    star_tables, block_rows, bright_rows, tile_tables = {}, [], [], {}
    for density in args.densities:
        prior = StarFieldPrior(mu=density, f_min=1000.0, f_max=args.f_max, alpha=0.5,
                               bands=("r", "i"))
        if deblender.encoder.prior_features:
            deblender.prior = StarFieldPrior(mu=density, f_min=1000.0, alpha=0.5,
                                             f_max=args.told_f_max or args.f_max,
                                             bands=("r", "i"))
        size = 100 if density * 100 * 100 >= 300 else 200
        estimates, truths, covered, f1s, consensus_f1s = [], [], 0, [], []
        started = time.perf_counter()
        for index in range(args.n_fields):
            data, truth = field(prior, density, size, rendering, rng)
            image = NDData(data, unit="electron",
                           meta={"bands": ["r", "i"], "psf": told,
                                 "background": np.array(SKY)})
            catalog = deblender(image, background="given", progress=False,
                                precision=args.precision)
            mean, low, high = (catalog.meta[k] for k in ("n_stars_mean", "n_stars_q05",
                                                         "n_stars_q95"))
            estimates.append(mean)
            truths.append(len(truth))
            covered += low <= len(truth) <= high
            f1s.append(match_catalogs(catalog, truth, band="r").f1)
            if args.grid_consensus:
                consensus = deblender(image, background="given", progress=False,
                                      precision=args.precision, grid_consensus=True)
                consensus_f1s.append(match_catalogs(consensus, truth, band="r").f1)
            if index < args.star_fields and args.star_draws:
                samples = deblender.sample(image, n_samples=args.star_draws, seed=index,
                                           background="given", progress=False,
                                           precision=args.precision)
                intervals = star_intervals(samples, truth, absent_flux=0.0, seed=index)
                flux = np.asarray(truth["flux_r"]) / M2_NELEC_PER_NMGY
                intervals["r"] = 22.5 - 2.5 * np.log10(flux)
                star_tables.setdefault(density, []).append(intervals)
            if args.bright_flux:
                whole = block_counts(deblender, image, truth, size, args.precision)[0]
                n_bright = int(np.sum(np.asarray(truth["flux_r"]) > args.bright_flux))
                bright_rows.append((density,) + whole[:3] + (n_bright,))
            if args.tile_errors:
                tile_tables.setdefault(density, []).append(
                    tile_probs_and_counts(deblender, image, truth, args.precision))
            for block in args.block_sizes:
                blocks = block_counts(deblender, image, truth, block, args.precision)
                block_rows += [(density, block) + row for row in blocks]
        seconds = (time.perf_counter() - started) / args.n_fields
        n = len(truths)
        bias = (np.sum(estimates) - np.sum(truths)) / np.sum(truths)
        cover = covered / n
        error = np.sqrt(cover * (1 - cover) / n)
        print(f"{density:8.3f} {size:5d} {n:6d} {np.mean(truths):8.1f} {100 * bias:+6.1f}% "
              f"{cover:5.2f}+-{error:.2f} {np.mean(f1s):6.3f} {seconds:8.2f}"
              + (f" {np.mean(consensus_f1s):17.3f}" if consensus_f1s else ""), flush=True)
    if star_tables:
        print_star_coverage(star_tables, args.star_draws)
    if block_rows:
        print_block_calibration(np.array(block_rows))
    if bright_rows:
        print_bright_regression(np.array(bright_rows, dtype=float), args.bright_flux)
    if tile_tables:
        print_tile_errors(tile_tables)


def block_counts(deblender, image, truth, block, precision=None):
    """(true count, posterior mean, posterior variance, covered by the 90 % interval) of
    each ``block`` x ``block``-pixel square of a partition of ``image``."""
    size = image.data.shape[-1]
    if size % block or block % deblender.grid.tile_size:
        raise ValueError(f"a block of {block} pixels does not partition a {size}-pixel image "
                         f"into whole tiles of {deblender.grid.tile_size} pixels")
    n = size // block
    label = np.arange(size) // block
    block_index = label[:, None] * n + label[None, :]          # row-major, as below
    pixel_blocks = block_index[None] == np.arange(n * n)[:, None, None]
    pmfs = deblender.count_posterior(image, region=pixel_blocks, background="given",
                                     progress=False, precision=precision)
    column = np.floor(np.asarray(truth["x"]) + 0.5).astype(int) // block
    row = np.floor(np.asarray(truth["y"]) + 0.5).astype(int) // block
    true = np.bincount(row * n + column, minlength=n * n)
    rows = []
    for pmf, count in zip(pmfs, true):
        k = np.arange(len(pmf))
        mean = float(np.dot(k, pmf))
        low, high, _ = count_interval(pmf, 0.9)
        rows.append((count, mean, float(np.dot((k - mean) ** 2, pmf)), low <= count <= high))
    return rows


def tile_probs_and_counts(deblender, image, truth, precision=None):
    """Each tile's count probabilities (without the density spread) and true count."""
    posterior = encode(deblender.encoder, deblender._prepare(image),
                       dtype=as_precision(precision))
    probs = posterior.count_probs[0].double().numpy()
    tile = deblender.grid.tile_size
    column = np.floor(np.asarray(truth["x"]) + 0.5).astype(int) // tile
    row = np.floor(np.asarray(truth["y"]) + 0.5).astype(int) // tile
    true = np.zeros(probs.shape[:2], dtype=int)
    np.add.at(true, (row, column), 1)
    return probs, true


def print_tile_errors(tables):
    """The tile-error table: per density, error over claimed variance of blocks of tiles,
    and the neighbour covariance."""
    blocks = (1, 2, 5, 10, 25)
    print("\ntiles' count errors (no density spread): mean squared error over claimed "
          "variance of blocks of b x b tiles; neighbours' error covariance over a tile's "
          "variance")
    print(f"{'stars/px':>8} " + " ".join(f"{f'b={b}':>6}" for b in blocks)
          + f" {'side':>6} {'diag':>6}")
    for density, fields in tables.items():
        probs = np.stack([p for p, _ in fields])
        true = np.stack([t for _, t in fields])
        table = tile_count_errors(probs, true, blocks=blocks)
        print(f"{density:8.3f} " + " ".join(f"{r:6.2f}" for r in table["ratio"])
              + f" {table.meta['neighbour_covariance']:+6.2f}"
              f" {table.meta['diagonal_covariance']:+6.2f}", flush=True)


def print_block_calibration(rows):
    """The block table: bias, dispersion and 90 % coverage per density and block size."""
    print("\ncounts of square blocks: error spread over the posterior's (dispersion), "
          "90 % coverage")
    print(f"{'stars/px':>8} {'block':>5} {'blocks':>6} {'true N':>7} {'bias':>7} "
          f"{'dispersion':>10} {'90% cover':>10}")
    for density, block in dict.fromkeys(map(tuple, rows[:, :2])):
        chosen = rows[(rows[:, 0] == density) & (rows[:, 1] == block)]
        true, mean, variance, covered = chosen[:, 2:].T
        error = true - mean
        dispersion = np.std(error, ddof=1) / np.sqrt(np.mean(variance))
        cover = np.mean(covered)
        print(f"{density:8.3f} {int(block):5d} {len(chosen):6d} {np.mean(true):7.1f} "
              f"{100 * (np.sum(mean) - np.sum(true)) / np.sum(true):+6.1f}% "
              f"{dispersion:10.2f} {cover:5.2f}+-{np.sqrt(cover * (1 - cover) / len(chosen)):.2f}",
              flush=True)


def print_bright_regression(rows, flux):
    """The bright-excess table: how much of the field counts' error follows the chance
    excess of bright stars (rows: density, true count, posterior mean, posterior variance,
    true number of stars brighter than ``flux``)."""
    print(f"\nfield count errors against the excess of stars brighter than {flux:g} e-")
    print(f"{'stars/px':>8} {'fields':>6} {'bright':>7} {'dispersion':>10} {'corr':>6} "
          f"{'slope':>6} {'dispersion left':>16}")
    for density in dict.fromkeys(rows[:, 0]):
        true, mean, variance, bright = rows[rows[:, 0] == density, 1:].T
        error = mean - true
        excess = bright - bright.mean()
        slope = np.polyfit(excess, error, 1)[0]
        left = error - slope * excess
        spread = np.sqrt(np.mean(variance))
        print(f"{density:8.3f} {len(true):6d} {bright.mean():7.1f} "
              f"{np.std(error, ddof=1) / spread:10.2f} {np.corrcoef(excess, error)[0, 1]:6.2f} "
              f"{slope:6.2f} {np.std(left, ddof=2) / spread:16.2f}", flush=True)


def print_star_coverage(star_tables, n_draws):
    """The per-star table: 90 % PIT coverage by true r magnitude."""
    print(f"\nper-star 90 % coverage (PIT), every true star of the first fields ({n_draws} "
          "draws each; a draw without the star gives it flux 0)")
    print(f"{'stars/px':>8} {'r':>11} {'stars':>6} {'P(found)':>9} {'x':>6} {'y':>6} "
          f"{'flux_r':>6}")
    for density, tables in star_tables.items():
        table = vstack(tables)
        for low, high in zip(MAG_EDGES[:-1], MAG_EDGES[1:]):
            rows = table[(table["r"] >= low) & (table["r"] < high)]
            label = (f"< {high:g}" if np.isinf(low) else f"> {low:g}" if np.isinf(high)
                     else f"{low:g} - {high:g}")
            if not len(rows):
                continue
            coverage = pit_coverage(rows, (0.9,))
            print(f"{density:8.3f} {label:>11} {len(rows):6d} "
                  f"{np.mean(rows['detection_probability']):9.3f} "
                  + " ".join(f"{coverage[f'pit_{name}'][0]:6.3f}"
                             for name in ("x", "y", "flux_r")), flush=True)


if __name__ == "__main__":
    main()
