from importlib.resources import files

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.io import fits
from astropy.nddata import NDData
from astropy.table import QTable
from photutils.datasets import make_model_image
from photutils.psf import ImagePSF
from scipy import stats

from starnet import PowerLawPSF, StarFieldPrior, simulate_starfield
from starnet.simulate import StarFieldRenderer, add_noise, as_background

DATA = files('starnet') / 'datasets' / 'data'
PSFIELD = DATA / 'sdss' / 'psField-002583-2-0136.fit'
BACKGROUND = [686.0, 1123.0]  # SDSS sky of the M2 field in r and i, electrons
P_MIN = 1e-3  # significance level of the statistical tests (fixed seeds)


def psf_image(band):
    return fits.getdata(DATA / 'm2' / f'sdss-002583-2-0136-psf-{band}.fits').astype(float)


def centroid(image):
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return np.sum(cols * image) / total, np.sum(rows * image) / total


def render(renderer, x, y, fluxes, shape):
    """Render stars at ``x``, ``y`` with ``fluxes`` (n, n_bands): (n_bands, rows, cols)."""
    locs = torch.tensor(np.stack([x, y], axis=-1), dtype=torch.float32)[None]
    fluxes = torch.tensor(np.ascontiguousarray(fluxes), dtype=torch.float32)[None]
    mask = torch.ones(locs.shape[:2], dtype=torch.bool)
    return renderer.render(locs, fluxes, mask, shape)[0].double().numpy()


@pytest.fixture(scope='module')
def image_renderer():
    return StarFieldRenderer([psf_image('r')])


@pytest.fixture(scope='module')
def narrow_psf():
    # nearly all the light within 7 px of the centre: a 25 x 25 stamp holds it all
    return PowerLawPSF(sigma1=1.0, sigma2=2.0, b=0.05, p0=0.0)


@pytest.fixture(scope='module')
def narrow_renderer(narrow_psf):
    return StarFieldRenderer([narrow_psf], stamp_size=25)


@pytest.fixture(scope='module')
def ri_simulation():
    prior = StarFieldPrior(mu=0.05)
    kwargs = dict(prior=prior, psf=[psf_image('r'), psf_image('i')], background=BACKGROUND,
                  stamp_size=15)
    image, truth = simulate_starfield((30, 40), noise=None, seed=5, **kwargs)
    return image, truth, kwargs


@pytest.mark.parametrize('psf', ['power law r', 'image r'])
def test_flux_is_conserved(psf):
    psf = PowerLawPSF.from_psfield(PSFIELD, band='r') if psf == 'power law r' else psf_image('r')
    renderer = StarFieldRenderer([psf])
    rng = np.random.default_rng(0)
    # stars at least 12.5 px (half the stamp) inside the image keep all their light
    x, y = rng.uniform(12.5, 47.5, (2, 30))
    fluxes = rng.uniform(1e3, 1e5, (30, 1))
    image = render(renderer, x, y, fluxes, (60, 60))
    assert image.sum() == pytest.approx(fluxes.sum(), rel=1e-4)
    # a lone star keeps its flux at any sub-pixel offset (to float32 precision):
    # one image per offset on a 21 x 21 grid spanning a pixel
    offsets = np.linspace(-0.5, 0.5, 21)
    dx, dy = (v.ravel() for v in np.meshgrid(offsets, offsets))
    locs = torch.tensor(np.stack([15 + dx, 15 + dy], axis=-1), dtype=torch.float32)[:, None]
    lone = renderer.render(locs, torch.ones(len(dx), 1, 1), torch.ones(len(dx), 1, dtype=bool),
                           (31, 31))
    np.testing.assert_allclose(lone.double().sum(dim=(1, 2, 3)), 1.0, rtol=1e-5)


@pytest.mark.parametrize(('dx', 'dy'), [(0.0, 0.0), (0.3, -0.2), (-0.45, 0.12), (0.5, 0.5),
                                        (-0.5, -0.37), (0.011, 0.49)])
def test_centroid_of_lone_star(narrow_renderer, dx, dy):
    image = render(narrow_renderer, [20 + dx], [18 + dy], [[500.0]], (41, 41))[0]
    xc, yc = centroid(image)
    assert xc == pytest.approx(20 + dx, abs=0.01)
    assert yc == pytest.approx(18 + dy, abs=0.01)


