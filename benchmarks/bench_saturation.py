"""Saturated stars and bad columns: flags, flux limits, counts and fluxes beside masks.

M2-like fields (100 x 100 pixels, r and i, 0.12 stars per pixel from the M2 prior up to
1e6 e-, stars in a 6-pixel margin too) get ``--bright`` stars with fluxes log-uniform
from 2e6 to 1e7 e- (r ~ 13-15, the giants of M2) at random places. They are rendered by
photutils (``make_model_image``, the field's KL PSFs, not starnet's renderer) over the
M2 sky with Poisson noise, then clipped at a full well of ``--level`` e- with charge-
keeping bleed trails along columns (`starnet.defects.saturate`), and ``--bad-columns``
whole columns are spoiled (their values replaced by noise around zero) and masked. The
model is told ``meta['saturation'] = level`` and the mask; the background is given.

Per model the table gives, over all fields:

* ``sat``: the true stars whose own light and the sky reach the level in their central
  pixel (a faint star under a saturated neighbour is not one); ``flagged``: the fraction of them
  with a catalog star within 2 px that carries the ``saturated`` flag; ``q05<=f``: the
  fraction whose nearest flagged star's 5 % flux quantile (a lower limit) is at or below
  the true flux; ``near/ring``: catalog stars within 8 px of saturated stars over the
  number the field's density predicts there (1: no extra stars);
* ``bias`` and ``cover``: the posterior mean count's relative error and the fraction of
  fields whose 90 % interval holds the truth, over the tiles whose central pixel is not
  masked (`~starnet.StarNetDeblender.count_posterior` with that region);
* ``flux near mask`` and ``flux far``: the median of ``log(flux / true flux)`` (as a
  percentage) of matched unsaturated stars above 10^4 e- within 2 px of a bad column,
  and of those farther than 6 px from any masked pixel.

Run::

    python benchmarks/bench_saturation.py --models sdss-m2 sdss --n-fields 20
"""

import argparse
import warnings

import numpy as np
import torch
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from scipy.ndimage import distance_transform_edt

from starnet import StarFieldPrior, StarNetDeblender, match_catalogs
from starnet.catalogs import decode_flags
from starnet.datasets import load_m2
from starnet.defects import saturate
from starnet.inference import region_tiles
from starnet.psf import pixel_stamps

SKY = (686.0, 1123.0)
SIZE, MARGIN, DENSITY = 100, 6, 0.12


def field(prior, psfs, rng, *, n_bright, level, n_bad):
    """One field: (NDData, truth inside the image, saturated-star indices of the truth,
    masked pixels)."""
    extent = SIZE + 2 * MARGIN
    n = rng.poisson(DENSITY * extent ** 2)
    x = rng.uniform(-0.5 - MARGIN, SIZE - 0.5 + MARGIN, n + n_bright)
    y = rng.uniform(-0.5 - MARGIN, SIZE - 0.5 + MARGIN, n + n_bright)
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    fluxes = prior.sample_fluxes(n, generator=generator).double().numpy()
    bright_r = np.exp(rng.uniform(np.log(2e6), np.log(1e7), n_bright))
    colour = fluxes[:, 1] / fluxes[:, 0]
    bright = np.column_stack([bright_r, bright_r * rng.choice(colour, n_bright)])
    fluxes = np.vstack([fluxes, bright])
    expected = np.empty((2, SIZE, SIZE))
    for b, psf in enumerate(psfs):
        table = QTable({"x_0": x, "y_0": y, "flux": fluxes[:, b]})
        expected[b] = make_model_image((SIZE, SIZE), psf, table, model_shape=(25, 25)) + SKY[b]
    data = torch.from_numpy(rng.poisson(expected).astype(np.float64))[None]
    data, _ = saturate(data, level)
    data = data[0].numpy()
    mask = np.zeros((2, SIZE, SIZE), dtype=bool)
    columns = rng.choice(np.arange(10, SIZE - 10), n_bad, replace=False)
    mask[:, :, columns] = True
    data[:, :, columns] = rng.normal(0.0, 50.0, (2, SIZE, n_bad))
    inside = (x > -0.5) & (x < SIZE - 0.5) & (y > -0.5) & (y < SIZE - 0.5)
    # the star's own light in its central pixel, over the sky: a faint star under a
    # saturated neighbour is not a saturated star
    peak = fluxes[:, 0] * pixel_stamps(psfs[0], 1, x - np.round(x), y - np.round(y))[:, 0, 0]
    truth = QTable({"x": x[inside], "y": y[inside], "flux_r": fluxes[inside, 0]})
    saturated = np.flatnonzero(peak[inside] + SKY[0] >= level)
    image = NDData(data, mask=mask, unit="electron",
                   meta={"bands": ["r", "i"], "psf": psfs, "background": np.array(SKY),
                         "saturation": level})
    return image, truth, saturated, mask[0] | (data[0] >= level)


