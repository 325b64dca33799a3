import numpy as np
import pytest
import torch

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender
from starnet import training
from starnet.simulate import StarFieldRenderer
from starnet.training import SimulatedBatches

NARROW = PowerLawPSF(sigma1=0.8, sigma2=2.0, sigmap=3.0, beta=3.0, b=0.05, p0=0.001)
WIDE = PowerLawPSF(sigma1=1.4, sigma2=3.0, sigmap=4.0, beta=3.0, b=0.2, p0=0.01)
PRIOR = StarFieldPrior(mu=0.05, bands=['r', 'i'])
BACKGROUND = [686.0, 1123.0]


@pytest.fixture
def noiseless(monkeypatch):
    monkeypatch.setattr(training, 'add_noise', lambda expected, generator=None: expected)


def renderer(psf):
    return StarFieldRenderer([psf, psf], stamp_size=11)


@pytest.mark.parametrize('fraction', [0.0, 0.5, 1.0, -0.5])
def test_psf_variant_moves_the_light_linearly(noiseless, fraction):
    """A fixed fraction t renders R_0 + t (R_1 - R_0): at t = 1 the variant's image."""
    batches = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (20, 20), margin=3,
                               variants=[renderer(WIDE)], variant_range=(fraction, fraction))
    images, background, catalogs = batches.draw(3, generator=torch.Generator().manual_seed(1))
    args = (catalogs.locs, catalogs.fluxes, catalogs.mask, (20, 20))
    narrow, wide = renderer(NARROW).render(*args), renderer(WIDE).render(*args)
    expected = (narrow + fraction * (wide - narrow) + background).clamp(min=0)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-3)


def test_variant_fractions_differ_by_image_and_band(noiseless):
    batches = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (20, 20), margin=3,
                               variants=[renderer(WIDE)], variant_range=(0.0, 1.0))
    images, background, catalogs = batches.draw(4, generator=torch.Generator().manual_seed(2))
    args = (catalogs.locs, catalogs.fluxes, catalogs.mask, (20, 20))
    narrow, wide = renderer(NARROW).render(*args), renderer(WIDE).render(*args)
    difference = wide - narrow
    # the fitted fraction of each image and band
    fraction = ((images - background - narrow) * difference).sum((2, 3)) / (
        difference ** 2).sum((2, 3))
    assert fraction.min() >= -1e-4 and fraction.max() <= 1 + 1e-4
    assert fraction.std() > 0.1


def test_psf_variants_are_saved(tmp_path):
    deblender = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7)
    deblender.psf_variants = [[WIDE, WIDE]]
    deblender.fit(n_epochs=1, batches_per_epoch=1, batch_size=2, image_shape=(12, 12),
                  n_validation=2, psf_variant_range=(-0.5, 0.5), progress=False)
    deblender.save(tmp_path / 'model.pt')
    loaded = StarNetDeblender.load(tmp_path / 'model.pt')
    assert loaded.training_settings.psf_variant_range == (-0.5, 0.5)
    assert len(loaded.psf_variants) == 1
    for psf in loaded.psf_variants[0]:
        np.testing.assert_allclose(psf.sigma1.value, WIDE.sigma1.value)