@pytest.mark.parametrize(('dx', 'dy'), [(0.3, -0.2), (-0.45, 0.12), (0.5, 0.5)])
def test_centroid_moves_with_image_psf(image_renderer, dx, dy):
    # the PSF image is not exactly centred on its central pixel: compare shifts
    x0, y0 = centroid(render(image_renderer, [20.0], [20.0], [[1.0]], (41, 41))[0])
    xc, yc = centroid(render(image_renderer, [20 + dx], [20 + dy], [[1.0]], (41, 41))[0])
    assert xc - x0 == pytest.approx(dx, abs=0.01)
    assert yc - y0 == pytest.approx(dy, abs=0.01)


def test_agrees_with_photutils_rendering():
    # the PSF image is pixel-integrated, so photutils evaluates it at pixel centres
    # ('center'); both use the image normalised to unit sum
    image = psf_image('r')
    image /= image.sum()
    renderer = StarFieldRenderer([image], stamp_size=25, tolerance=1e-4)
    x = np.array([8.0, 20.3, 31.45, 9.62, 30.5, 20.031])
    y = np.array([8.0, 9.8, 10.17, 30.5, 29.5, 31.969])
    fluxes = np.array([1.0, 2.0, 1.5, 0.5, 3.0, 1.0])
    ours = render(renderer, x, y, fluxes[:, None], (40, 40))[0]
    table = QTable({'x_0': x, 'y_0': y, 'flux': fluxes})
    theirs = make_model_image((40, 40), ImagePSF(image), table, model_shape=(25, 25))
    difference = np.max(np.abs(ours - theirs)) / theirs.max()
    # measured: 3.3e-4 of the peak. Sources of difference: the renderer rescales each
    # stamp to unit sum where photutils' spline-shifted stamps sum to 1 +- 4e-4; the
    # rank-24 representation (Frobenius tolerance 1e-4); bilinear interpolation
    # between offsets 1/32 px apart (~(1/32)^2 / 8 of the curvature, ~1e-4 of the peak)
    assert difference < 1e-3


def test_stars_outside_shine_in(image_renderer):
    # a star at x = -2 lights column 0 exactly as a wider image sees it
    x, y, fluxes = np.array([-2.0, 21.3, 5.0]), np.array([10.4, 5.0, -1.6]), [[1e4]] * 3
    image = render(image_renderer, x, y, fluxes, (20, 20))
    wide = render(image_renderer, x + 10, y + 10, fluxes, (40, 40))[:, 10:30, 10:30]
    np.testing.assert_allclose(image, wide, rtol=0, atol=1e-5 * 1e4)
    assert image[0, :, 0].sum() > 0.05 * 1e4
    # beyond half a stamp (12 px) a star has no light left in the image
    far = render(image_renderer, [-12.6, 10.0], [10.0, 32.6], [[1e4], [1e4]], (20, 20))
    assert np.all(far == 0)


def test_multiband_psf_per_band_and_order(narrow_psf):
    wide_psf = PowerLawPSF(sigma1=2.0, sigma2=4.0, b=0.05, p0=0.0)
    settings = dict(stamp_size=15, phase_steps=16)
    # stars 7.5 px (half a stamp) inside the image: all their light stays in it
    x, y, fluxes = [10.3, 14.8], [12.6, 9.1], [[100.0, 300.0], [50.0, 20.0]]
    both = render(StarFieldRenderer([narrow_psf, wide_psf], **settings), x, y, fluxes, (25, 25))
    narrow = render(StarFieldRenderer([narrow_psf], **settings), x, y, [[100.0], [50.0]],
                    (25, 25))[0]
    wide = render(StarFieldRenderer([wide_psf], **settings), x, y, [[300.0], [20.0]],
                  (25, 25))[0]
    assert both.shape == (2, 25, 25)
    np.testing.assert_allclose(both[0], narrow, atol=1e-4)
    np.testing.assert_allclose(both[1], wide, atol=1e-4)
    assert both[0].sum() == pytest.approx(150.0, rel=1e-4)
    assert both[1].sum() == pytest.approx(320.0, rel=1e-4)
    assert both[0].max() / 150 > 2 * both[1].max() / 320  # the narrow PSF is more peaked
    # swapping the PSFs and the flux columns swaps the bands
    swapped = render(StarFieldRenderer([wide_psf, narrow_psf], **settings), x, y,
                     np.asarray(fluxes)[:, ::-1], (25, 25))
    np.testing.assert_allclose(swapped, both[::-1], atol=1e-4)


