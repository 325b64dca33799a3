import json

import numpy as np
import pytest
from photutils.utils.exceptions import NoDetectionsWarning
import torch
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable
from astropy.wcs import WCS
from scipy import stats

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield

SHAPE = (16, 16)
BANDS = ['r', 'i']
BACKGROUND = [686.0, 1123.0]
PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
PRIOR = StarFieldPrior(mu=0.05, bands=BANDS)
SMALL = dict(hidden=8, tile_hidden=16, stamp_size=7)
BASE_COLUMNS = ['id', 'x_fit', 'y_fit', 'x_err', 'y_err',
                'flux_r', 'flux_r_err', 'flux_r_q05', 'flux_r_q95', 'mag_r', 'mag_r_err',
                'flux_i', 'flux_i_err', 'flux_i_q05', 'flux_i_q95', 'mag_i', 'mag_i_err',
                'detection_prob', 'flags']


def tiny_deblender(**kwargs):
    return StarNetDeblender(prior=PRIOR, psf=PSF, background=BACKGROUND, **{**SMALL, **kwargs})


@pytest.fixture(scope='module')
def trained():
    """A deblender after two gradient steps: enough to have a history to save."""
    deblender = tiny_deblender()
    deblender.fit(n_epochs=1, batches_per_epoch=2, batch_size=2, image_shape=SHAPE,
                  n_validation=2, progress=False)
    return deblender


@pytest.fixture(scope='module')
def image():
    data, _ = simulate_starfield(SHAPE, prior=PRIOR, psf=PSF, background=BACKGROUND, seed=3,
                                 stamp_size=7)
    return data


def like(image, **changes):
    """A copy of ``image`` with some of data, unit, mask, wcs or meta entries replaced."""
    meta = dict(image.meta)
    meta.update(changes.pop('meta', {}))
    args = dict(data=image.data, unit=image.unit, mask=None, wcs=None, meta=meta)
    args.update(changes)
    return NDData(**args)


def assert_same_catalog(first, second):
    assert first.colnames == second.colnames
    for name in first.colnames:
        np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(second[name]))


def test_catalog_columns_units_and_meta(trained, image):
    catalog = trained(image)
    assert isinstance(catalog, QTable)
    assert catalog.colnames == BASE_COLUMNS
    assert len(catalog) > 0
    np.testing.assert_array_equal(catalog['id'], np.arange(1, len(catalog) + 1))
    for band in BANDS:
        assert catalog[f'flux_{band}'].unit == u.electron
        assert catalog[f'flux_{band}_err'].unit == u.electron
        assert catalog[f'mag_{band}'].unit == u.mag
        assert catalog[f'mag_{band}_err'].unit == u.mag
    for name in ['x_fit', 'y_fit', 'x_err', 'y_err', 'detection_prob']:
        assert not isinstance(catalog[name], u.Quantity)
    # positions in the image; a position within a tile of 2 pixels has sd < 1 pixel
    assert np.all((catalog['x_fit'] >= -0.5) & (catalog['x_fit'] < SHAPE[1] - 0.5))
    assert np.all((catalog['y_fit'] >= -0.5) & (catalog['y_fit'] < SHAPE[0] - 0.5))
    assert np.all((catalog['x_err'] > 0) & (catalog['x_err'] < 1))
    assert np.all((catalog['y_err'] > 0) & (catalog['y_err'] < 1))
    assert np.all((catalog['detection_prob'] > 0) & (catalog['detection_prob'] <= 1))

    meta = catalog.meta
    assert meta['bands'] == BANDS
    assert isinstance(meta['version'], str)
    assert meta['n_stars_q05'] <= meta['n_stars_mean'] <= meta['n_stars_q95']


