"""Speed of simulating M2-like images: starnet's renderer against photutils.

Simulates two-band (r, i) 100 x 100 images at the M2 star density (the default
`~starnet.StarFieldPrior`: 0.12 stars per pixel, ~1200 stars per image) through the
bundled 25 x 25 SDSS PSF images of the field, adds the background (686 e- in r,
1123 e- in i) and Gaussian noise, in batches of a few sizes, and prints the images
per second of the best batch size. photutils' ``make_model_image`` does the same
work (same catalogs, the same PSF images as ``ImagePSF``, ``model_shape=(25, 25)``,
background and noise) on a few images, timed in the same run; the table gives the
ratio. Both PSF images are normalised to unit sum, so that the two renderings can
be compared (the largest difference is printed as a check).

Run from the repository root::

    python benchmarks/bench_simulation.py
    python benchmarks/bench_simulation.py --n-images 200 --batch-sizes 10 25 50 100 \\
        --n-photutils 5 --threads 1

torch runs on ``--threads`` CPU threads (default 1, as photutils uses one core).
"""

import argparse
import time
from importlib.resources import files

import numpy as np
import torch
from astropy.io import fits
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import ImagePSF

from starnet import StarFieldPrior
from starnet.simulate import StarFieldRenderer, add_noise

SHAPE = (100, 100)
BANDS = ('r', 'i')
BACKGROUND = (686.0, 1123.0)  # electrons per pixel, SDSS sky of the M2 field


def psf_images():
    folder = files('starnet') / 'datasets' / 'data' / 'm2'
    images = []
    for band in BANDS:
        image = fits.getdata(folder / f'sdss-002583-2-0136-psf-{band}.fits').astype(float)
        images.append(image / image.sum())
    return images


def simulate_starnet(prior, renderer, n_images, batch_size, seed):
    """Simulate ``n_images`` noisy images in batches; return the last batch."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.tensor(BACKGROUND).reshape(1, -1, 1, 1)
    for start in range(0, n_images, batch_size):
        size = min(batch_size, n_images - start)
        batch = prior.sample_batch(size, SHAPE, generator=generator)
        expected = renderer.render(batch.locs, batch.fluxes, batch.mask, SHAPE) + background
        images = add_noise(expected, noise='gaussian', generator=generator)
    return images


def simulate_photutils(batch, psfs, rng):
    """Render every catalog of ``batch`` with photutils, add background and noise.

    Returns the noiseless star light and the noisy images, (n_images, bands, rows, cols).
    """
    stars = np.empty((len(batch.mask), len(psfs), *SHAPE))
    images = np.empty_like(stars)
    for index in range(len(batch.mask)):
        keep = batch.mask[index]
        locs = batch.locs[index][keep].double().numpy()
        fluxes = batch.fluxes[index][keep].double().numpy()
        for b, psf in enumerate(psfs):
            table = QTable({'x_0': locs[:, 0], 'y_0': locs[:, 1], 'flux': fluxes[:, b]})
            stars[index, b] = make_model_image(SHAPE, psf, table, model_shape=(25, 25))
            expected = stars[index, b] + BACKGROUND[b]
            images[index, b] = expected + np.sqrt(expected) * rng.standard_normal(SHAPE)
    return stars, images


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n-images', type=int, default=200,
                        help='images simulated by starnet per batch size (default 200)')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[10, 25, 50, 100],
                        help='batch sizes to try (default 10 25 50 100)')
    parser.add_argument('--n-photutils', type=int, default=5,
                        help='images simulated by photutils (default 5)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    prior = StarFieldPrior()
    images = psf_images()
    start = time.perf_counter()
    renderer = StarFieldRenderer(images)
    setup = time.perf_counter() - start
    print(f'{args.n_images} images of {SHAPE[0]} x {SHAPE[1]} pixels, bands {BANDS}, '
          f'{prior.expected_count(SHAPE):.0f} stars per image on average, '
          f'torch threads {torch.get_num_threads()}')
    print(f'StarFieldRenderer set-up (once per PSF): {setup:.2f} s, ranks {renderer.ranks}')

    simulate_starnet(prior, renderer, 2, 2, args.seed)  # warm-up (FFT plans, allocator)
    rows = []
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        simulate_starnet(prior, renderer, args.n_images, batch_size, args.seed)
        seconds = time.perf_counter() - start
        rows.append(('starnet StarFieldRenderer', batch_size, args.n_images, seconds))

    # photutils on a subset of catalogs drawn from the same prior
    batch = prior.sample_batch(args.n_photutils, SHAPE,
                               generator=torch.Generator().manual_seed(args.seed))
    psfs = [ImagePSF(image) for image in images]
    start = time.perf_counter()
    theirs, _ = simulate_photutils(batch, psfs, np.random.default_rng(args.seed))
    seconds = time.perf_counter() - start
    rows.append(('photutils make_model_image', 1, args.n_photutils, seconds))

    # the same noiseless images from both, as a check of the comparison
    ours = renderer.render(batch.locs, batch.fluxes, batch.mask, SHAPE).double().numpy()
    difference = np.max(np.abs(ours - theirs)) / np.max(theirs)

    print()
    print(f'{"method":<28} {"batch":>6} {"images":>7} {"seconds":>8} {"images/s":>9}')
    for name, batch_size, n_images, seconds in rows:
        print(f'{name:<28} {batch_size:>6} {n_images:>7} {seconds:>8.2f} '
              f'{n_images / seconds:>9.1f}')
    best = max(rows[:-1], key=lambda row: row[2] / row[3])
    best_rate = best[2] / best[3]
    photutils_rate = rows[-1][2] / rows[-1][3]
    print()
    print(f'best starnet batch size {best[1]}: {best_rate:.1f} images/s '
          f'(target >= 200); photutils {photutils_rate:.2f} images/s; '
          f'ratio {best_rate / photutils_rate:.0f}x (target >= 10x)')
    print(f'noiseless renderings of the {args.n_photutils} photutils catalogs: largest '
          f'|starnet - photutils| = {difference:.1e} of the brightest pixel')


if __name__ == '__main__':
    main()
