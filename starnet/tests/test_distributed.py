"""Dask: results on a two-worker local cluster equal the single-process run."""

import numpy as np
import pytest
import torch

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield

distributed = pytest.importorskip("distributed")
from starnet.distributed import catalog_images, catalog_mosaic, mosaic_blocks  # noqa: E402

PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.05, p0=0.005)
PRIOR = StarFieldPrior(mu=0.05, f_min=2000.0, bands=["r"])


def _deblender(n_colors):
    deblender = StarNetDeblender(prior=PRIOR, psf=PSF, background=[500.0], hidden=8,
                                 tile_hidden=16, stamp_size=15, n_colors=n_colors, seed=1)
    with torch.no_grad():   # untrained, but with stars in many tiles
        deblender.encoder.head.bias[1] += 2.0
    deblender.n_count_samples = 20
    return deblender


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as active:
            yield active


def _images(n, shape=(40, 46)):
    return [simulate_starfield(shape, prior=PRIOR, psf=PSF, background=500.0, seed=seed,
                               stamp_size=15)[0] for seed in range(n)]


def test_mosaic_blocks_cover_the_image():
    blocks = mosaic_blocks((10, 13), block_size=4, halo=2, tile_size=2)
    covered = np.zeros((10, 13), int)
    for (r0, r1, c0, c1), (o_r0, o_r1, o_c0, o_c1) in blocks:
        covered[r0:r1, c0:c1] += 1
        assert o_r0 == max(r0 - 2, 0) and o_c1 == min(c1 + 2, 13)
        assert r0 % 2 == 0 and c0 % 2 == 0
    assert np.all(covered == 1)
    with pytest.raises(ValueError, match="must be a multiple of 2 pixels"):
        mosaic_blocks((10, 10), block_size=5, halo=2, tile_size=2)


def test_catalog_images_equals_single_process(client):
    deblender = _deblender(1)
    images = _images(3)
    catalogs = catalog_images(images, deblender, client=client)
    for image, catalog in zip(images, catalogs):
        expected = deblender(image)
        assert len(catalog) == len(expected) > 0
        np.testing.assert_allclose(catalog["x_fit"], expected["x_fit"])
        np.testing.assert_allclose(catalog["flux_r"].value, expected["flux_r"].value)


@pytest.mark.parametrize("n_colors", [1, 2])
def test_mosaic_equals_one_shot(client, n_colors):
    deblender = _deblender(n_colors)
    image = _images(1, shape=(60, 74))[0]
    expected = deblender(image)
    mosaic = catalog_mosaic(image, deblender, block_size=16, client=client)
    assert mosaic.meta["n_blocks"] == 4 * 5
    assert not any(key.startswith("n_stars") for key in mosaic.meta)

    def order(table):   # by position, rounded so that float noise cannot swap stars
        return np.lexsort([np.round(np.asarray(table[c]), 2)
                           for c in ("flux_r", "x_fit", "y_fit")])

    order, reference = order(mosaic), order(expected)
    assert len(mosaic) == len(expected) > 0
    for column in ("x_fit", "y_fit", "x_err", "flux_r", "detection_prob"):
        np.testing.assert_allclose(np.asarray(mosaic[column])[order],
                                   np.asarray(expected[column])[reference],
                                   rtol=1e-4, atol=1e-4)
