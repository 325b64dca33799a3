from importlib.resources import files

import numpy as np
import pytest
import torch
from photutils.psf import CircularGaussianPRF, GaussianPRF

from starnet.psf import PowerLawPSF
from starnet.psf_family import (DESCRIPTOR_SIZE, PSFBank, gaussian_blur, photofield_psfs,
                                psf_descriptor, widened_psf)
from starnet.simulate import StarFieldRenderer

SDSS = files("starnet") / "datasets" / "data" / "sdss"


def test_descriptor_orders_widths_and_sees_ellipticity():
    widths = [2.0, 2.5, 3.0, 4.0]
    descriptors = np.array([psf_descriptor(CircularGaussianPRF(fwhm=w)) for w in widths])
    assert descriptors.shape == (4, DESCRIPTOR_SIZE)
    assert np.all(np.diff(descriptors[:, 0]) < 0)          # the core falls with the width
    assert np.all(np.diff(descriptors[:, 5]) > 0)          # the ring at 3.5-4.5 px rises
    # the centre pixel of a pixel-integrated Gaussian: erf(0.5 / (sigma sqrt 2))**2
    from scipy.special import erf
    sigma = 3.0 / 2.3548
    expected = (np.log10(erf(0.5 / (sigma * np.sqrt(2))) ** 2) + 4) / 2
    assert descriptors[2, 0] == pytest.approx(expected, abs=2e-3)
    wide_in_x = psf_descriptor(GaussianPRF(x_fwhm=3.5, y_fwhm=2.5))
    wide_in_y = psf_descriptor(GaussianPRF(x_fwhm=2.5, y_fwhm=3.5))
    assert wide_in_x[-2] > 0.5 and wide_in_y[-2] == pytest.approx(-wide_in_x[-2], rel=1e-3)
    np.testing.assert_allclose(wide_in_x[:-2], wide_in_y[:-2], atol=1e-4)   # same rings
    with pytest.raises(ValueError, match="size must be at least 26"):
        psf_descriptor(CircularGaussianPRF(fwhm=2.0), size=15)


def test_photofield_psfs_match_the_fields_psfield():
    """The photoField's row of field 136 is the power law of that field's psField."""
    psfs = photofield_psfs(SDSS / "photoField-002583-2.fits", ("r", "i"))
    assert len(psfs) == 227
    for band, psf in zip(("r", "i"), psfs[136]):
        reference = PowerLawPSF.from_psfield(SDSS / "psField-002583-2-0136.fit", band=band)
        for name in ("sigma1", "sigma2", "sigmap", "beta", "b", "p0"):
            assert getattr(psf, name).value == pytest.approx(getattr(reference, name).value,
                                                             rel=1e-5)
    with pytest.raises(ValueError, match=r"fields \[5\] are not in"):
        photofield_psfs(SDSS / "photoField-002583-2.fits", ("r",), fields=[5, 136])


def test_gaussian_blur_adds_its_variance_to_a_star():
    """Convolution adds variances exactly: a star's second moment grows by sigma**2, its
    flux and centroid stay, for sigmas below and above a pixel."""
    from scipy.special import erf
    edges = np.arange(32) - 0.5
    cdf_x = 0.5 * (1 + erf((edges - 15.3) / (1.1 * np.sqrt(2))))
    cdf_y = 0.5 * (1 + erf((edges - 14.8) / (1.1 * np.sqrt(2))))
    image = torch.from_numpy(np.outer(np.diff(cdf_y), np.diff(cdf_x)))[None, None]
    offsets = torch.arange(31.0, dtype=torch.float64)

    def moments(im):
        cols = im[0, 0].sum(0)
        x = float(cols @ offsets) / float(cols.sum())
        return float(im.sum()), x, float(cols @ (offsets - x) ** 2) / float(cols.sum())

    total, x, variance = moments(image)
    for sigma in (0.3, 1.7):
        blurred = gaussian_blur(image, torch.tensor([[sigma]]))
        total_b, x_b, variance_b = moments(blurred)
        assert total_b == pytest.approx(total, rel=1e-9)
        assert x_b == pytest.approx(x, abs=1e-9)
        assert variance_b - variance == pytest.approx(sigma ** 2, rel=1e-5)


def test_bank_renders_its_members_with_width_errors():
    psf = PowerLawPSF.from_psfield(SDSS / "psField-002583-2-0136.fit", band="r")
    bank = PSFBank([(psf,), (CircularGaussianPRF(fwhm=4.0),)], stamp_size=25,
                   width_error=0.05)
    assert len(bank) == 2 and bank.descriptors.shape == (2, DESCRIPTOR_SIZE)
    np.testing.assert_allclose(bank.descriptors[0].numpy(), psf_descriptor(psf))
    locs = torch.tensor([[[20.3, 19.6], [5.0, 31.2]]]).expand(3, -1, -1)
    fluxes = torch.tensor([[[5000.0], [2000.0]]]).expand(3, -1, -1)
    mask = torch.ones(3, 2, dtype=torch.bool)
    members = torch.tensor([0, 0, 0])
    images = bank.render(locs, fluxes, mask, (40, 40), members=members,
                         errors=torch.tensor([[0.0], [1.0], [-1.0]]))
    exact = StarFieldRenderer([psf]).render(locs[:1], fluxes[:1], mask[:1], (40, 40))
    wider = StarFieldRenderer([widened_psf(psf, 1.05)]).render(locs[:1], fluxes[:1], mask[:1],
                                                               (40, 40))
    peak = float(exact.max())
    assert float((images[0] - exact[0]).abs().max()) < 2e-3 * peak   # 16 vs 32 phase steps
    assert float((images[1] - wider[0]).abs().max()) < 2e-2 * peak    # tabulated widening
    assert float(images[1].max()) < peak < float(images[2].max())    # wider, narrower
    totals = images.sum(dim=(1, 2, 3))
    np.testing.assert_allclose(totals.numpy(), float(exact.sum()), rtol=1e-4)


def test_a_batch_of_several_members_is_each_image_through_its_own_psf():
    """The bank renders the images of each member together: a batch that mixes members
    (in any order) gives each image as its member's renderer gives it alone."""
    psfs = [CircularGaussianPRF(fwhm=fwhm) for fwhm in (2.0, 3.0, 4.5)]
    bank = PSFBank([(psf,) for psf in psfs], stamp_size=15, width_error=0.0)
    generator = torch.Generator().manual_seed(0)
    locs = 24 * torch.rand(6, 5, 2, generator=generator)
    fluxes = 500 + 2000 * torch.rand(6, 5, 1, generator=generator)
    mask = torch.ones(6, 5, dtype=torch.bool)
    members = torch.tensor([2, 0, 2, 1, 0, 2])
    images = bank.render(locs, fluxes, mask, (24, 24), members=members,
                         errors=torch.zeros(6, 1))
    for k, member in enumerate(members.tolist()):
        alone = StarFieldRenderer([psfs[member]], stamp_size=15, phase_steps=16).render(
            locs[k:k + 1], fluxes[k:k + 1], mask[k:k + 1], (24, 24))
        np.testing.assert_allclose(images[k].numpy(), alone[0].numpy(), atol=1e-3)
    as_list = bank.render(locs, fluxes, mask, (24, 24), members=members.tolist(),
                          errors=torch.zeros(6, 1))
    np.testing.assert_array_equal(as_list.numpy(), images.numpy())