def evaluate(deblender, image, truth, saturated, masked):
    """The figures of one field (see the module's doc)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        catalog = deblender(image, background="given", progress=False)
        pmf = deblender.count_posterior(image, region=~masked, background="given",
                                        progress=False)
    xy = np.column_stack([np.asarray(catalog["x_fit"]), np.asarray(catalog["y_fit"])])
    flagged = np.array(["saturated" in names for names in decode_flags(catalog["flags"])],
                       dtype=bool)
    result = {"sat": len(saturated), "flagged": 0, "lower": 0, "near": 0, "expected": 0.0}
    density = len(catalog) / SIZE ** 2
    for k in saturated:
        distance = np.hypot(*(xy - [truth["x"][k], truth["y"][k]]).T)
        close = flagged & (distance <= 2)
        result["flagged"] += bool(close.any())
        if close.any():
            nearest = np.flatnonzero(close)[np.argmin(distance[close])]
            result["lower"] += bool(catalog["flux_r_q05"][nearest].value <= truth["flux_r"][k])
        result["near"] += int((distance <= 8).sum())
        result["expected"] += density * np.pi * 8 ** 2
    tiles = region_tiles(~masked, masked.shape, tile_size=deblender.grid.tile_size)
    tile_row = np.floor((np.asarray(truth["y"]) + 0.5) / deblender.grid.tile_size).astype(int)
    tile_col = np.floor((np.asarray(truth["x"]) + 0.5) / deblender.grid.tile_size).astype(int)
    true_n = int(tiles[tile_row, tile_col].sum())
    cdf = np.cumsum(pmf)
    result.update(true_n=true_n, mean_n=float(np.dot(np.arange(len(pmf)), pmf)),
                  covered=bool(np.searchsorted(cdf, 0.05) <= true_n
                               <= np.searchsorted(cdf, 0.95)))
    match = match_catalogs(catalog, truth, band="r")
    # bad columns (spoiled in both bands) vs any masked pixel, by distance
    to_column = distance_transform_edt(~np.asarray(image.mask[0]))
    to_mask = distance_transform_edt(~masked)
    result["near_mask"], result["far"] = [], []
    for estimate, true in match.pairs:
        f = truth["flux_r"][true]
        if f < 1e4 or true in saturated:
            continue
        row = int(np.clip(round(float(truth["y"][true])), 0, SIZE - 1))
        col = int(np.clip(round(float(truth["x"][true])), 0, SIZE - 1))
        ratio = np.log(catalog["flux_r"][estimate].value / f)
        if to_column[row, col] <= 2:
            result["near_mask"].append(ratio)
        elif to_mask[row, col] > 6:
            result["far"].append(ratio)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sdss-m2"])
    parser.add_argument("--n-fields", type=int, default=20)
    parser.add_argument("--bright", type=int, default=3)
    parser.add_argument("--level", type=float, default=220000.0)
    parser.add_argument("--bad-columns", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    psfs = list(load_m2()[0].meta["psf"])
    prior = StarFieldPrior(mu=DENSITY, f_min=1000.0, f_max=1e6, alpha=0.5, bands=("r", "i"))
    print(f"{args.n_fields} M2-like {SIZE} x {SIZE} fields rendered by photutils, "
          f"{args.bright} stars of 2e6-1e7 e- each, saturated at {args.level:.0f} e- with "
          f"bleed trails, {args.bad_columns} bad columns; background given")
    print(f"{'model':>10} {'sat':>5} {'flagged':>8} {'q05<=f':>7} {'near/ring':>9} "
          f"{'bias':>7} {'cover':>6} {'flux near mask':>15} {'flux far':>9}")
    for name in args.models:
        deblender = StarNetDeblender.from_name_or_path(name)
        rng = np.random.default_rng(args.seed)
        rows = [evaluate(deblender, *field(prior, psfs, rng, n_bright=args.bright,
                                           level=args.level, n_bad=args.bad_columns))
                for _ in range(args.n_fields)]
        sat = sum(r["sat"] for r in rows)
        bias = sum(r["mean_n"] - r["true_n"] for r in rows) / sum(r["true_n"] for r in rows)
        near = [v for r in rows for v in r["near_mask"]]
        far = [v for r in rows for v in r["far"]]
        print(f"{name:>10} {sat:5d} {sum(r['flagged'] for r in rows) / sat:8.2f} "
              f"{sum(r['lower'] for r in rows) / sat:7.2f} "
              f"{sum(r['near'] for r in rows) / sum(r['expected'] for r in rows):9.2f} "
              f"{100 * bias:+6.1f}% {np.mean([r['covered'] for r in rows]):6.2f} "
              f"{100 * np.median(near):+8.1f}% ({len(near)}) {100 * np.median(far):+6.1f}%",
              flush=True)


if __name__ == "__main__":
    main()