def test_renderer_batch_and_input_types(narrow_psf):
    renderer = StarFieldRenderer([narrow_psf], stamp_size=15, phase_steps=16)
    assert renderer.n_bands == 1 and len(renderer.ranks) == 1 and renderer.ranks[0] >= 1
    locs = torch.tensor([[[5.2, 6.7], [0.0, 0.0]], [[9.0, 3.4], [2.5, 8.1]]])
    fluxes = torch.tensor([[[10.0], [99.0]], [[20.0], [30.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    images = renderer.render(locs, fluxes, mask, (12, 14))
    assert images.shape == (2, 1, 12, 14)
    # masked slots are ignored; each image of the batch is rendered on its own
    alone = renderer.render(locs[:1, :1], fluxes[:1, :1], mask[:1, :1], (12, 14))
    np.testing.assert_allclose(images[0], alone[0], atol=1e-5)
    # float64 inputs are accepted
    double = renderer.render(locs.double(), fluxes.double(), mask, (12, 14))
    np.testing.assert_allclose(double, images, atol=1e-5)


def test_a_batch_rendered_in_chunks_is_each_image_rendered_alone(narrow_psf, monkeypatch):
    """`render` takes a few images at a time (their maps stay in the cache): chunks of one
    and of three images (the last one short) give each image as rendered on its own."""
    from starnet import simulate
    renderer = StarFieldRenderer([narrow_psf, narrow_psf], stamp_size=15, phase_steps=16)
    generator = torch.Generator().manual_seed(3)
    locs = 30 * torch.rand(7, 12, 2, generator=generator) - 3     # some outside the image
    fluxes = 1000 * torch.rand(7, 12, 2, generator=generator) + 10
    mask = torch.rand(7, 12, generator=generator) < 0.8
    alone = torch.cat([renderer.render(locs[k:k + 1], fluxes[k:k + 1], mask[k:k + 1],
                                       (24, 20)) for k in range(7)])
    rank = max(renderer.ranks)
    for per_chunk in (1, 3):
        monkeypatch.setattr(simulate, "_CHUNK_VALUES", per_chunk * rank * 38 * 34)
        together = renderer.render(locs, fluxes, mask, (24, 20))
        np.testing.assert_allclose(together.numpy(), alone.numpy(), atol=1e-3)
        assert float(alone.abs().max()) > 50


def test_renderer_errors(narrow_psf):
    with pytest.raises(ValueError, match='stamp_size must be an odd integer >= 3, got 24'):
        StarFieldRenderer([narrow_psf], stamp_size=24)
    renderer = StarFieldRenderer([narrow_psf, narrow_psf], stamp_size=9, phase_steps=4)
    with pytest.raises(ValueError, match='fluxes have 1 bands but the renderer has 2 PSFs'):
        renderer.render(torch.zeros(1, 1, 2), torch.ones(1, 1, 1),
                        torch.ones(1, 1, dtype=torch.bool), (10, 10))


@pytest.mark.parametrize('lam', [3.7, 686.0])
def test_gaussian_noise_has_variance_lambda(lam):
    n = 200 * 250
    expected = torch.full((2, 200, 125), lam, dtype=torch.float64)
    draws = add_noise(expected, noise='gaussian', generator=torch.Generator().manual_seed(0))
    assert draws.shape == expected.shape and draws.dtype == torch.float64
    values = draws.numpy().ravel()
    z = (values.mean() - lam) / np.sqrt(lam / n)
    assert 2 * stats.norm.sf(abs(z)) > P_MIN
    # (n - 1) s^2 / lambda is chi2(n - 1) for Normal(lambda, lambda) draws
    cdf = stats.chi2.cdf((n - 1) * values.var(ddof=1) / lam, n - 1)
    assert 2 * min(cdf, 1 - cdf) > P_MIN
    assert stats.kstest(values, stats.norm(lam, np.sqrt(lam)).cdf).pvalue > P_MIN


@pytest.mark.parametrize('lam', [3.7, 686.0])
def test_poisson_noise_has_variance_lambda(lam):
    n = 200 * 250
    expected = torch.full((2, 200, 125), lam, dtype=torch.float64)
    draws = add_noise(expected, noise='poisson', generator=torch.Generator().manual_seed(1))
    values = draws.numpy().ravel()
    assert np.all(values == np.round(values)) and values.min() >= 0
    z = (values.mean() - lam) / np.sqrt(lam / n)
    assert 2 * stats.norm.sf(abs(z)) > P_MIN
    # variance of the sample variance of Poisson draws: (lambda + 2 lambda^2) / n
    z = (values.var(ddof=1) - lam) / np.sqrt((lam + 2 * lam**2) / n)
    assert 2 * stats.norm.sf(abs(z)) > P_MIN


def test_add_noise_none_and_errors():
    expected = torch.tensor([1.0, 2.0])
    assert add_noise(expected, noise=None) is expected
    with pytest.raises(ValueError, match='non-negative'):
        add_noise(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError,
                       match="noise must be 'gaussian', 'poisson' or None, got 'normal'"):
        add_noise(expected, noise='normal')


def test_as_background():
    np.testing.assert_array_equal(as_background(500.0, 2), [500.0, 500.0])
    np.testing.assert_array_equal(as_background(BACKGROUND, 2), BACKGROUND)
    np.testing.assert_array_equal(as_background(BACKGROUND * u.electron, 2), BACKGROUND)
    with pytest.raises(u.UnitConversionError):
        as_background(5.0 * u.adu, 1)
    bg_map = np.full((2, 5, 6), 100.0)
    assert as_background(bg_map, 2, (5, 6)).shape == (2, 5, 6)
    assert as_background(bg_map, 2).dtype == np.float64
    with pytest.raises(ValueError, match='background has 3 values but there are 2 bands'):
        as_background([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match=r'background map has shape \(2, 5, 6\), expected '
                                         r'\(2, rows, cols\) matching the image \(5, 7\)'):
        as_background(bg_map, 2, (5, 7))
    with pytest.raises(ValueError, match='background map has shape'):
        as_background(bg_map, 3)
    with pytest.raises(ValueError, match=r'got an array of shape \(5, 6\)'):
        as_background(np.ones((5, 6)), 2)
    with pytest.raises(ValueError, match='finite and positive'):
        as_background([686.0, -1.0], 2)
    with pytest.raises(ValueError, match='finite and positive'):
        as_background(np.nan, 2)


def test_simulate_starfield_output_form(ri_simulation):
    image, truth, _ = ri_simulation
    assert isinstance(image, NDData)
    assert image.data.shape == (2, 30, 40) and image.data.dtype == np.float64
    assert image.unit == u.electron
    assert image.meta['bands'] == ['r', 'i']
    assert len(image.meta['psf']) == 2
    assert all(isinstance(psf, ImagePSF) for psf in image.meta['psf'])
    np.testing.assert_array_equal(image.meta['psf'][1].data, psf_image('i'))
    assert isinstance(image.meta['background'], np.ndarray)
    np.testing.assert_array_equal(image.meta['background'], BACKGROUND)
    assert image.meta['prior'] == StarFieldPrior(mu=0.05).to_dict()
    assert isinstance(truth, QTable)
    assert truth.colnames == ['x', 'y', 'flux_r', 'flux_i']
    assert truth['flux_r'].unit == u.electron
    assert len(truth) > 0


def test_simulate_starfield_is_background_plus_rendered_truth(ri_simulation):
    image, truth, _ = ri_simulation
    renderer = StarFieldRenderer([psf_image('r'), psf_image('i')], stamp_size=15)
    fluxes = np.stack([truth['flux_r'].value, truth['flux_i'].value], axis=-1)
    stars = render(renderer, truth['x'], truth['y'], fluxes, (30, 40))
    expected = stars + np.reshape(BACKGROUND, (2, 1, 1))
    np.testing.assert_allclose(image.data, expected, rtol=1e-6, atol=1e-3)


def test_simulate_starfield_background_map(ri_simulation):
    flat, _, kwargs = ri_simulation
    rows, cols = np.indices((30, 40))
    bg_map = np.stack([686.0 + 2 * cols, 1123.0 + 3 * rows])
    image, _ = simulate_starfield((30, 40), noise=None, seed=5, **{**kwargs, 'background': bg_map})
    assert image.meta['background'].shape == (2, 30, 40)
    np.testing.assert_array_equal(image.meta['background'], bg_map)
    # the same seed draws the same stars over a different background
    np.testing.assert_allclose(image.data - bg_map,
                               flat.data - np.reshape(BACKGROUND, (2, 1, 1)), atol=1e-6)
    scalar, _ = simulate_starfield((30, 40), noise=None, seed=5, **{**kwargs, 'background': 500.0})
    np.testing.assert_array_equal(scalar.meta['background'], [500.0, 500.0])


def test_simulate_starfield_noise(ri_simulation):
    noiseless, truth, kwargs = ri_simulation
    noisy, noisy_truth = simulate_starfield((30, 40), noise='gaussian', seed=5, **kwargs)
    # the noise is drawn after the catalog: same stars, noisy pixels
    np.testing.assert_array_equal(noisy_truth['x'], truth['x'])
    residual = ((noisy.data - noiseless.data) / np.sqrt(noiseless.data)).ravel()
    n = residual.size
    assert 2 * stats.norm.sf(abs(residual.mean()) * np.sqrt(n)) > P_MIN
    cdf = stats.chi2.cdf(np.sum(residual**2), n)
    assert 2 * min(cdf, 1 - cdf) > P_MIN
    counts, _ = simulate_starfield((30, 40), noise='poisson', seed=5, **kwargs)
    assert np.all(counts.data == np.round(counts.data))


def test_simulate_starfield_seeds(narrow_psf):
    kwargs = dict(psf=narrow_psf, background=BACKGROUND, stamp_size=9)
    first, first_truth = simulate_starfield((30, 40), seed=8, **kwargs)
    again, again_truth = simulate_starfield((30, 40), seed=8, **kwargs)
    other, _ = simulate_starfield((30, 40), seed=9, **kwargs)
    np.testing.assert_array_equal(first.data, again.data)
    np.testing.assert_array_equal(first_truth['flux_i'], again_truth['flux_i'])
    assert not np.array_equal(first.data, other.data)


def test_simulate_starfield_margin_and_single_psf(narrow_psf):
    prior = StarFieldPrior(mu=0.1)
    image, truth = simulate_starfield((20, 20), prior=prior, psf=narrow_psf, background=100.0,
                                      margin=4.0, seed=3, stamp_size=15)
    assert len(image.meta['psf']) == 2 and image.meta['psf'][0] is narrow_psf
    outside = (truth['x'] < -0.5) | (truth['x'] > 19.5) | (truth['y'] < -0.5) | (truth['y'] > 19.5)
    assert np.any(outside)
    assert np.all((truth['x'] >= -4.5) & (truth['x'] <= 23.5))


def test_simulate_starfield_default_prior(narrow_psf):
    image, truth = simulate_starfield((20, 20), psf=narrow_psf, background=BACKGROUND, seed=0,
                                      stamp_size=15)
    assert image.meta['prior'] == StarFieldPrior().to_dict()
    assert truth.colnames == ['x', 'y', 'flux_r', 'flux_i']


def test_simulate_starfield_errors(narrow_psf):
    with pytest.raises(ValueError, match=r"got 1 PSFs for 2 bands \['r', 'i'\]"):
        simulate_starfield((20, 20), psf=[narrow_psf], background=BACKGROUND)
    with pytest.raises(ValueError, match=r'background map has shape \(2, 10, 10\)'):
        simulate_starfield((20, 20), psf=narrow_psf, background=np.ones((2, 10, 10)))
    with pytest.raises(ValueError, match='background has 3 values but there are 2 bands'):
        simulate_starfield((20, 20), psf=narrow_psf, background=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match='finite and positive'):
        simulate_starfield((20, 20), psf=narrow_psf, background=[686.0, -5.0])
    with pytest.raises(ValueError, match="noise must be 'gaussian', 'poisson' or None"):
        simulate_starfield((20, 20), psf=narrow_psf, background=BACKGROUND, noise='normal',
                           stamp_size=9)


def test_simulate_starfield_density_map(narrow_psf):
    """A density map: per-region counts are Poisson with the map's sum as mean, and no
    star falls where the density is zero."""
    # one tall image holds as many stars as twenty 60 x 80 ones
    density = np.zeros((1200, 80))
    density[:, :30] = 0.2
    density[:, 50:] = 0.02
    _, truth = simulate_starfield(density.shape, psf=narrow_psf, background=[100.0, 100.0],
                                  density=density, seed=0, noise=None)
    x = np.asarray(truth['x'])
    assert not np.any((x > 29.5) & (x < 49.5))
    counts = np.array([np.sum(x < 29.5), np.sum(x > 49.5)])
    expected = np.array([0.2 * 1200 * 30, 0.02 * 1200 * 30])
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected))
    shape = (60, 80)
    density = density[:60]
    _, truth = simulate_starfield(shape, psf=narrow_psf, background=[100.0, 100.0],
                                  density=density, seed=0, margin=4, noise=None)
    x, y = np.asarray(truth['x']), np.asarray(truth['y'])
    assert x.min() < -0.5 and y.min() < -0.5 and x.max() >= 79.5 and y.max() >= 59.5
    assert x.min() >= -4.5 and y.max() < 63.5
    with pytest.raises(ValueError, match='density must be a map'):
        simulate_starfield(shape, psf=narrow_psf, background=100.0, density=density[1:])
    with pytest.raises(ValueError, match='density must be a map'):
        simulate_starfield(shape, psf=narrow_psf, background=100.0, density=-density)
