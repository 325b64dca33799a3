import json
from importlib.resources import files

import numpy as np
import pytest
from astropy.io import fits
from astropy.modeling.models import Gaussian1D
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import (CircularGaussianPRF, CircularGaussianPSF,
                           GriddedPSFModel, ImagePSF, PSFPhotometry)

from starnet.psf import (PowerLawPSF, as_psf, kl_psf_from_psfield,
                         pixel_stamps, psf_from_dict, psf_to_dict)
from starnet.simulate import StarFieldRenderer

DATA = files('starnet') / 'datasets' / 'data'
PSFIELD = DATA / 'sdss' / 'psField-002583-2-0136.fit'
PIXEL_SCALE = 0.396  # arcsec per SDSS pixel


def psf_image(band):
    path = DATA / 'm2' / f'sdss-002583-2-0136-psf-{band}.fits'
    return fits.getdata(path).astype(float)


def centroid(stamp):
    rows, cols = np.indices(stamp.shape)
    total = stamp.sum()
    return (np.sum(cols * stamp) / total, np.sum(rows * stamp) / total)


# values of psField HDU 6 for r and i, as listed in data/m2/SOURCES.txt
@pytest.mark.parametrize(('band', 'expected'), [
    ('r', (0.880, 2.308, 5.0, 3.0, 0.0588, 1e-7)),
    ('i', (0.886, 2.131, 1.558, 2.280, 0.0574, 0.00988))])
def test_from_psfield_reads_band(band, expected):
    psf = PowerLawPSF.from_psfield(PSFIELD, band=band)
    values = [getattr(psf, name).value
              for name in ('sigma1', 'sigma2', 'sigmap', 'beta', 'b', 'p0')]
    np.testing.assert_allclose(values, expected, rtol=2e-3)
    assert psf.flux.value == 1 and psf.x_0.value == 0 and psf.y_0.value == 0
    # photutils fits only flux and position
    free = [name for name in psf.param_names if not psf.fixed[name]]
    assert free == ['flux', 'x_0', 'y_0']


@pytest.mark.parametrize('band', ['r', 'i'])
def test_from_psfield_matches_sdss_psf_image(band):
    psf = PowerLawPSF.from_psfield(PSFIELD, band=band)
    stamp = pixel_stamps(psf, 25, 0.0, 0.0)[0]
    image = psf_image(band)
    corr = np.corrcoef(stamp.ravel(), image.ravel())[0, 1]
    # measured: r 0.9992, i 0.9962 (the i image is the KL PSF, whose core
    # is narrower than the power-law fit)
    assert corr > 0.99
    assert np.unravel_index(np.argmax(stamp), stamp.shape) == (12, 12)


def test_effective_width_matches_psfield_psf_width():
    # psf_width (arcsec) is the width of the Gaussian with the same
    # effective area n_eff = 1 / integral(P^2); in r the power-law PSF is
    # the 2-Gaussian fit (p0 = 1e-7). Measured: 2.626 px vs 2.645 px.
    psf = PowerLawPSF.from_psfield(PSFIELD, band='r')
    step = 0.05
    x = np.arange(-15, 15 + step / 2, step)
    values = psf(x[None, :], x[:, None])
    n_eff = 1 / (np.sum(values ** 2) * step ** 2)
    width = 2 * np.sqrt(2 * np.log(2)) * np.sqrt(n_eff / (4 * np.pi))
    with fits.open(PSFIELD) as hdul:
        psf_width = hdul[6].data['psf_width'].ravel()[2]
    assert width * PIXEL_SCALE == pytest.approx(psf_width, rel=0.02)
    # the FWHM of the profile itself is much narrower (2.143 px)
    assert psf.fwhm == pytest.approx(2.143, abs=1e-3)