def test_catalog_flags(trained):
    """Each bit of 'flags' against its documented definition, on a 32 x 32 image."""
    shape = (32, 32)
    data, _ = simulate_starfield(shape, prior=StarFieldPrior(mu=0.08, bands=BANDS), psf=PSF,
                                 background=BACKGROUND, seed=5, stamp_size=7)
    catalog = trained(data)
    flags = np.asarray(catalog['flags'])
    x, y = np.asarray(catalog['x_fit']), np.asarray(catalog['y_fit'])
    assert flags.dtype.kind == 'i' and len(catalog) > 10
    # edge (1): a tile of 2 pixels sees 7 pixels around it, so only the tiles of
    # pixels 8 to 23 see no pixel beyond a 32-pixel edge: x + 0.5 in [8, 24)
    interior = (x + 0.5 >= 8) & (x + 0.5 < 24) & (y + 0.5 >= 8) & (y + 0.5 < 24)
    np.testing.assert_array_equal(flags & 1 > 0, ~interior)
    assert interior.any() and not interior.all()
    # no bad pixels (2)
    assert not np.any(flags & 2)
    # low detection probability (4)
    np.testing.assert_array_equal(flags & 4 > 0, catalog['detection_prob'] < 0.5)
    # blend (8): another star at least as bright (band r) closer than the PSF's FWHM
    distance = np.hypot(x[:, None] - x, y[:, None] - y) + np.diag(np.full(len(x), np.inf))
    flux = np.asarray(catalog['flux_r'])
    brighter = flux[None, :] >= flux[:, None]
    np.testing.assert_array_equal(flags & 8 > 0,
                                  ((distance < PSF.fwhm) & brighter).any(axis=1))
    assert (flags & 8).any() and ((distance < PSF.fwhm).any(axis=1) & ~(flags & 8 > 0)).any()


def test_magnitudes_and_errors(trained, image):
    catalog = trained(image)
    calibrated = trained(like(image, meta={'nelec_per_nmgy': [800.0, 600.0]}))
    for b, band in enumerate(BANDS):
        flux = catalog[f'flux_{band}'].to_value(u.electron)
        # instrumental magnitudes without a calibration, SDSS-like with one
        np.testing.assert_allclose(catalog[f'mag_{band}'].value, -2.5 * np.log10(flux))
        np.testing.assert_allclose(calibrated[f'mag_{band}'].value,
                                   22.5 - 2.5 * np.log10(flux / [800.0, 600.0][b]))
        # the flux is the median of a log-normal whose log sd gives the magnitude error
        s = catalog[f'mag_{band}_err'].value * np.log(10) / 2.5
        assert np.all(s > 0)
        np.testing.assert_allclose(catalog[f'flux_{band}_err'].value,
                                   stats.lognorm(s, scale=flux).std(), rtol=1e-6)


def test_catalog_length_is_modal_count(trained, image):
    image_tensor = torch.tensor(image.data, dtype=torch.float32)[None]
    background = torch.tensor(BACKGROUND).reshape(1, 2, 1, 1)
    with torch.no_grad():
        posterior = trained.encoder(image_tensor, background)
    assert len(trained(image)) == int(posterior.count_logits.argmax(-1).sum())


def test_sky_centroid_with_wcs(trained, image):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    wcs.wcs.crval = [323.36, -0.82]
    wcs.wcs.crpix = [8.0, 8.0]
    wcs.wcs.cdelt = [-0.396 / 3600, 0.396 / 3600]
    catalog = trained(like(image, wcs=wcs))
    assert catalog.colnames[:len(BASE_COLUMNS) - 1] == BASE_COLUMNS[:-1]
    assert set(catalog.colnames) == set(BASE_COLUMNS) | {'sky_centroid'}
    expected = wcs.pixel_to_world(catalog['x_fit'], catalog['y_fit'])
    assert np.all(catalog['sky_centroid'].separation(expected).arcsec < 1e-6)


def test_empty_result_keeps_columns(image):
    deblender = tiny_deblender()
    with torch.no_grad():
        deblender.encoder.head.bias[0] = 100.0      # every tile certainly empty
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    with pytest.warns(NoDetectionsWarning, match="no stars"):
        catalog = deblender(like(image, wcs=wcs))
    assert len(catalog) == 0
    assert set(catalog.colnames) == set(BASE_COLUMNS) | {'sky_centroid'}
    assert catalog.meta['n_stars_q05'] == catalog.meta['n_stars_q95'] == 0
    samples = deblender.sample(image, n_samples=3, seed=0)
    assert len(samples) == 0
    assert samples.colnames == ['sample', 'x_fit', 'y_fit', 'flux_r', 'flux_i']


