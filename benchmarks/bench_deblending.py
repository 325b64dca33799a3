"""Deblending power as in the paper's appendix C.1: when does the posterior see two stars?

The experiment of appendix C.1, run with the bundled M2 model
(``StarNetDeblender.pretrained("sdss-m2")``: bands r and i, the field's SDSS KL PSF,
tiles of 2 pixels, at most 3 stars per tile); no training.

The pair, as the paper's experiment placed it (the public code that accompanied the
paper, ``experiments_deblending``, draws it with ``f0 = 6000``, ``flux_ratio = 1`` and
``color1 = 2``):

* the first star has 6000 electrons in r and colour 0 (6000 electrons in i);
* the second star has the same r flux, 6000 electrons, and colour 2 mag: its i flux
  is ``6000 * 10**(2 / 2.5)`` = 37 857 electrons. "Colour" is the prior's colour
  ``c`` of ``f_i = f_r * 10**(c / 2.5)`` (design notes, section 1), so the second
  star is 2 mag brighter in i than in r (and than the first star in i), not 2 mag
  fainter. The two stars are equally bright in r and differ in colour by 2 mag,
  which is the case where the second band helps most.

The stars lie on the diagonal, at ``(m - s, m - s)`` and ``(m + s, m + s)`` around a
midpoint ``m``, so their separation is ``delta = 2 sqrt(2) s``; ``delta`` runs from 0
to 4 pixels. The midpoint is either the centre of a tile or a corner shared by four
tiles. The background is the SDSS sky of the model (686 and 1123 electrons per pixel
in r and i), given to the model (``background="given"``). Noise is the model's
Normal(lambda, lambda).

Image size: the encoder gives each tile a window of 16 pixels (the tile and 7 pixels
around it), so the smallest image in which every tile near the pair sees only real
pixels is the 3 x 3 tiles (6 pixels) that hold the pair at the largest separation plus
7 pixels on each side, 20 pixels; tiles start at even pixels, so the images are
22 x 22 (the paper used one 7 x 7 tile, the image being the tile). The midpoint is at
pixel (10.5, 10.5), the centre of tile (5, 5), or at (11.5, 11.5), the corner of tiles
5 and 6 in each axis; either way 8 pixels separate the block from the edges.

P(N = 2) is the posterior probability of exactly two stars in the tiles that hold the
pair (``count_posterior`` with ``region=``), so that false detections elsewhere do not
dilute it:

* *pair tiles*: the block of tiles from the tile of one star to the tile of the other
  (a star on a tile boundary belongs to all the tiles that share it). For a midpoint
  at a tile centre that is 1 tile up to a separation of 2.83 pixels, then 3 x 3; for a
  corner it is the 2 x 2 tiles around the corner at every separation.
* *block*: the tiles that hold the pair at the largest separation, fixed over the
  separations (3 x 3 tiles around a tile centre, 2 x 2 around a corner), which also
  counts a star that a neighbouring tile claims twice.

The model's prior is the M2 prior (0.12 stars per pixel, Pareto fluxes above 1000
electrons), not the paper's "one or two stars" of appendix C.1, so a faint third star
hidden by the pair is always possible; the script therefore also reports P(N >= 2).
For each separation it prints the mean over ``--n-images`` noise draws of P(N = 2),
P(N >= 2) and E[N] in each region, reports the smallest separation at which the mean
P(N = 2) (and P(N >= 2)) exceeds 0.5 and 0.9 (on the grid of ``--step`` pixels), and
writes a figure (``--output``). About 2 minutes on one core::

    python benchmarks/bench_deblending.py --output docs/_static/deblending.png
"""

import argparse
import time

import matplotlib
import numpy as np
import torch
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable

from starnet import StarNetDeblender
from starnet.inference import region_tiles
from starnet.simulate import add_noise

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHAPE = (22, 22)
FLUX = 6000.0
COLOUR = 2.0
MIDPOINTS = {"tile centre": 10.5, "tile corner": 11.5}
BLOCKS = {"tile centre": (4, 7), "tile corner": (5, 7)}   # tiles [start, stop) in each axis
THRESHOLDS = (0.5, 0.9)