def test_fwhm():
    sigma = 1.3
    gaussian = PowerLawPSF(sigma1=sigma, b=0.0, p0=0.0)
    assert gaussian.fwhm == pytest.approx(2 * np.sqrt(2 * np.log(2)) * sigma,
                                          rel=1e-8)
    psf = PowerLawPSF.from_psfield(PSFIELD, band='i', x_0=3.0, y_0=-2.0)
    half = psf.fwhm / 2
    assert psf(3.0 + half, -2.0) == pytest.approx(psf(3.0, -2.0) / 2,
                                                  rel=1e-8)


@pytest.mark.parametrize('params', [
    {'sigma1': 1.0, 'sigma2': 3.0, 'sigmap': 2.0, 'beta': 6.0, 'b': 0.2,
     'p0': 0.1},
    {'sigma1': 0.886, 'sigma2': 2.131, 'sigmap': 1.558, 'beta': 2.28,
     'b': 0.0574, 'p0': 0.00988}])
def test_unit_integral(params):
    # radial integral to R plus the analytic flux of each term outside R
    psf = PowerLawPSF(flux=2.5, **params)
    radius = 200.0
    r = np.linspace(0, radius, 400_001)
    inside = np.trapezoid(2 * np.pi * r * psf(r, 0.0), r)
    s1, s2, sp = params['sigma1'], params['sigma2'], params['sigmap']
    beta, b, p0 = params['beta'], params['b'], params['p0']
    # integrals of the three terms and their fractions beyond the radius
    weights = np.array([s1 ** 2, b * s2 ** 2,
                        p0 * beta * sp ** 2 / (beta - 2)])
    r2 = radius ** 2
    outside = np.array([np.exp(-r2 / (2 * s1 ** 2)),
                        np.exp(-r2 / (2 * s2 ** 2)),
                        (1 + r2 / (beta * sp ** 2)) ** (1 - beta / 2)])
    tail = np.sum(weights * outside) / np.sum(weights)
    assert inside / 2.5 + tail == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(('dx', 'dy'), [(0.0, 0.0), (0.3, -0.2),
                                        (-0.5, 0.45), (0.17, 0.5),
                                        (1.3, -0.7)])
def test_pixel_stamps_flux_and_centroid(dx, dy):
    psf = PowerLawPSF(sigma1=1.5, sigma2=3.0, b=0.1, p0=0.0)
    stamp = pixel_stamps(psf, 31, [dx], [dy])[0]
    assert stamp.sum() == pytest.approx(1.0, abs=1e-4)
    xc, yc = centroid(stamp)
    assert xc - 15 == pytest.approx(dx, abs=0.01)
    assert yc - 15 == pytest.approx(dy, abs=0.01)


def test_pixel_stamps_integrate_over_pixels():
    # CircularGaussianPRF is the exact (erf) pixel integral of the PSF
    fwhm = 0.88 * 2 * np.sqrt(2 * np.log(2))
    dx = np.array([0.0, 0.3, -0.45, 0.5])
    dy = np.array([0.1, -0.45, 0.2, 0.5])
    stamps = pixel_stamps(CircularGaussianPSF(fwhm=fwhm), 25, dx, dy)
    exact = pixel_stamps(CircularGaussianPRF(fwhm=fwhm), 25, dx, dy)
    assert stamps.shape == (4, 25, 25) and stamps.dtype == np.float64
    assert np.max(np.abs(stamps - exact)) < 1e-6 * exact.max()
    # the exact PRF is centred where asked
    yy, xx = np.mgrid[:25, :25]
    direct = CircularGaussianPRF(fwhm=fwhm, x_0=12.3, y_0=11.55)(xx, yy)
    np.testing.assert_allclose(exact[1], direct, atol=1e-15)


def test_pixel_stamps_of_image_reproduce_image():
    image = psf_image('r')
    for psf in (image, ImagePSF(image), ImagePSF(image, x_0=4, flux=3)):
        np.testing.assert_allclose(pixel_stamps(psf, 25, 0.0, 0.0)[0],
                                   image, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pixel_stamps(image, 11, 0.0, 0.0)[0],
                               image[7:18, 7:18], rtol=1e-10, atol=1e-12)
    # beyond the image: zero
    wide = pixel_stamps(image, 31, 0.0, 0.0)[0]
    assert np.all(wide[:3] == 0)
    np.testing.assert_allclose(wide[3:28, 3:28], image, rtol=1e-10)


