"""Invariance of the catalog to the tile grid: the same sky shifted by one pixel.

Catalogs the M2 image (``load_m2(border=4)``) and the same image with its first row and
column dropped (so the tile grid falls one pixel differently on the sky), moves the second
catalog back into the first one's coordinates, and matches the two (one-to-one, 0.5 pixel,
0.5 mag) inside the region, for all stars and for stars brighter than 21 mag in r. Also
repeats this on simulated images from the model. ``--grid-consensus``: the catalogs that
the shifted tile grids agree on (``grid_consensus=True``), which the grid should not
move. Run::

    python benchmarks/bench_shift.py --model sdss-m2 [--grid-consensus]
"""

import argparse

import numpy as np
from astropy.nddata import NDData

from starnet import StarNetDeblender, match_catalogs, simulate_starfield
from starnet.background import fit_background
from starnet.datasets import load_m2


def _shifted(nddata):
    meta = dict(nddata.meta)
    background = np.asarray(meta["background"])
    if background.ndim == 3:
        meta["background"] = background[:, 1:, 1:]
    return NDData(np.asarray(nddata.data)[:, 1:, 1:], unit=nddata.unit, meta=meta)


def agreement(deblender, nddata, *, edge, bright_mag, grid_consensus=False):
    """F1 between the catalogs of an image and of the image shifted by one pixel."""
    first = deblender(nddata, background="given", grid_consensus=grid_consensus)
    second = deblender(_shifted(nddata), background="given", grid_consensus=grid_consensus)
    second["x_fit"] += 1
    second["y_fit"] += 1
    rows, cols = nddata.data.shape[1:]

    def inside(catalog):
        keep = ((catalog["x_fit"] > edge) & (catalog["x_fit"] < cols - edge)
                & (catalog["y_fit"] > edge) & (catalog["y_fit"] < rows - edge))
        return catalog[keep]

    first, second = inside(first), inside(second)
    band = deblender.bands[0]
    everything = match_catalogs(second, first, band=band).f1
    bright = match_catalogs(second[second[f"mag_{band}"].value < bright_mag],
                            first[first[f"mag_{band}"].value < bright_mag], band=band).f1
    return everything, bright


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--n-images", type=int, default=5)
    parser.add_argument("--grid-consensus", action="store_true")
    args = parser.parse_args(argv)
    options = dict(edge=4, bright_mag=21.0, grid_consensus=args.grid_consensus)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    image, _ = load_m2(border=4)
    fitted, _ = fit_background(deblender, image)
    f1, f1_bright = agreement(deblender, fitted, **options)
    print(f"M2 (fitted background): F1 between shifted catalogs {f1:.3f}; "
          f"r < 21: {f1_bright:.3f}")
    scores = []
    for seed in range(args.n_images):
        sim, _ = simulate_starfield((100, 100), prior=deblender.prior, psf=deblender.psfs,
                                    background=deblender.background, seed=seed, margin=6)
        sim.meta["nelec_per_nmgy"] = image.meta["nelec_per_nmgy"]
        scores.append(agreement(deblender, sim, **options))
    mean = np.mean(scores, axis=0)
    print(f"simulated ({args.n_images} images): F1 between shifted catalogs {mean[0]:.3f}; "
          f"r < 21: {mean[1]:.3f}")


if __name__ == "__main__":
    main()