def pair_catalog(midpoint, separation):
    """The two stars, ``separation`` pixels apart on the diagonal around ``midpoint``."""
    s = separation / (2 * np.sqrt(2))
    xy = [midpoint - s, midpoint + s]
    return QTable({"x": xy, "y": xy, "flux_r": [FLUX, FLUX] * u.electron,
                   "flux_i": [FLUX, FLUX * 10 ** (COLOUR / 2.5)] * u.electron})


def tile_span(low, high, tile_size):
    """Tiles ``[start, stop)`` from the one holding ``low`` to the one holding ``high``
    (tile ``j`` covers ``j R - 0.5 <= x < (j + 1) R - 0.5``; a coordinate on a boundary
    belongs to both tiles)."""
    return (int(np.ceil((low + 0.5) / tile_size)) - 1,
            int(np.floor((high + 0.5) / tile_size)) + 1)


def tile_mask(start, stop, tile_size):
    """Pixels of the square block of tiles ``[start, stop)`` in both axes."""
    mask = np.zeros(SHAPE, bool)
    mask[start * tile_size:stop * tile_size, start * tile_size:stop * tile_size] = True
    return mask


def summary(pmf):
    """P(N = 2), P(N >= 2) and E[N] of a count pmf."""
    pmf = np.pad(pmf, (0, max(3 - len(pmf), 0)))
    return pmf[2], pmf[2:].sum(), np.dot(np.arange(len(pmf)), pmf)


def pair_counts(deblender, name, separation, n_images, generator):
    """Mean over noise draws of P(N = 2), P(N >= 2) and E[N] in the pair tiles and in the
    block (six columns), and the number of pair tiles."""
    tile_size = deblender.grid.tile_size
    catalog = pair_catalog(MIDPOINTS[name], separation)
    pair = tile_mask(*tile_span(min(catalog["x"]), max(catalog["x"]), tile_size), tile_size)
    block = tile_mask(*BLOCKS[name], tile_size)
    expected = torch.from_numpy(deblender.render(catalog, SHAPE)
                                + deblender.background[:, None, None])
    meta = {"bands": deblender.bands, "psf": deblender.psfs,
            "background": list(deblender.background)}
    values = []
    for _ in range(n_images):
        image = NDData(add_noise(expected, generator=generator).numpy(), unit=u.electron,
                       meta=meta)
        pmfs = deblender.count_posterior(image, region=np.stack([pair, block]),
                                         background="given", progress=False)
        values.append([v for pmf in pmfs for v in summary(pmf)])
    n_pair_tiles = int(region_tiles(pair, SHAPE, tile_size=deblender.grid.tile_size).sum())
    return np.mean(values, axis=0), n_pair_tiles


