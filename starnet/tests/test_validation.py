import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.simulate import as_background
from starnet.validation import BackgroundMismatchWarning, check_background

PSF = PowerLawPSF(sigma1=0.9, sigma2=2.3, b=0.06, p0=0.0)
SKY = np.array([686.0, 1123.0]).reshape(2, 1, 1)


def simulated(mu, seed=0, shape=(60, 60)):
    image, _ = simulate_starfield(shape, prior=StarFieldPrior(mu=mu), psf=PSF,
                                  background=SKY.ravel(), seed=seed, stamp_size=15)
    return image.data


@pytest.mark.parametrize('mu', [0.001, 0.01, 0.05, 0.12, 0.2])
def test_images_that_match_their_background_pass(mu):
    """From a nearly empty field to one more crowded than M2's core: no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        check_background(simulated(mu), SKY, ['r', 'i'])


def test_real_m2_frame_passes():
    """The real M2 region with the SDSS sky (crowded, its median well above the sky)."""
    from starnet.datasets import load_m2
    image, _ = load_m2(border=3)
    background = as_background(image.meta['background'], 2, image.data.shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        check_background(np.asarray(image.data), background, ['r', 'i'])


def test_sky_subtracted_image_warns():
    data = simulated(0.05)
    with pytest.warns(BackgroundMismatchWarning, match='its pixels lie below') as caught:
        check_background(data - SKY, SKY, ['r', 'i'])
    assert [str(w.message)[:6] for w in caught] == ['band r', 'band i']


def test_background_ten_times_too_high_or_too_low_warns():
    data = simulated(0.05)
    with pytest.warns(BackgroundMismatchWarning, match='below the declared background'):
        check_background(data, 10 * SKY, ['r', 'i'])
    with pytest.warns(BackgroundMismatchWarning, match='far above the declared background'):
        check_background(data, 0.1 * SKY, ['r', 'i'])


def test_image_in_other_units_warns():
    """Nanomaggies (about 1/200 of electrons here): with the sky in electrons the level
    is wrong; with the sky in nanomaggies too, the noise of a sparse field is."""
    data = simulated(0.001)
    with pytest.warns(BackgroundMismatchWarning, match='below the declared background'):
        check_background(data / 200, SKY, ['r', 'i'])
    with pytest.warns(BackgroundMismatchWarning, match='is the image in electrons'):
        check_background(data / 200, SKY / 200, ['r', 'i'])


def test_constant_image_is_an_error():
    with pytest.raises(ValueError, match='band i of the image is constant'):
        check_background(np.stack([simulated(0.05)[0], np.zeros((60, 60))]), SKY, ['r', 'i'])


@pytest.fixture(scope='module')
def deblender():
    return StarNetDeblender(prior=StarFieldPrior(bands=['r', 'i']), psf=PSF,
                            background=SKY.ravel(), hidden=8, tile_hidden=16, stamp_size=7)


def image(data, **meta):
    return NDData(data, unit=u.electron,
                  meta={'bands': ['r', 'i'], 'psf': [PSF, PSF], 'background': SKY.ravel(),
                        **meta})


def test_deblender_checks_its_input(deblender):
    data = simulated(0.05)
    with pytest.raises(ValueError, match='constant'):
        deblender(image(np.zeros_like(data)))
    with pytest.warns(BackgroundMismatchWarning):
        deblender(image(data - SKY))
    with pytest.raises(TypeError, match='real numbers'):
        deblender(image(data > 700))
    with pytest.raises(ValueError, match='has no pixels'):
        deblender(image(np.zeros((2, 0, 0))))
    with pytest.raises(ValueError, match="mask has shape"):
        deblender(NDData(data, unit=u.electron, mask=np.zeros((3, 3), bool),
                         meta=image(data).meta))
    with pytest.raises(ValueError, match="nelec_per_nmgy'] needs one value or one per band"):
        deblender(image(data, nelec_per_nmgy=[800.0, 850.0, 900.0]))
    with pytest.raises(ValueError, match='n_samples must be a positive integer'):
        deblender.sample(image(data), n_samples=0)


@pytest.mark.parametrize('change, message', [
    (dict(batches_per_epoch=-5), 'batches_per_epoch must be a positive integer'),
    (dict(n_epochs=0), 'n_epochs must be a positive integer'),
    (dict(batch_size='2'), "batch_size must be a positive integer, got '2'"),
    (dict(batch_size=True), 'batch_size must be a positive integer'),
    (dict(image_shape=(64,)), r'image_shape must be \(rows, cols\)'),
    (dict(learning_rate=-1e-3), 'learning_rate must be a non-negative number'),
    (dict(weight_decay=float('nan')), 'weight_decay must be a non-negative number'),
    (dict(background_range=(1.6, 0.9)), 'background_range must be'),
    (dict(background_range=(0.0, 1.0)), 'background_range must be'),
    (dict(density_range=(0.1,)), 'density_range must be'),
])
def test_training_settings_are_validated(change, message):
    from starnet.training import TrainingSettings
    with pytest.raises(ValueError, match=message):
        TrainingSettings(**change)


def test_settings_changed_after_construction_are_checked_before_training(deblender):
    from starnet.training import TrainingSettings
    settings = TrainingSettings(n_epochs=1, batches_per_epoch=1, batch_size=2,
                                image_shape=(12, 12), n_validation=2)
    settings.n_epochs = -3
    with pytest.raises(ValueError, match='n_epochs must be a positive integer'):
        deblender.fit(settings=settings, progress=False)
