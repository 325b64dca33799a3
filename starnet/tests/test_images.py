import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData, StdDevUncertainty, VarianceUncertainty

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.datasets import load_m2
from starnet.images import StarFieldImage, cutout, electrons_per_unit, read_image

PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
PRIOR = StarFieldPrior(mu=0.05, bands=["r", "i"])
BACKGROUND = [686.0, 1123.0]


@pytest.fixture(scope="module")
def deblender():
    deblender = StarNetDeblender(prior=PRIOR, psf=PSF, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7)
    deblender.fit(n_epochs=1, batches_per_epoch=2, batch_size=2, image_shape=(16, 16),
                  n_validation=2, progress=False)
    return deblender


@pytest.fixture(scope="module")
def image():
    return simulate_starfield((24, 32), prior=PRIOR, psf=PSF, background=BACKGROUND, seed=3,
                              stamp_size=7)[0]


def _same_catalog(a, b):
    assert len(a) == len(b)
    np.testing.assert_allclose(a["x_fit"], b["x_fit"], atol=1e-4)
    np.testing.assert_allclose(a["flux_r"].value, b["flux_r"].value, rtol=1e-4)


@pytest.mark.parametrize("unit, meta, factor", [
    (u.adu, {"gain": 4.0}, 4.0),
    (u.adu, {"GAIN": [4.0, 2.0]}, np.array([4.0, 2.0])[:, None, None]),
    (u.electron / u.s, {"exptime": 50.0}, 50.0),
    (u.adu / u.s, {"GAIN": 2.0, "EXPTIME": 10.0}, 20.0),
    (1000 * u.electron, {}, 1000.0),
])
def test_units_that_convert_to_electrons_give_the_same_catalog(deblender, image, unit, meta,
                                                               factor):
    """The image and its background in another unit: the same electrons, the same stars."""
    other = NDData(image.data / factor, unit=unit,
                   meta=dict(image.meta, background=np.array(BACKGROUND)
                             / np.ravel(factor), **meta))
    np.testing.assert_allclose(read_image(other, ["r", "i"]).data, image.data, rtol=1e-5)
    _same_catalog(deblender(other), deblender(image))


@pytest.mark.parametrize("unit, meta, message", [
    (u.adu, {}, "give the gain"),
    (u.electron / u.s, {}, "exposure time"),
    (u.Jy, {}, "does not convert to electrons"),
])
def test_units_without_what_converts_them_are_refused(deblender, image, unit, meta, message):
    other = NDData(image.data, unit=unit, meta=dict(image.meta, **meta))
    with pytest.raises(ValueError, match=message):
        deblender(other)


def test_electrons_per_unit_of_a_quantity_background():
    assert electrons_per_unit(u.adu, {"gain": 3.0}) == 3.0
    image = NDData(np.full((2, 8, 8), 700.0), unit=u.adu,
                   meta={"bands": ["r", "i"], "psf": [PSF, PSF], "gain": 2.0,
                         "background": [686.0, 1123.0] * u.electron})
    read = read_image(image, ["r", "i"])
    np.testing.assert_allclose(read.background.ravel(), BACKGROUND)   # not doubled
    np.testing.assert_allclose(read.data, 1400.0)


def test_uncertainty_with_read_noise_becomes_a_pedestal():
    """Pixels with Poisson noise plus read noise of variance r2: the pedestal read from the
    variance is r2, and the pixels plus pedestal have Poisson variance (mean = variance)."""
    r2 = 400.0
    rng = np.random.default_rng(0)
    mean = np.full((2, 200, 200), 700.0)
    data = rng.poisson(mean) + rng.normal(0, np.sqrt(r2), mean.shape)
    meta = {"bands": ["r", "i"], "psf": [PSF, PSF], "background": [700.0, 700.0]}
    for uncertainty in (VarianceUncertainty(np.maximum(data, 0) + r2),
                        StdDevUncertainty(np.sqrt(np.maximum(data, 0) + r2))):
        read = read_image(NDData(data, unit=u.electron, uncertainty=uncertainty, meta=meta),
                          ["r", "i"])
        np.testing.assert_allclose(read.pedestal, r2, rtol=0.1)
        shifted = read.data[0]
        assert shifted.var() == pytest.approx(shifted.mean(), rel=0.02)
        np.testing.assert_allclose(read.background.ravel(), 700.0 + read.pedestal)