@pytest.mark.parametrize(('dx', 'dy'), [(0.3, -0.2), (-0.45, 0.25),
                                        (0.5, 0.5)])
def test_pixel_stamps_of_shifted_image(dx, dy):
    image = psf_image('r')
    x0, y0 = centroid(pixel_stamps(image, 25, 0.0, 0.0)[0])
    stamp = pixel_stamps(image, 25, [dx], [dy])[0]
    xc, yc = centroid(stamp)
    assert xc - x0 == pytest.approx(dx, abs=0.01)
    assert yc - y0 == pytest.approx(dy, abs=0.01)
    assert stamp.sum() == pytest.approx(image.sum(), rel=1e-3)


def test_pixel_stamps_oversampled_image():
    # an oversampled ePSF samples the pixel-integrated PSF on a finer grid
    # (photutils convention: it sums to oversampling**2); the offsets here
    # fall on its samples, so the stamps are exact
    fwhm = 2.5
    over = 4
    n = 25 * over + 1
    fine = np.arange(n) / over - (n - 1) / over / 2
    epsf = CircularGaussianPRF(fwhm=fwhm)(fine[None, :], fine[:, None])
    assert epsf.sum() == pytest.approx(over ** 2)
    psf = ImagePSF(epsf, oversampling=over)
    stamps = pixel_stamps(psf, 15, [0.0, 0.25], [0.0, -0.5])
    exact = pixel_stamps(CircularGaussianPRF(fwhm=fwhm), 15, [0.0, 0.25],
                         [0.0, -0.5])
    np.testing.assert_allclose(stamps, exact, atol=1e-12)


def test_as_psf_accepts():
    psf = PowerLawPSF()
    assert as_psf(psf) is psf
    gaussian = CircularGaussianPSF(fwhm=2.0)
    assert as_psf(gaussian) is gaussian
    image = np.zeros((7, 7))
    image[3, 3] = 1.0
    model = as_psf(image)
    assert isinstance(model, ImagePSF)
    assert model.origin.tolist() == [3.0, 3.0]
    assert model.x_0.value == 0 and model.y_0.value == 0
    assert model(0.0, 0.0) == pytest.approx(1.0)


