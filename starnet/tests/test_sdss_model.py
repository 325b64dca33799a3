"""The bundled ``sdss`` model on fields that starnet's simulator did not make: rendered
by photutils through a PSF the model never saw (docs/sdss_model.rst)."""

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import MoffatPSF

from starnet import StarFieldPrior, StarNetDeblender

SKY = (686.0, 1123.0)
MOFFAT = MoffatPSF(alpha=3.5 / (2 * np.sqrt(2 ** (1 / 3.0) - 1)), beta=3.0)   # FWHM 3.5 px


def photutils_field(seed, *, size=200, density=0.01, margin=6):
    """An M2-prior field rendered by photutils through a Moffat PSF: (NDData, true
    number of stars inside the image)."""
    rng = np.random.default_rng(seed)
    prior = StarFieldPrior(mu=density, f_min=1000.0, f_max=1e6, alpha=0.5, bands=("r", "i"))
    n = rng.poisson(density * (size + 2 * margin) ** 2)
    x, y = (rng.uniform(-0.5 - margin, size - 0.5 + margin, n) for _ in range(2))
    fluxes = prior.sample_fluxes(n, generator=torch.Generator().manual_seed(seed)).double()
    data = np.stack([rng.poisson(make_model_image(
        (size, size), MOFFAT, QTable({"x_0": x, "y_0": y, "flux": fluxes[:, b].numpy()}),
        model_shape=(25, 25)) + SKY[b]) for b in range(2)]).astype(np.float32)
    inside = (x > -0.5) & (x < size - 0.5) & (y > -0.5) & (y < size - 0.5)
    image = NDData(data, unit="electron", meta={"bands": ["r", "i"], "psf": [MOFFAT] * 2,
                                                "background": np.array(SKY)})
    return image, int(inside.sum())


@pytest.mark.parametrize("name, low, high", [("sdss", -0.10, 0.05), ("sdss-m2", 1.0, np.inf)])
def test_the_psf_reading_model_counts_stars_through_a_psf_it_never_saw(name, low, high):
    """Three sparse fields through a Moffat PSF: ``sdss``, told the PSF, counts within
    the documented -5 % (here -10 % to +5 %); ``sdss-m2``, trained for M2's PSF, more
    than doubles the count (documented: +377 %)."""
    deblender = StarNetDeblender.pretrained(name)
    estimated, true = 0.0, 0
    for seed in range(3):
        image, n = photutils_field(seed)
        # sdss-m2 says that the PSF differs from its own
        with pytest.warns(UserWarning) if name == "sdss-m2" else nullcontext():
            catalog = deblender(image, background="given", progress=False)
        estimated += catalog.meta["n_stars_mean"]
        true += n
    assert low < estimated / true - 1 < high