def test_variance_below_poisson_is_warned_and_not_used():
    data = np.full((1, 30, 30), 700.0)
    image = NDData(data, unit=u.electron, uncertainty=VarianceUncertainty(data * 0 + 10.0),
                   meta={"bands": ["r"], "psf": [PSF], "background": [700.0]})
    with pytest.warns(UserWarning, match="below the Poisson variance"):
        read = read_image(image, ["r"])
    assert read.pedestal[0] == 0


def test_nddata_psf_is_used_when_meta_has_none(deblender, image):
    meta = {key: value for key, value in image.meta.items() if key != "psf"}
    with_psf = NDData(image.data, unit=u.electron, meta=meta, psf=PSF.copy())
    _same_catalog(deblender(with_psf), deblender(image))
    without = NDData(image.data, unit=u.electron, meta=meta)
    with pytest.raises(ValueError, match="NDData"):
        deblender(without)


def test_slicing_keeps_the_background_map_in_step(deblender):
    rows, cols = np.mgrid[0:24, 0:32]
    background = np.stack([686.0 + rows, 1123.0 + cols])
    image, _ = simulate_starfield((24, 32), prior=PRIOR, psf=PSF, background=background,
                                  seed=4, stamp_size=7)
    image.meta["background"] = background
    assert isinstance(image, StarFieldImage)
    part = image[:, 4:20, 8:24]
    assert part.data.shape == (2, 16, 16) and part.meta["origin"] == (4, 8)
    np.testing.assert_array_equal(part.meta["background"], background[:, 4:20, 8:24])
    np.testing.assert_array_equal(image.meta["background"], background)  # parent unchanged
    plain = NDData(image.data[:, 4:20, 8:24], unit=u.electron,
                   meta=dict(image.meta, background=background[:, 4:20, 8:24]))
    _same_catalog(deblender(part), deblender(plain))
    assert part.psf is image.psf


def test_cutout_of_a_real_image_with_wcs():
    image, _ = load_m2(border=3)
    position = (50.0, 40.0)
    part = cutout(image, position, (20, 30))
    assert part.data.shape == (2, 20, 30)
    row0, col0 = part.meta["origin"]
    np.testing.assert_array_equal(part.data, image.data[:, row0:row0 + 20, col0:col0 + 30])
    sky = image.wcs.pixel_to_world(*position)
    x, y = part.wcs.world_to_pixel(sky)
    assert (float(x) + col0, float(y) + row0) == pytest.approx(position, abs=1e-6)
    with pytest.raises(ValueError, match="mode"):
        cutout(image, position, 10, mode="partial")


def test_background_fit_by_default_when_the_model_can():
    deblender = StarNetDeblender.pretrained("sdss-m2")
    image, _ = load_m2(border=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = deblender(image)
        given = deblender(image, background="given")
    assert fitted.meta["background_source"] == "fitted"
    assert fitted.meta["background_fit"] == pytest.approx(1.296, abs=0.01)
    # the medians of the background used: the fitted factor times the SDSS sky
    sky = np.median(np.asarray(image.meta["background"]).reshape(2, -1), axis=1)
    np.testing.assert_allclose(fitted.meta["background"], 1.296 * sky, rtol=0.01)
    np.testing.assert_allclose(given.meta["background"], sky, rtol=1e-6)
    assert given.meta["background_source"] == "given" and given.meta["background_fit"] is None
    assert len(fitted) < len(given)     # the SDSS sky is too low for M2 (docs/m2.rst)
    with pytest.raises(ValueError, match="'fit', 'given' or None"):
        deblender(image, background="auto")


def test_background_fit_needs_a_background_encoder(deblender, image):
    assert deblender(image).meta["background_source"] == "given"
    with pytest.raises(ValueError, match="no background encoder|has none"):
        deblender(image, background="fit")