def test_as_psf_errors():
    with pytest.raises(ValueError, match='2-D array; got shape'):
        as_psf(np.ones((2, 7, 7)))
    bad = np.ones((7, 7))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match='finite'):
        as_psf(bad)
    with pytest.raises(ValueError, match='all zero'):
        as_psf(np.zeros((7, 7)))
    with pytest.raises(TypeError, match='psf must be .* got list'):
        as_psf([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(TypeError, match='got Gaussian1D'):
        as_psf(Gaussian1D())
    grid = NDData(np.ones((4, 7, 7)),
                  meta={'grid_xypos': [(0, 0), (10, 0), (0, 10), (10, 10)],
                        'oversampling': 1})
    with pytest.raises(TypeError, match='varies with position'):
        as_psf(GriddedPSFModel(grid))


def test_pixel_stamps_errors():
    psf = PowerLawPSF()
    with pytest.raises(ValueError, match='positive odd integer'):
        pixel_stamps(psf, 24, 0.0, 0.0)
    with pytest.raises(ValueError, match='positive odd integer'):
        pixel_stamps(psf, 25.0, 0.0, 0.0)
    with pytest.raises(ValueError, match='same length'):
        pixel_stamps(psf, 25, [0.0, 0.1], [0.0])
    with pytest.raises(ValueError, match='finite'):
        pixel_stamps(psf, 25, [np.nan], [0.0])
    with pytest.raises(TypeError, match='psf must be'):
        pixel_stamps('psf', 25, 0.0, 0.0)


def test_parameter_errors():
    with pytest.raises(ValueError, match='beta must be > 2'):
        PowerLawPSF(beta=2.0)
    with pytest.raises(ValueError, match='sigma2 must be > 0'):
        PowerLawPSF(sigma2=0.0)
    with pytest.raises(ValueError, match='p0 must be >= 0'):
        PowerLawPSF(p0=-0.1)
    psf = PowerLawPSF()
    psf.beta = 1.5
    with pytest.raises(ValueError, match='beta must be > 2'):
        psf(0.0, 0.0)
    with pytest.raises(ValueError, match="band must be one of"):
        PowerLawPSF.from_psfield(PSFIELD, band='y')


def test_dict_round_trip_power_law():
    psf = PowerLawPSF.from_psfield(PSFIELD, band='i', flux=3.0, x_0=1.5,
                                   y_0=-0.5, bbox_factor=4.0)
    d = json.loads(json.dumps(psf_to_dict(psf)))
    assert d['type'] == 'PowerLawPSF'
    new = psf_from_dict(d)
    assert isinstance(new, PowerLawPSF)
    np.testing.assert_array_equal(new.parameters, psf.parameters)
    assert new.bbox_factor == 4.0
    x = np.linspace(-5, 5, 11)
    np.testing.assert_array_equal(new(x, x[::-1]), psf(x, x[::-1]))


def test_dict_round_trip_image():
    image = psf_image('i')
    psf = ImagePSF(image, origin=(12.0, 11.5), oversampling=(1, 1), flux=2.0)
    d = json.loads(json.dumps(psf_to_dict(psf)))
    assert d['type'] == 'ImagePSF'
    new = psf_from_dict(d)
    assert isinstance(new, ImagePSF)
    np.testing.assert_array_equal(new.data, image)
    assert new.origin.tolist() == [12.0, 11.5]
    assert new.oversampling.tolist() == [1, 1]
    assert new.flux.value == 2.0
    x = np.linspace(-5, 5, 11)
    np.testing.assert_array_equal(new(x, x[::-1]), psf(x, x[::-1]))
    # a numpy array is saved as its ImagePSF
    from_array = psf_from_dict(json.loads(json.dumps(psf_to_dict(image))))
    np.testing.assert_array_equal(from_array.data, image)


def test_dict_errors():
    class MyPSF(CircularGaussianPSF):
        pass
    with pytest.raises(TypeError, match='only PowerLawPSF, ImagePSF'):
        psf_to_dict(MyPSF())
    with pytest.raises(ValueError, match="d\\['type'\\] must be"):
        psf_from_dict({'type': 'MoffatPSF'})


def test_photutils_make_model_image_conserves_flux():
    psf = PowerLawPSF.from_psfield(PSFIELD, band='r')
    params = QTable({'x_0': [20.0, 41.3, 30.7], 'y_0': [25.0, 38.6, 52.2],
                     'flux': [1000.0, 2500.0, 400.0]})
    image = make_model_image((80, 70), psf, params,
                             discretize_method='oversample')
    assert image.sum() == pytest.approx(3900.0, rel=1e-4)
    assert np.unravel_index(np.argmax(image), image.shape) == (39, 41)


def test_photutils_psf_photometry():
    psf = PowerLawPSF.from_psfield(PSFIELD, band='r')
    truth = QTable({'x_0': [15.3, 24.8], 'y_0': [14.6, 25.2],
                    'flux': [1500.0, 800.0]})
    image = make_model_image((40, 40), psf, truth)
    init = QTable({'x': [15.0, 25.0], 'y': [15.0, 25.0],
                   'flux': [1000.0, 1000.0]})
    phot = PSFPhotometry(psf, (9, 9))
    result = phot(image, init_params=init)
    np.testing.assert_allclose(result['x_fit'], truth['x_0'], atol=1e-4)
    np.testing.assert_allclose(result['y_fit'], truth['y_0'], atol=1e-4)
    np.testing.assert_allclose(result['flux_fit'], truth['flux'], rtol=1e-4)


# --- the SDSS KL PSF (psField HDUs 1-5) -------------------------------------

# The bundled 25 x 25 images were made by other code (IDL, MWRFITS header)
# from the same psField: its raw KL reconstruction, not normalised, at frame
# row 600, column 500 (photoop's sdss_psf_recon at its example position
# x=600, y=500 reads the coefficients transposed, see kl_psf_from_psfield).
BUNDLED_KL_POSITION = {'row': 600.0, 'col': 500.0}


@pytest.mark.parametrize('band', ['r', 'i'])
def test_kl_psf_reproduces_bundled_psf_image(band):
    psf = kl_psf_from_psfield(PSFIELD, band=band, **BUNDLED_KL_POSITION)
    image = psf_image(band)
    # the bundled images are the unnormalised reconstruction (sum ~1.019)
    assert image.sum() == pytest.approx(1.0186 if band == 'r' else 1.0140,
                                        abs=1e-4)
    expected = image / image.sum()
    # measured: max |diff| 8.5e-9 (r), 7.2e-9 (i): float32 rounding
    assert np.max(np.abs(psf.data - expected)) < 1e-7
    assert np.sum(np.abs(psf.data - expected)) < 1e-6


def test_kl_psf_position_of_bundled_r_image():
    # the r KL PSF varies with position (the i one of this field does not):
    # the bundled r image is matched at its position only
    image = psf_image('r')
    image = image / image.sum()
    errors = {}
    for row, col in [(600.0, 500.0), (500.0, 600.0), (680.0, 360.0),
                     (620.0, 500.0), (600.0, 520.0)]:
        psf = kl_psf_from_psfield(PSFIELD, band='r', row=row, col=col)
        errors[row, col] = np.max(np.abs(psf.data - image))
    assert min(errors, key=errors.get) == (600.0, 500.0)
    assert errors[600.0, 500.0] < 1e-7
    assert all(error > 2e-6 for key, error in errors.items()
               if key != (600.0, 500.0))


@pytest.mark.parametrize('band', ['r', 'i'])
@pytest.mark.parametrize('size', [5, 25, 51])
def test_kl_psf_unit_sum_and_centre(band, size):
    psf = kl_psf_from_psfield(PSFIELD, band=band, row=680.0, col=360.0,
                              size=size)
    assert isinstance(psf, ImagePSF)
    assert psf.data.shape == (size, size) and psf.data.dtype == np.float64
    assert psf.data.sum() == pytest.approx(1.0, rel=1e-12)
    assert psf.flux.value == 1 and psf.x_0.value == 0 and psf.y_0.value == 0
    half = size // 2
    assert np.unravel_index(psf.data.argmax(), psf.data.shape) == (half,
                                                                   half)
    # the core is centred (measured: 3 x 3 centroid 0.003-0.005 px, peak
    # -0.01 px by a quadratic fit); the asymmetric wings move the first
    # moment of the whole image by up to 0.06 px
    core = psf.data[half - 1:half + 2, half - 1:half + 2]
    xc, yc = centroid(core)
    assert abs(xc - 1) < 0.01 and abs(yc - 1) < 0.01
    xc, yc = centroid(psf.data)
    assert abs(xc - half) < 0.1 and abs(yc - half) < 0.1


@pytest.mark.parametrize('band', ['r', 'i'])
def test_kl_psf_recenter(band):
    psf = kl_psf_from_psfield(PSFIELD, band=band, row=680.0, col=360.0,
                              recenter=True)
    raw = kl_psf_from_psfield(PSFIELD, band=band, row=680.0, col=360.0)
    assert psf.data.sum() == pytest.approx(1.0, rel=1e-12)
    xc, yc = centroid(psf.data)
    assert xc == pytest.approx(12, abs=1e-4)
    assert yc == pytest.approx(12, abs=1e-4)
    xr, yr = centroid(raw.data)
    assert abs(xr - 12) > 0.03  # the raw image needed the shift
    # a shift of a few hundredths of a pixel, not a different PSF
    assert 0.005 < np.abs(psf.data - raw.data).sum() / 2 < 0.04


def test_kl_psf_varies_smoothly_with_position():
    def kl(row, col):
        return kl_psf_from_psfield(PSFIELD, band='r', row=row, col=col).data

    corner, far = kl(0.0, 0.0), kl(1488.0, 2047.0)
    # measured: half the L1 difference 0.045, max |diff| 0.012
    assert np.abs(corner - far).sum() / 2 > 0.01
    assert np.max(np.abs(corner - far)) > 1e-3
    # smooth: a pixel's step changes the image by ~1e-5 of the difference
    near = kl(1.0, 0.0)
    assert np.abs(corner - near).sum() < 1e-2 * np.abs(corner - far).sum()
    # and the weights are polynomials (bilinear here): the midpoint is
    # close to the mean of the ends along a row
    mid = kl(744.0, 0.0)
    ends = 0.5 * (kl(0.0, 0.0) + kl(1488.0, 0.0))
    assert np.max(np.abs(mid - ends)) < 0.05 * np.max(np.abs(corner - far))
    # i: nrow_b = ncol_b = 1 in this psField, the same PSF everywhere
    np.testing.assert_array_equal(
        kl_psf_from_psfield(PSFIELD, band='i', row=0.0, col=0.0).data,
        kl_psf_from_psfield(PSFIELD, band='i', row=1400.0, col=2000.0).data)


def test_kl_psf_works_as_starnet_psf():
    psf = kl_psf_from_psfield(PSFIELD, band='r', row=680.0, col=360.0)
    assert as_psf(psf) is psf
    # pixel_stamps samples the pixel image, without integrating it again
    np.testing.assert_allclose(pixel_stamps(psf, 25, 0.0, 0.0)[0], psf.data,
                               rtol=1e-10, atol=1e-14)
    stamp = pixel_stamps(psf, 25, [0.3], [-0.2])[0]
    x0, y0 = centroid(psf.data)
    xc, yc = centroid(stamp)
    assert xc - x0 == pytest.approx(0.3, abs=0.01)
    assert yc - y0 == pytest.approx(-0.2, abs=0.01)
    # saved in a model file
    new = psf_from_dict(json.loads(json.dumps(psf_to_dict(psf))))
    assert isinstance(new, ImagePSF)
    np.testing.assert_array_equal(new.data, psf.data)
    # rendered by the simulator
    renderer = StarFieldRenderer([psf], stamp_size=25)
    np.testing.assert_allclose(renderer.psfs[0].data, psf.data)


def test_kl_psf_close_to_power_law():
    # the power law of HDU 6 is PHOTO's fit to the KL PSF
    for band in 'ri':
        kl = kl_psf_from_psfield(PSFIELD, band=band, row=680.0, col=360.0)
        law = pixel_stamps(PowerLawPSF.from_psfield(PSFIELD, band=band), 25,
                           0.0, 0.0)[0]
        law = law / law.sum()
        assert np.corrcoef(kl.data.ravel(), law.ravel())[0, 1] > 0.99


def test_kl_psf_errors(tmp_path):
    with pytest.raises(ValueError, match='band must be one of'):
        kl_psf_from_psfield(PSFIELD, band='y', row=0.0, col=0.0)
    for size in (4, 3, 53, 25.0, True):
        with pytest.raises(ValueError, match='odd integer from 5 to 51'):
            kl_psf_from_psfield(PSFIELD, band='r', row=0.0, col=0.0,
                                size=size)
    with pytest.raises(ValueError, match='finite'):
        kl_psf_from_psfield(PSFIELD, band='r', row=np.nan, col=0.0)
    with pytest.raises(TypeError, match='must be numbers'):
        kl_psf_from_psfield(PSFIELD, band='r', row='centre', col=0.0)
    with pytest.raises(TypeError):
        kl_psf_from_psfield(PSFIELD, 'r', 0.0, 0.0)  # keyword-only
    # a FITS file that is not a psField
    path = tmp_path / 'not-psfield.fits'
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name='a', format='E', array=np.zeros(2))])]).writeto(path)
    with pytest.raises(ValueError, match='has no binary table in HDU 3'):
        kl_psf_from_psfield(path, band='r', row=0.0, col=0.0)
    with pytest.raises(ValueError, match='not a KL PSF basis'):
        kl_psf_from_psfield(path, band='u', row=0.0, col=0.0)