def test_sample(trained, image):
    samples = trained.sample(image, n_samples=4, seed=1)
    assert isinstance(samples, QTable)
    assert samples.colnames == ['sample', 'x_fit', 'y_fit', 'flux_r', 'flux_i']
    assert sorted(set(samples['sample'].tolist())) == [0, 1, 2, 3]
    assert samples['flux_r'].unit == u.electron
    assert np.all((samples['x_fit'] >= -0.5) & (samples['x_fit'] < SHAPE[1] - 0.5))
    assert np.all((samples['y_fit'] >= -0.5) & (samples['y_fit'] < SHAPE[0] - 0.5))
    assert_same_catalog(samples, trained.sample(image, n_samples=4, seed=1))
    other = trained.sample(image, n_samples=4, seed=2)
    assert len(other) != len(samples) or not np.array_equal(other['x_fit'],
                                                            samples['x_fit'])


def test_count_posterior(trained, image):
    pmf = trained.count_posterior(image)
    n_tiles = (SHAPE[0] // 2) * (SHAPE[1] // 2)
    assert pmf.shape == (3 * n_tiles + 1,)
    assert np.all(pmf >= 0)
    np.testing.assert_allclose(pmf.sum(), 1.0, rtol=1e-12)
    catalog = trained(image)
    np.testing.assert_allclose(pmf @ np.arange(len(pmf)), catalog.meta['n_stars_mean'],
                               rtol=1e-9)
    cdf = np.cumsum(pmf)
    assert cdf[catalog.meta['n_stars_q05']] >= 0.05
    assert cdf[catalog.meta['n_stars_q95']] >= 0.95
    if catalog.meta['n_stars_q05'] > 0:
        assert cdf[catalog.meta['n_stars_q05'] - 1] < 0.05


def test_count_posterior_of_regions_partitions_the_image(trained, image):
    """Regions that partition the image partition its count: the means add up, and the
    whole image's pmf is the convolution of the parts' (independent tiles)."""
    rows, cols = SHAPE
    left = np.zeros(SHAPE, bool)
    left[:, :cols // 2 + 1] = True  # an odd column boundary cuts tiles in two
    top = np.zeros(SHAPE, bool)
    top[:rows // 3] = True
    parts = [left & top, left & ~top, ~left]
    pmfs = trained.count_posterior(image, region=parts)
    whole = trained.count_posterior(image)
    means = [pmf @ np.arange(len(pmf)) for pmf in pmfs]
    np.testing.assert_allclose(sum(means), whole @ np.arange(len(whole)), rtol=1e-9)
    combined = np.convolve(np.convolve(pmfs[0], pmfs[1]), pmfs[2])
    np.testing.assert_allclose(combined[:len(whole)], whole, atol=1e-10)
    single = trained.count_posterior(image, region=parts[1])
    np.testing.assert_allclose(single, pmfs[1])
    empty = trained.count_posterior(image, region=np.zeros(SHAPE, bool))
    np.testing.assert_allclose(empty, [1.0])
    with pytest.raises(ValueError, match="boolean array of the image's shape"):
        trained.count_posterior(image, region=np.ones((rows, cols + 1), bool))
    with pytest.raises(ValueError, match="boolean array"):
        trained.count_posterior(image, region=np.ones(SHAPE))


def test_save_load_round_trip(trained, image, tmp_path):
    path = tmp_path / 'model.pt'
    trained.save(path)
    loaded = StarNetDeblender.load(path)
    assert loaded.bands == BANDS
    assert_same_catalog(trained(image), loaded(image))
    assert_same_catalog(trained.sample(image, n_samples=2, seed=5),
                        loaded.sample(image, n_samples=2, seed=5))
    np.testing.assert_allclose(loaded.training_history['train_loss'],
                               trained.training_history['train_loss'])
    assert loaded.training_settings == trained.training_settings

    state = torch.load(path, weights_only=True)
    assert json.loads(state['metadata'])['background'] == BACKGROUND

    with pytest.raises(FileExistsError, match='overwrite=True'):
        trained.save(path)
    tiny_deblender(seed=1).save(path, overwrite=True)
    assert not np.array_equal(np.asarray(StarNetDeblender.load(path)(image)['x_fit']),
                              np.asarray(trained(image)['x_fit']))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / 'other.pt'
    torch.save({'metadata': json.dumps({'format': 'something-else'})}, path)
    with pytest.raises(ValueError, match='not a starnet model'):
        StarNetDeblender.load(path)


def test_seed_sets_initial_weights():
    first, second, third = tiny_deblender(seed=4), tiny_deblender(seed=4), tiny_deblender(seed=5)
    for a, b, c in zip(first.encoder.parameters(), second.encoder.parameters(),
                       third.encoder.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(first.encoder.parameters(),
                                                     third.encoder.parameters()))


def test_pretrained_unknown_name_lists_available():
    available = StarNetDeblender.available()
    assert isinstance(available, list) and all(isinstance(name, str) for name in available)
    with pytest.raises(ValueError, match='nope') as error:
        StarNetDeblender.pretrained('nope')
    assert f'available: {available}' in str(error.value)


@pytest.mark.parametrize(('changes', 'error', 'match'), [
    ({'meta': {'bands': ['g', 'r']}}, ValueError, r"bands \['g', 'r'\]"),
    ({'unit': u.adu}, ValueError, 'electrons'),
    ({'unit': u.electron / u.s}, ValueError, 'electrons'),
])
def test_invalid_images(trained, image, changes, error, match):
    with pytest.raises(error, match=match):
        trained(like(image, **changes))


def test_wrong_number_of_bands(trained, image):
    three = np.concatenate([image.data, image.data[:1]])
    with pytest.raises(ValueError, match=r'\(bands=2, rows, cols\)'):
        trained(like(image, data=three))
    with pytest.raises(ValueError, match=r'\(bands=2, rows, cols\)'):
        trained(like(image, data=image.data[0]))


@pytest.mark.parametrize('key', ['bands', 'psf', 'background'])
def test_missing_meta(trained, image, key):
    meta = {k: v for k, v in image.meta.items() if k != key}
    with pytest.raises(ValueError, match=key):
        trained(NDData(image.data, unit=u.electron, meta=meta))


def test_not_nddata(trained, image):
    with pytest.raises(TypeError, match='NDData'):
        trained(image.data)


def test_bad_pixels_are_replaced_by_background(trained, image):
    bad = np.zeros(image.data.shape, dtype=bool)
    bad[0, 3, 4] = bad[1, 10, 2] = bad[:, 7, 7] = True
    filled = np.where(bad, np.reshape(BACKGROUND, (2, 1, 1)), image.data)
    expected = trained(like(image, data=filled))
    # the same catalog, but stars within one FWHM of a bad pixel centre are flagged
    rows, cols = np.nonzero(bad.any(axis=0))
    distance = np.hypot(np.asarray(expected['x_fit'])[:, None] - cols,
                        np.asarray(expected['y_fit'])[:, None] - rows).min(axis=1)
    near = distance <= PSF.fwhm
    assert 0 < near.sum() < len(expected)
    with_nan = np.where(bad, np.nan, image.data)
    with pytest.warns(UserWarning, match='4 masked, non-finite or saturated pixels'):
        result = trained(like(image, data=with_nan))
    hot = np.where(bad, 1e7, image.data)
    with pytest.warns(UserWarning, match='4 masked, non-finite or saturated pixels'):
        masked = trained(like(image, data=hot, mask=bad))
    for catalog in (result, masked):
        np.testing.assert_array_equal(catalog['flags'] ^ expected['flags'], np.where(near, 2, 0))
        catalog.remove_column('flags')
        assert_same_catalog(catalog, expected[[c for c in expected.colnames if c != 'flags']])


def test_big_endian_data(trained, image):
    native = trained(like(image, data=image.data.astype('<f4')))
    swapped = trained(like(image, data=image.data.astype('>f4')))
    assert_same_catalog(native, swapped)


def test_psf_mismatch_warns(trained, image):
    wide = PowerLawPSF(sigma1=2.5, sigma2=5.0, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    with pytest.warns(UserWarning, match='PSF in band r differs'):
        trained(like(image, meta={'psf': [wide, PSF]}))
    # the same PSF given as a pixel image does not warn (warnings are errors here)
    stamp = PSF(*np.mgrid[-7:8, -7:8][::-1])
    trained(like(image, meta={'psf': [stamp, stamp]}))


def test_background_map(trained, image):
    # a background map equal everywhere to the per-band values gives the same catalog
    background_map = np.broadcast_to(np.reshape(BACKGROUND, (2, 1, 1)), image.data.shape)
    assert_same_catalog(trained(like(image, meta={'background': background_map.copy()})),
                        trained(image))


def test_from_nddata(image):
    background_map = np.reshape(BACKGROUND, (2, 1, 1)) * np.linspace(0.9, 1.1, 256).reshape(
        1, 16, 16)
    narrow = PowerLawPSF(sigma1=0.8, sigma2=2.0, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    source = like(image, meta={'psf': [PSF, narrow], 'background': background_map})
    deblender = StarNetDeblender.from_nddata(source, **SMALL)
    assert deblender.bands == BANDS
    np.testing.assert_allclose(deblender.background, np.median(background_map, axis=(1, 2)))
    assert deblender.psfs[1].sigma1.value == 0.8 and deblender.psfs[0].sigma1.value == 1.0
    assert deblender.encoder.pixel_layers[0].out_channels == 8
    assert deblender.prior.bands == BANDS
    # the image's own PSFs match the model's: no warning (warnings are errors here)
    assert isinstance(deblender(source), QTable)
    with pytest.raises(ValueError, match='bands'):
        StarNetDeblender.from_nddata(source, prior=StarFieldPrior(bands=['g', 'r']))


def test_fit_history_and_weights_change():
    deblender = tiny_deblender()
    before = [p.clone() for p in deblender.encoder.parameters()]
    history = deblender.fit(n_epochs=2, batches_per_epoch=1, batch_size=2, image_shape=SHAPE,
                            n_validation=2, progress=False)
    assert isinstance(history, QTable)
    assert history['epoch'].tolist() == [1, 2]
    for name in ['train_loss', 'val_loss', 'val_f1', 'val_tpr', 'val_ppv',
                 'images_per_second', 'seconds']:
        assert np.all(np.isfinite(history[name])), name
    assert np.all((history['val_f1'] >= 0) & (history['val_f1'] <= 1))
    assert np.all((history['val_coverage'] >= 0) & (history['val_coverage'] <= 1))
    assert np.all(np.isfinite(history['val_count_bias']) & (history['val_count_bias'] >= -1))
    assert deblender.training_history is history
    assert deblender.training_settings.n_epochs == 2
    assert not deblender.encoder.training
    assert any(not torch.equal(a, b) for a, b in zip(before, deblender.encoder.parameters()))
    with pytest.raises(TypeError, match='n_epoch'):
        deblender.fit(n_epoch=1)


def test_fit_resumes_from_checkpoint(tmp_path):
    settings = dict(batches_per_epoch=1, batch_size=2, image_shape=SHAPE, n_validation=2,
                    progress=False)
    straight = tiny_deblender(seed=2)
    straight.fit(n_epochs=2, **settings)
    checkpoint = tmp_path / 'fit.ckpt'
    tiny_deblender(seed=2).fit(n_epochs=1, checkpoint=checkpoint, **settings)
    resumed = tiny_deblender(seed=7)       # weights come from the checkpoint
    history = resumed.fit(n_epochs=2, checkpoint=checkpoint, **settings)
    assert history['epoch'].tolist() == [1, 2]
    np.testing.assert_allclose(history['train_loss'], straight.training_history['train_loss'],
                               rtol=1e-6)
    for a, b in zip(straight.encoder.parameters(), resumed.encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resumed_fit_uses_the_new_learning_rate(tmp_path):
    """A checkpoint restores Adam's state, but the rate is the one asked for now: a
    resumed epoch at rate 0 leaves the checkpoint's weights untouched."""
    settings = dict(batches_per_epoch=2, batch_size=2, image_shape=SHAPE, n_validation=2,
                    progress=False)
    checkpoint = tmp_path / 'fit.ckpt'
    first = tiny_deblender(seed=2)
    first.fit(n_epochs=1, checkpoint=checkpoint, learning_rate=1e-2, **settings)
    resumed = tiny_deblender(seed=2)
    resumed.fit(n_epochs=2, checkpoint=checkpoint, learning_rate=0.0,
                final_learning_rate=None, **settings)
    assert len(resumed.training_history) == 2
    for a, b in zip(first.encoder.parameters(), resumed.encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkerboard_deblender(image, tmp_path):
    deblender = tiny_deblender(n_colors=4)
    deblender.n_count_samples = 50
    deblender.fit(n_epochs=1, batches_per_epoch=2, batch_size=2, image_shape=SHAPE,
                  n_validation=2, progress=False)
    catalog = deblender(image)
    pmf = deblender.count_posterior(image)
    assert np.isclose(pmf.sum(), 1)
    left = np.zeros(SHAPE, bool)
    left[:, :SHAPE[1] // 2] = True
    halves = deblender.count_posterior(image, region=[left, ~left])
    means = [p @ np.arange(len(p)) for p in halves]  # the same draws split in two
    np.testing.assert_allclose(sum(means), pmf @ np.arange(len(pmf)), rtol=1e-9)
    assert catalog.meta['n_stars_q05'] <= catalog.meta['n_stars_mean'] \
        <= catalog.meta['n_stars_q95']
    samples = deblender.sample(image, n_samples=3, seed=0)
    assert sorted(set(samples['sample'].tolist())) <= [0, 1, 2]
    path = tmp_path / 'checkerboard.pt'
    deblender.save(path)
    loaded = StarNetDeblender.load(path)
    assert loaded.encoder.n_colors == 4
    assert_same_catalog(loaded(image), catalog)


def test_render_conserves_flux_and_places_stars():
    deblender = tiny_deblender()
    catalog = QTable({'x_fit': [7.3], 'y_fit': [9.6], 'flux_r': [1500.0] * u.electron,
                      'flux_i': [900.0] * u.electron})
    light = deblender.render(catalog, SHAPE)
    assert light.shape == (2, *SHAPE)
    np.testing.assert_allclose(light.sum(axis=(1, 2)), [1500.0, 900.0], rtol=1e-3)
    row, col = np.unravel_index(np.argmax(light[0]), SHAPE)
    assert (row, col) == (10, 7)


def test_missing_unit_warns_and_bad_calibration_raises(trained, image):
    plain = NDData(image.data, meta=image.meta)
    with pytest.warns(UserWarning, match="no unit"):
        trained(plain)
    with pytest.raises(ValueError, match="nelec_per_nmgy"):
        trained(like(image, meta={**image.meta, 'nelec_per_nmgy': [0.0, 800.0]}))


def assert_close_catalog(first, second):
    """The same stars in the same order, with values equal to float32 rounding (blocks
    of an image are computed with the same operations, but the last elements of a
    tensor may go through torch's scalar rather than its vector code, which differ by
    one unit in the last place)."""
    assert first.colnames == second.colnames
    assert len(first) == len(second)
    np.testing.assert_array_equal(first['id'], second['id'])
    for name in first.colnames[1:]:
        np.testing.assert_allclose(np.asarray(first[name]), np.asarray(second[name]),
                                   rtol=2e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize('n_colors', [1, 2])
def test_chunked_inference_equals_one_shot(image, n_colors):
    deblender = tiny_deblender(n_colors=n_colors)
    whole = deblender(image)
    deblender.chunk_size = 6          # blocks of 3 tiles, with halos
    chunked = deblender(image)
    assert_close_catalog(chunked, whole)


@pytest.mark.parametrize('background_map', [False, True])
def test_streamed_catalog_equals_one_shot(trained, background_map):
    """The modal catalog and its count posterior, computed block by block (only each
    block's rows and count pmf are kept), equal the one-shot results on an image of
    4 x 5 blocks whose size is not a multiple of the tile size."""
    shape = (91, 110)
    data, _ = simulate_starfield(shape, prior=PRIOR, psf=PSF, background=BACKGROUND,
                                 seed=4, stamp_size=7)
    if background_map:
        ramp = np.linspace(0.95, 1.05, shape[1], dtype=np.float32)
        background = np.reshape(BACKGROUND, (2, 1, 1)).astype(np.float32) * ramp
        data = like(data, meta={'background': np.broadcast_to(background, (2, *shape))})
    trained.chunk_size = 1000
    try:
        whole = trained(data)
        whole_pmf = trained.count_posterior(data)
        trained.chunk_size = 24           # blocks of 12 x 12 tiles, with halos
        streamed = trained(data)
        streamed_pmf = trained.count_posterior(data)
    finally:
        trained.chunk_size = 256
    assert len(streamed) > 20
    tiles = np.floor((np.asarray(streamed['y_fit']) + 0.5) / 24).astype(int) * 5 \
        + np.floor((np.asarray(streamed['x_fit']) + 0.5) / 24).astype(int)
    assert len(set(tiles.tolist())) == 20          # stars in every block
    assert_close_catalog(streamed, whole)
    np.testing.assert_allclose(streamed.meta['n_stars_mean'], whole.meta['n_stars_mean'],
                               rtol=1e-9)
    for key in ('n_stars_q05', 'n_stars_q95'):
        assert streamed.meta[key] == whole.meta[key]
    assert streamed_pmf.shape == whole_pmf.shape == (3 * 46 * 55 + 1,)
    # Blocks and thread counts change the order of float32 sums in the network, so tile
    # probabilities move by a few float32 ulps; the pmfs may differ by that much, no more.
    eps32 = np.finfo(np.float32).eps
    np.testing.assert_allclose(streamed_pmf, whole_pmf, rtol=0, atol=8 * eps32 * whole_pmf.max())
    np.testing.assert_allclose(streamed_pmf @ np.arange(len(streamed_pmf)),
                               streamed.meta['n_stars_mean'], rtol=1e-9)


def test_warns_when_the_image_psf_is_not_the_models():
    """The SDSS power law and KL PSFs of M2 differ by 3-5 % of the light, enough to bias
    the count by 40 %: the power-law model warns on an image with the KL PSF, and the
    KL model does not."""
    import warnings
    from starnet.datasets import load_m2
    image, _ = load_m2()                      # the KL PSF
    from starnet.inference import check_psfs

    def check(model):
        check_psfs(image.meta["psf"], model.psfs, bands=model.bands,
                   stamp_size=model.stamp_size)

    with pytest.warns(UserWarning, match="differs from the PSF the model"):
        check(StarNetDeblender.pretrained("sdss-m2-powerlaw"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(StarNetDeblender.pretrained("sdss-m2"))


def test_flux_quantiles_are_those_of_the_log_normal(trained, image):
    """flux_q05 / q95 are the 5 and 95 % quantiles of the log-normal whose median is
    ``flux`` and whose standard deviation is ``flux_err`` (scipy's lognorm)."""
    catalog = trained(image)
    flux = catalog['flux_r'].value
    # recover the log-normal's sigma from the standard deviation: sd^2 = m^2 e^{s^2}(e^{s^2}-1)
    ratio = (catalog['flux_r_err'].value / flux) ** 2
    sigma = np.sqrt(np.log((1 + np.sqrt(1 + 4 * ratio)) / 2))
    np.testing.assert_allclose(catalog['flux_r_q05'].value,
                               stats.lognorm.ppf(0.05, sigma, scale=flux), rtol=1e-4)
    np.testing.assert_allclose(catalog['flux_r_q95'].value,
                               stats.lognorm.ppf(0.95, sigma, scale=flux), rtol=1e-4)
