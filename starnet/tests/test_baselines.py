import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData
from photutils.psf import ImagePSF
from photutils.utils import NoDetectionsWarning

from starnet.baselines import daophot_catalog
from starnet.baselines.daophot import _pixel_integrated
from starnet.psf import psf_fwhm
from starnet.psf import PowerLawPSF, pixel_stamps

# Close to the M2 r-band PSF (FWHM 2.1 pixels).
PSF = PowerLawPSF(sigma1=0.88, sigma2=2.3, sigmap=5.0, beta=3.0, b=0.06, p0=1e-3)
STARS = np.array([[8.3, 9.7, 2e4], [21.6, 10.2, 5e4], [14.1, 22.4, 1e4]])  # x, y, flux
SKY = 686.0


def _image(stars, *, shape=(32, 32), noise=True, meta=None, seed=0):
    """Stars rendered by pixel-integrating the PSF, plus the sky (and Poisson noise)."""
    size = 25
    expected = np.full((shape[0] + 2 * size, shape[1] + 2 * size), SKY)
    for x, y, flux in stars:
        col, row = int(round(x)), int(round(y))
        stamp = pixel_stamps(PSF, size, [x - col], [y - row])[0]
        expected[row + size // 2 + 1:row + size // 2 + 1 + size,
                 col + size // 2 + 1:col + size // 2 + 1 + size] += flux * stamp
    expected = expected[size:size + shape[0], size:size + shape[1]]
    data = np.random.default_rng(seed).poisson(expected) if noise else expected
    meta = {"bands": ["r"], "psf": [PSF], "background": [SKY], **(meta or {})}
    return NDData(data[None].astype(float), unit=u.electron, meta=meta)


def _nearest(catalog, x, y):
    distance = np.hypot(catalog["x_fit"] - x, catalog["y_fit"] - y)
    return catalog[int(np.argmin(distance))], float(distance.min())


def test_pixel_integrated_psf_matches_stamps():
    prf = _pixel_integrated(PSF)
    rows, cols = np.mgrid[0:15, 0:15]
    for dx, dy in [(0.0, 0.0), (0.3, -0.2), (-0.45, 0.13)]:
        expected = pixel_stamps(PSF, 15, [dx], [dy])[0]
        values = prf.evaluate(cols, rows, 1.0, 7 + dx, 7 + dy)
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-4 * expected.max())
    # The FWHM of the pixel-integrated PSF is a little wider than the point PSF's.
    assert PSF.fwhm < psf_fwhm(prf, step=0.25) < PSF.fwhm + 0.3


def test_noiseless_isolated_stars_exact():
    # Trusting meta['background'], the fit is exact up to the PSF interpolation.
    catalog = daophot_catalog(_image(STARS, noise=False), band="r", local_background=None)
    assert len(catalog) == 3
    for x, y, flux in STARS:
        star, distance = _nearest(catalog, x, y)
        assert distance < 0.01
        assert star["flux_r"].to_value(u.electron) == pytest.approx(flux, rel=2e-3)
    # The local background (default) takes in a little of the PSF's wings.
    catalog = daophot_catalog(_image(STARS, noise=False), band="r")
    assert len(catalog) == 3
    for x, y, flux in STARS:
        star, distance = _nearest(catalog, x, y)
        assert distance < 0.02
        assert flux * 0.98 < star["flux_r"].to_value(u.electron) < flux


def test_noisy_isolated_stars_recovered():
    image = _image(STARS, meta={"nelec_per_nmgy": 856.0})
    catalog = daophot_catalog(image, band="r")
    assert catalog.colnames[:8] == ["id", "x_fit", "y_fit", "x_err", "y_err", "flux_r",
                                    "flux_r_err", "mag_r"]
    for x, y, flux in STARS:
        star, distance = _nearest(catalog, x, y)
        assert distance < 0.1
        fitted = star["flux_r"].to_value(u.electron)
        # Noise of the star, the sky and the local background estimate: a few percent.
        assert fitted == pytest.approx(flux, rel=0.1)
        assert 0 < star["flux_r_err"].to_value(u.electron) < 0.05 * flux
        assert star["mag_r"].to_value(u.mag) == pytest.approx(
            22.5 - 2.5 * np.log10(fitted / 856.0))
    # Anything else is a faint fit to the noise of a bright star's residual.
    distance = np.hypot(catalog["x_fit"][:, None] - STARS[:, 0],
                        catalog["y_fit"][:, None] - STARS[:, 1]).min(axis=1)
    assert np.all(catalog["flux_r"][distance > 0.5] < 1000 * u.electron)


def test_image_psf_and_evaluation_calibration():
    """A pixel-integrated PSF image is used as it is; magnitudes from meta['evaluation']."""
    stamp = pixel_stamps(PSF, 25, [0.0], [0.0])[0]
    image = _image(STARS, meta={"psf": [ImagePSF(stamp)],
                                "evaluation": {"nelec_per_nmgy": 900.0}})
    catalog = daophot_catalog(image, band="r")
    assert len(catalog) == 3
    star, distance = _nearest(catalog, *STARS[1, :2])
    assert distance < 0.1
    assert star["flux_r"].to_value(u.electron) == pytest.approx(5e4, rel=0.1)
    assert star["mag_r"].to_value(u.mag) == pytest.approx(
        22.5 - 2.5 * np.log10(star["flux_r"].to_value(u.electron) / 900.0))
    assert catalog.meta["band"] == "r" and catalog.meta["fit_shape"] == 3


def test_empty_image_warns_and_returns_empty_table():
    with pytest.warns(NoDetectionsWarning):
        catalog = daophot_catalog(_image(np.zeros((0, 3)), noise=False), band="r")
    assert len(catalog) == 0
    assert "x_fit" in catalog.colnames and "mag_r" in catalog.colnames


def test_bad_inputs():
    image = _image(STARS, noise=False)
    with pytest.raises(ValueError, match="band 'i' is not among"):
        daophot_catalog(image, band="i")
    with pytest.raises(ValueError, match="expected electrons"):
        daophot_catalog(NDData(image.data, unit=u.adu, meta=image.meta), band="r")
    with pytest.raises(ValueError, match="meta lacks"):
        daophot_catalog(NDData(image.data, unit=u.electron, meta={"bands": ["r"]}))
    with pytest.raises(ValueError, match="threshold"):
        daophot_catalog(image, band="r", threshold=0)