def test_photutils_models_are_saved_and_loaded(tmp_path):
    """A model trained for a photutils PSF saves and loads it (it once failed at save)."""
    from photutils.psf import CircularGaussianPRF, MoffatPSF
    from starnet import StarFieldPrior, StarNetDeblender
    from starnet.psf import psf_from_dict, psf_to_dict
    for psf in (CircularGaussianPRF(fwhm=3.0), MoffatPSF(alpha=2.0, beta=3.5)):
        again = psf_from_dict(json.loads(json.dumps(psf_to_dict(psf))))
        assert type(again) is type(psf)
        np.testing.assert_allclose(again.parameters, psf.parameters)
    deblender = StarNetDeblender(prior=StarFieldPrior(bands=['r']),
                                 psf=CircularGaussianPRF(fwhm=3.0), background=[500.0],
                                 hidden=4, tile_hidden=8, stamp_size=9)
    deblender.save(tmp_path / 'model.pt')
    loaded = StarNetDeblender.load(tmp_path / 'model.pt')
    assert loaded.psfs[0].fwhm.value == 3.0
    with pytest.raises(ValueError, match='unknown photutils PSF model'):
        psf_from_dict({'type': 'photutils', 'class': 'os.system'})


def test_unsavable_psf_is_refused_before_training():
    """A PSF model of the user's own class: refused when the model is made, not at save."""
    from starnet import StarFieldPrior, StarNetDeblender

    class MyPSF(CircularGaussianPRF):
        pass
    with pytest.raises(TypeError, match='got MyPSF: render it as an array'):
        StarNetDeblender(prior=StarFieldPrior(bands=['r']), psf=MyPSF(fwhm=3.0),
                         background=[500.0])