def first_above(separations, values, threshold):
    """Smallest separation at which ``values`` exceeds ``threshold``, and the smallest
    from which on it stays above (None where there is none)."""
    above = values > threshold
    first = separations[np.argmax(above)] if above.any() else None
    below = np.flatnonzero(~above)
    stays = (separations[0] if not len(below) else
             separations[below[-1] + 1] if below[-1] + 1 < len(separations) else None)
    return first, stays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2",
                        help="bundled model name or model file (default: sdss-m2)")
    parser.add_argument("--n-images", type=int, default=500, help="noise draws per separation")
    parser.add_argument("--max-separation", type=float, default=4.0)
    parser.add_argument("--step", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="PNG of P(N=2) and E[N] against delta")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    if deblender.bands != ["r", "i"]:
        raise SystemExit(f"the experiment needs an r, i model; {args.model} has {deblender.bands}")
    separations = np.round(np.arange(0.0, args.max_separation + 1e-9, args.step), 6)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    results, n_tiles = {}, {}
    for name in MIDPOINTS:
        rows = [pair_counts(deblender, name, delta, args.n_images, generator)
                for delta in separations]
        results[name] = np.array([row[0] for row in rows])
        n_tiles[name] = [row[1] for row in rows]
    print(f"model {args.model}; first star r = i = {FLUX:g} e-, second r = {FLUX:g} e-, "
          f"colour {COLOUR:g} mag (i = {FLUX * 10 ** (COLOUR / 2.5):.0f} e-); background "
          f"{', '.join(f'{b:.0f}' for b in deblender.background)} e-/px; {SHAPE[0]} x "
          f"{SHAPE[1]} images; mean over {args.n_images} noise draws "
          f"({time.time() - started:.0f} s)")
    print("P2 = P(N = 2), P2+ = P(N >= 2), E = E[N], in the tiles holding the pair [their "
          "number] and in the fixed block\n(for a corner the two are the same 2 x 2 tiles)")
    print(f"{'':>10} | {'tile centre: pair tiles':^28} | {'centre: 3 x 3 block':^21} | "
          f"{'tile corner: 2 x 2 tiles':^24}")
    print(f"{'delta (px)':>10} | {'P2':>6} {'P2+':>6} {'E':>5} {'tiles':>7} | {'P2':>6} "
          f"{'P2+':>6} {'E':>5}   | {'P2':>6} {'P2+':>6} {'E':>5}")
    centre, corner = results["tile centre"], results["tile corner"]
    for k, delta in enumerate(separations):
        tiles = f"[{n_tiles['tile centre'][k]}]"
        print(f"{delta:10.2f} | {centre[k, 0]:6.3f} {centre[k, 1]:6.3f} {centre[k, 2]:5.2f} "
              f"{tiles:>7} | {centre[k, 3]:6.3f} "
              f"{centre[k, 4]:6.3f} {centre[k, 5]:5.2f}   | {corner[k, 0]:6.3f} "
              f"{corner[k, 1]:6.3f} {corner[k, 2]:5.2f}")
    for name, region, column in (("tile centre", "pair tiles", 0), ("tile centre", "block", 3),
                                 ("tile corner", "2 x 2 tiles", 0)):
        for offset, label in ((0, "P(N=2)"), (1, "P(N>=2)")):
            values = results[name][:, column + offset]
            found = [first_above(separations, values, t) for t in THRESHOLDS]
            print(f"{name}, {region}: " + "; ".join(
                f"{label} > {t:g} first at delta = {d[0]:.2f} px"
                + (f", for good from {d[1]:.2f} px" if d[1] is not None else "")
                if d[0] is not None else f"{label} never > {t:g} (at most {values.max():.3f})"
                for t, d in zip(THRESHOLDS, found)))
    if args.output:
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        curves = [("tile centre, pair tiles", centre[:, :3], "C0", "-"),
                  ("tile centre, 3 x 3 block", centre[:, 3:], "C0", "--"),
                  ("tile corner, 2 x 2 tiles", corner[:, :3], "C1", "-")]
        for label, values, colour, style in curves:
            axes[0].plot(separations, values[:, 0], ls=style, marker="o", ms=3, color=colour,
                         label=f"{label}: P(N = 2)")
            axes[0].plot(separations, values[:, 1], ls=style, color=colour, alpha=0.4,
                         label=f"{label}: P(N >= 2)")
            axes[1].plot(separations, values[:, 2], ls=style, marker="o", ms=3, color=colour,
                         label=label)
        for threshold in THRESHOLDS:
            axes[0].axhline(threshold, color="grey", ls=":")
        axes[0].axvline(1.5, color="k", ls=":", lw=0.8)
        axes[0].set(xlabel="separation delta (pixels)", ylabel="P(N = 2); light: P(N >= 2)",
                    ylim=(0, 1.02))
        axes[1].axhline(2, color="grey", ls=":")
        axes[1].set(xlabel="separation delta (pixels)", ylabel="E[N]")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        figure.suptitle("sdss-m2 model: r = 6000 e- pair, colours 0 and 2 mag, SDSS PSF and sky "
                        "(dotted line: the paper's ~1.5 px)", fontsize=10)
        figure.tight_layout()
        figure.savefig(args.output, dpi=120)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