@pytest.mark.parametrize("size", [5, 9, 15])
def test_stamp_light_of_a_gaussian_is_the_analytic_fraction(size):
    """A circular Gaussian of width sigma puts erf(s / (2 sqrt(2) sigma))**2 of its
    light in a square of side s."""
    from scipy.special import erf
    from photutils.psf import CircularGaussianPRF
    from starnet.psf import stamp_light
    sigma = 2.0
    psf = CircularGaussianPRF(fwhm=sigma * 2 * np.sqrt(2 * np.log(2)))
    assert stamp_light(psf, size) == pytest.approx(erf(size / (2 * np.sqrt(2) * sigma)) ** 2,
                                                   abs=1e-6)


def test_stamp_size_holds_the_light_and_a_short_stamp_is_reported():
    """A wide-winged Moffat: the default stamp is the first width holding 99.5 % of
    its light; the old 25 pixels hold 98.6 % and the deblender says so when it is
    fitted (not when a trained model is loaded)."""
    from photutils.psf import MoffatPSF
    from starnet import StarFieldPrior, StarNetDeblender
    from starnet.psf import choose_stamp_size, stamp_light
    moffat = MoffatPSF(alpha=3.0, beta=2.367)
    size = choose_stamp_size(moffat)
    assert stamp_light(moffat, size) >= 0.995 > stamp_light(moffat, size - 2)
    prior = StarFieldPrior(mu=0.05, f_min=300.0, bands=["r"])
    assert StarNetDeblender(prior=prior, psf=moffat, background=[300.0]).stamp_size == size
    short = StarNetDeblender(prior=prior, psf=moffat, background=[300.0], stamp_size=25,
                             hidden=4, tile_hidden=8)
    with pytest.warns(UserWarning, match="25-pixel PSF stamp holds 98.6% of the light"):
        short.fit(n_steps=1, batch_size=1, image_shape=(12, 12), n_validation=1,
                  progress=False, compare_photutils=False)
