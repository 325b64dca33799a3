import itertools
import json
import warnings

import numpy as np
import pytest
import torch

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender
from starnet import training
from starnet.simulate import StarFieldRenderer
from starnet.model_files import checkpoint_weights, describe_model
from starnet.posterior import TiledPosterior
from starnet.tiles import TileGrid
from starnet.training import SimulatedBatches, TrainingSettings, cosine_rate

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


class _NeverRendered(StarFieldRenderer):
    def render(self, *args, **kwargs):
        raise AssertionError("a variant with a fraction of 0 was rendered")


def test_a_variant_range_of_zero_skips_the_variants_rendering(noiseless):
    """Fractions of 0 move no light: the variant is not rendered, the images are those
    of the model's PSF alone, and the random stream is that of a variant that is rendered
    (here at fractions up to 1e-9), so that a model trained with ``psf_variant_range=(0,
    0)`` draws the same images as before the rendering was skipped."""
    skipped = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (20, 20), margin=3,
                               variants=[_NeverRendered([WIDE, WIDE], stamp_size=11)],
                               variant_range=(0.0, 0.0), background_range=(0.9, 1.6))
    rendered = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (20, 20), margin=3,
                                variants=[renderer(WIDE)], variant_range=(0.0, 1e-9),
                                background_range=(0.9, 1.6))
    images, background, catalogs = skipped.draw(3, generator=torch.Generator().manual_seed(4))
    again, same_background, _ = rendered.draw(3, generator=torch.Generator().manual_seed(4))
    # the sky factors are drawn after the fractions: equal only if the stream is the same
    torch.testing.assert_close(background, same_background, rtol=0, atol=0)
    torch.testing.assert_close(images, again, rtol=1e-5, atol=1e-3)
    narrow = renderer(NARROW).render(catalogs.locs, catalogs.fluxes, catalogs.mask, (20, 20))
    torch.testing.assert_close(images, (narrow + background).clamp(min=0), rtol=1e-5, atol=1e-3)


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


def test_density_range_draws_log_uniform_densities():
    """Each image gets its own density: image counts follow Poisson(mu A) with log mu
    uniform over the range, so the mean of log(count / A) is the mean of log mu."""
    shape, margin = (40, 40), 0
    batches = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, shape, margin=margin,
                               density_range=(0.01, 0.5))
    _, _, catalogs = batches.draw(400, generator=torch.Generator().manual_seed(3))
    density = catalogs.n_stars.double() / (shape[0] * shape[1])
    assert density.min() < 0.03 and density.max() > 0.3
    log_density = torch.log(density[density > 0])
    # mean of log mu for log-uniform on (0.01, 0.5); Poisson noise of log(N/A) is small here
    expected = (np.log(0.01) + np.log(0.5)) / 2
    assert abs(float(log_density.mean()) - expected) < 0.15
    fixed = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, shape)
    _, _, catalogs = fixed.draw(200, generator=torch.Generator().manual_seed(3))
    counts = catalogs.n_stars.double()
    # one density: Poisson counts, variance = mean = 0.05 * 1600
    assert abs(float(counts.mean()) - 80) < 3 and abs(float(counts.var()) / 80 - 1) < 0.3


@pytest.mark.parametrize('bad', [(0.0, 0.1), (0.2, 0.1), (-1.0, 0.1)])
def test_density_range_errors(bad):
    with pytest.raises(ValueError, match='density_range'):
        SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (10, 10), density_range=bad)


def test_density_range_is_saved(tmp_path):
    deblender = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7)
    deblender.fit(n_epochs=1, batches_per_epoch=1, batch_size=2, image_shape=(12, 12),
                  n_validation=2, density_range=(0.001, 0.2), progress=False)
    deblender.save(tmp_path / 'model.pt')
    loaded = StarNetDeblender.load(tmp_path / 'model.pt')
    assert loaded.training_settings.density_range == (0.001, 0.2)


def test_density_gradient_reaches_the_training_images_and_is_saved(tmp_path):
    """``fit(density_gradient=)`` tilts the fit's own training images (the simulator's
    test above checks the tilt itself) and is saved with the model; a file written
    before the setting existed reads back as uniform images."""
    deblender = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7)
    settings = TrainingSettings(density_gradient=2.0)
    assert deblender._batches((12, 12), settings).density_gradient == 2.0
    assert deblender._batches((12, 12), TrainingSettings()).density_gradient == 0.0
    deblender.fit(n_epochs=1, batches_per_epoch=1, batch_size=2, image_shape=(12, 12),
                  n_validation=2, density_gradient=2.0, progress=False)
    deblender.save(tmp_path / 'model.pt')
    assert StarNetDeblender.load(tmp_path / 'model.pt').training_settings.density_gradient == 2.0
    older = {k: v for k, v in deblender.training_settings.to_dict().items()
             if k != 'density_gradient'}
    assert TrainingSettings(**older).density_gradient == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1", True])
def test_bad_density_gradients_are_refused(bad):
    with pytest.raises(ValueError, match="density_gradient must be a finite number >= 0"):
        TrainingSettings(density_gradient=bad)


def _budget_deblender():
    return StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                            tile_hidden=16, stamp_size=7)


SMALL_FIT = dict(batch_size=2, image_shape=(12, 12), n_validation=2, progress=False)


def test_n_steps_sets_the_budget_and_the_rate_decays_by_a_cosine():
    """Five steps in epochs of two: epochs of 2, 2 and 1 steps; the rate of step k
    (0-based) is the cosine at k / 5, so the last one is cosine_rate(0.8)."""
    deblender = _budget_deblender()
    history = deblender.fit(n_steps=5, batches_per_epoch=2, learning_rate=1e-2,
                            final_learning_rate=1e-4, **SMALL_FIT)
    assert list(history["steps"]) == [2, 2, 1]
    expected = [cosine_rate(k / 5, 1e-2, 1e-4) for k in (1, 3, 4)]
    np.testing.assert_allclose(history["learning_rate"], expected, rtol=1e-12)


def test_max_time_ends_the_fit_after_the_step_that_passes_it():
    deblender = _budget_deblender()
    history = deblender.fit(max_time=1.0, n_epochs=10_000, batches_per_epoch=5, **SMALL_FIT)
    seconds = np.asarray(history["seconds"])
    assert seconds.sum() >= 1.0 and seconds[:-1].sum() < 1.0
    assert len(history) < 10_000
    # the time budget drove the decay: the last rate is well below the first
    assert history["learning_rate"][-1] < 0.5 * history["learning_rate"][0]


def test_resumed_fit_continues_the_step_budget(tmp_path):
    checkpoint = tmp_path / "fit.ckpt"
    _budget_deblender().fit(n_steps=3, batches_per_epoch=2, checkpoint=checkpoint,
                            **SMALL_FIT)
    resumed = _budget_deblender()
    history = resumed.fit(n_steps=7, batches_per_epoch=2, checkpoint=checkpoint, **SMALL_FIT)
    assert list(history["steps"]) == [2, 1, 2, 2]


class _Interrupted:
    """Training batches whose ``n``-th draw is interrupted (as by Ctrl-C)."""

    def __init__(self, batches, n):
        self.batches, self.n = batches, n

    def __getattr__(self, name):
        return getattr(self.batches, name)

    def draw_batch(self, *args, **kwargs):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return self.batches.draw_batch(*args, **kwargs)


def test_interrupted_fit_resumed_with_a_larger_budget_continues_the_decay(tmp_path):
    """Killed in its second epoch of a 8-step budget (decay 2/8 done), then resumed with
    16 steps: the rate goes on from a quarter of the decay over the steps added, instead
    of rising back to the cosine at 2/16."""
    checkpoint = tmp_path / "fit.ckpt"
    rates = dict(learning_rate=1e-2, final_learning_rate=1e-4)
    deblender = _budget_deblender()
    batches = deblender._batches
    # the validation set, two steps of epoch 1, then the second step of epoch 2 fails
    deblender._batches = lambda *args: _Interrupted(batches(*args), 5)
    with pytest.raises(KeyboardInterrupt):
        deblender.fit(n_steps=8, batches_per_epoch=2, checkpoint=checkpoint,
                      compare_photutils=False, **rates, **SMALL_FIT)
    history = _budget_deblender().fit(n_steps=16, batches_per_epoch=2, checkpoint=checkpoint,
                                      compare_photutils=False, **rates, **SMALL_FIT)
    assert history["schedule_progress"][0] == pytest.approx(2 / 8)
    progress = [0.25 + 0.75 * (k / 16 - 2 / 16) / (1 - 2 / 16) for k in (3, 5, 15)]
    np.testing.assert_allclose(np.asarray(history["learning_rate"])[[1, 2, -1]],
                               [cosine_rate(p, 1e-2, 1e-4) for p in progress], rtol=1e-12)
    assert history["learning_rate"][1] < history["learning_rate"][0]
    assert history["schedule_progress"][-1] == pytest.approx(1.0)


def test_finished_fit_resumed_with_a_larger_budget_says_it_restarts(tmp_path, capsys):
    """A fit that ended its decay, given twice the steps, restarts it as if it had had
    that budget from the start (the rate of step k is the cosine at k / 8), and the
    progress output says so."""
    checkpoint = tmp_path / "fit.ckpt"
    rates = dict(learning_rate=1e-2, final_learning_rate=1e-4)
    _budget_deblender().fit(n_steps=4, batches_per_epoch=2, checkpoint=checkpoint,
                            compare_photutils=False, **rates, **SMALL_FIT)
    capsys.readouterr()
    history = _budget_deblender().fit(n_steps=8, batches_per_epoch=2, checkpoint=checkpoint,
                                      compare_photutils=False, **rates,
                                      **dict(SMALL_FIT, progress=True))
    assert "had ended its rate's decay; the larger budget (50% used) restarts it at 0.0051" \
        in capsys.readouterr().out
    np.testing.assert_allclose(history["learning_rate"][2:],
                               [cosine_rate(k / 8, 1e-2, 1e-4) for k in (5, 7)], rtol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(n_steps=0), "n_steps must be a positive integer"),
    (dict(max_time=0), "max_time must be a positive number"),
    (dict(final_learning_rate=-1.0), "final_learning_rate must be a non-negative number"),
])
def test_bad_budgets_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainingSettings(**bad)


def test_density_gradient_keeps_the_mean_and_tilts_the_field():
    """Stars thinned along a random direction: the mean count stays mu A, and the count
    ratio between the dense and the sparse half of each image follows the gradient."""
    shape = (40, 40)
    batches = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, shape,
                               density_gradient=np.log(9.0))
    catalogs = batches._catalogs(600, None, torch.Generator().manual_seed(4))
    counts = catalogs.n_stars.double()
    assert abs(float(counts.mean()) / (0.05 * 1600) - 1) < 0.03
    # strength uniform in [0, log 9]: the halves of an image differ, on average, by a
    # factor well above one (a flat field would give 1)
    x = catalogs.locs[..., 0]
    right = ((x > 19.5) & catalogs.mask).sum(dim=1).double()
    left = ((x <= 19.5) & catalogs.mask).sum(dim=1).double()
    spread = (torch.log((right + 1) / (left + 1))).abs().mean()
    flat = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, shape)
    catalogs = flat._catalogs(600, None, torch.Generator().manual_seed(4))
    x = catalogs.locs[..., 0]
    right = ((x > 19.5) & catalogs.mask).sum(dim=1).double()
    left = ((x <= 19.5) & catalogs.mask).sum(dim=1).double()
    assert float(spread) > 2 * float((torch.log((right + 1) / (left + 1))).abs().mean())


def test_conditioned_encoder_trains_on_a_bank_with_defects():
    """One short fit of an encoder with every input on images from a PSF bank with
    saturation, bad columns and hits: the batches carry the mask and the PSF
    descriptors, and the validation loss falls."""
    from photutils.psf import CircularGaussianPRF
    from starnet.defects import FrameDefects
    from starnet.encoder import StarNetEncoder
    from starnet.psf_family import DESCRIPTOR_SIZE, PSFBank
    bank = PSFBank([(CircularGaussianPRF(fwhm=f), CircularGaussianPRF(fwhm=f))
                    for f in (2.0, 3.5)], stamp_size=11, width_error=0.05)
    defects = FrameDefects(saturation_range=(2e4, 5e4), bad_column_rate=50.0)
    batches = SimulatedBatches(PRIOR, bank, BACKGROUND, (24, 24), margin=3,
                               density_gradient=1.0, defects=defects)
    batch = batches.draw_batch(8, generator=torch.Generator().manual_seed(0))
    assert batch.psf.shape == (8, 2 * DESCRIPTOR_SIZE) and batch.mask.shape == (8, 2, 24, 24)
    assert batch.mask.any()
    torch.manual_seed(0)
    encoder = StarNetEncoder(n_bands=2, hidden=8, tile_hidden=16, mask_channel=True,
                             psf_features=DESCRIPTOR_SIZE, context_cells=4, context_hidden=8)
    settings = TrainingSettings(image_shape=(24, 24), batch_size=8, batches_per_epoch=15,
                                n_epochs=2, n_validation=8, learning_rate=3e-3)
    history = training.train_encoder(encoder, batches, settings, progress=False)
    assert history["val_loss"][1] < history["val_loss"][0]


def test_fit_reports_photutils_beside_the_model_and_warns_below_it():
    """Two steps cannot beat photutils on sparse bright fields, where photutils finds
    most stars: the fit warns, and the column holds photutils' F1 (the same in every
    epoch); without the comparison the column is NaN and nothing is said."""
    prior = StarFieldPrior(mu=0.01, f_min=5000.0, bands=["r"])
    deblender = StarNetDeblender(prior=prior, psf=NARROW, background=[686.0], hidden=8,
                                 tile_hidden=16, stamp_size=7)
    fit = dict(n_steps=4, batches_per_epoch=2, batch_size=2, image_shape=(40, 40),
               n_validation=4, progress=False)
    with pytest.warns(UserWarning, match="below photutils' on the same images"):
        history = deblender.fit(**fit)
    assert np.all(history["baseline_f1"] == history["baseline_f1"][0])
    assert history["baseline_f1"][0] > 0.5 > history["val_f1"][-1]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="after .* steps the model's validation F1")
        history = deblender.fit(compare_photutils=False, **fit)
    assert np.all(np.isnan(history["baseline_f1"]))


def test_resumed_fit_keeps_the_photutils_f1_of_its_checkpoint(tmp_path, monkeypatch):
    """The validation images of a resumed fit are the checkpoint's, so photutils' F1 on
    them is taken from the checkpoint, not computed again (seconds per call: a script
    that fits epoch by epoch paid it every epoch)."""
    prior = StarFieldPrior(mu=0.01, f_min=5000.0, bands=["r"])
    deblender = StarNetDeblender(prior=prior, psf=NARROW, background=[686.0], hidden=8,
                                 tile_hidden=16, stamp_size=7)
    calls = []
    original = training._baseline_f1
    monkeypatch.setattr(training, "_baseline_f1",
                        lambda *args: calls.append(1) or original(*args))
    fit = dict(batches_per_epoch=2, batch_size=2, image_shape=(40, 40), n_validation=4,
               progress=False, checkpoint=tmp_path / "fit.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="after .* steps the model's validation F1")
        first = deblender.fit(n_epochs=1, **fit)
        assert len(calls) == 2            # two thresholds
        resumed = deblender.fit(n_epochs=2, **fit)
    assert len(calls) == 2
    assert len(resumed) == 2
    assert resumed["baseline_f1"][1] == first["baseline_f1"][0] > 0.5


def test_fit_trains_on_the_threads_it_is_given(monkeypatch):
    """``threads=`` sets torch's threads for the fit and restores them after."""
    seen = []
    real = training.train_encoder

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr("starnet.deblender.train_encoder", spy)
    before = torch.get_num_threads()
    _budget_deblender().fit(n_steps=1, threads=1, compare_photutils=False, **SMALL_FIT)
    assert seen == [1] and torch.get_num_threads() == before


def test_prior_ranges_give_each_image_its_flux_distribution_and_tell_it():
    """With f_max_range and alpha_range each image's fluxes stay below the upper flux
    its descriptor tells, which spans the range log-uniformly; a fixed prior tells its
    own descriptor; the descriptors reach only an encoder that reads them."""
    from starnet.encoder import StarNetEncoder
    from starnet.prior import PRIOR_FEATURES
    batches = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (16, 16), margin=2,
                               density_range=(0.1, 0.3), f_max_range=(1e4, 1e7),
                               alpha_range=(0.4, 0.8))
    batch = batches.draw_batch(300, generator=torch.Generator().manual_seed(4))
    assert batch.prior.shape == (300, PRIOR_FEATURES)
    f_max = 10 ** (batch.prior[:, 0].double() + 6)
    alpha = batch.prior[:, 1].double() / 4 + 0.5
    assert 1e4 <= float(f_max.min()) < 2e4 and 5e6 < float(f_max.max()) <= 1e7 * 1.0001
    assert abs(float(torch.log10(f_max).mean()) - 5.5) < 0.15       # log-uniform
    assert 0.4 <= float(alpha.min()) and float(alpha.max()) <= 0.8
    brightest = (batch.catalogs.fluxes[..., 0].double() * batch.catalogs.mask).amax(dim=1)
    assert bool((brightest <= f_max * 1.0001).all())
    # images told a low f_max hold fewer bright stars for their count
    low = f_max < 1e5
    assert float(brightest[low].median()) < float(brightest[~low].median())
    fixed = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (16, 16))
    told = fixed.draw_batch(2, generator=torch.Generator().manual_seed(4)).prior
    torch.testing.assert_close(told, PRIOR.descriptor().expand(2, -1))
    plain = StarNetEncoder(n_bands=2, hidden=4, tile_hidden=8)
    reading = StarNetEncoder(n_bands=2, hidden=4, tile_hidden=8,
                             prior_features=PRIOR_FEATURES)
    assert batch.encoder_inputs(plain)["prior"] is None
    assert batch.encoder_inputs(reading)["prior"] is batch.prior
    with pytest.raises(ValueError, match="f_max_range must lie above"):
        SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (16, 16), f_max_range=(500, 1e5))


def _block_sums_by_loop(values, block_rows, block_cols):
    rows, cols = values.shape[1] // block_rows, values.shape[2] // block_cols
    return np.array([[[values[i, r * block_rows:(r + 1) * block_rows,
                              c * block_cols:(c + 1) * block_cols].sum()
                       for c in range(cols)] for r in range(rows)]
                     for i in range(values.shape[0])])


@pytest.mark.parametrize('block', [2, 3, 6, 8])
def test_block_count_score_matches_sums_over_the_tiles_of_each_block(block):
    """Each block's mean and variance are the sums of its tiles' (a loop here) on a grid
    of 5 x 7 tiles; tiles beyond the last whole block are left out; a side larger than
    the grid is cut to its rows and columns (8: the whole image)."""
    rng = np.random.default_rng(block)
    probs = rng.dirichlet(np.ones(4), size=(2, 5, 7))
    counts = rng.integers(0, 4, size=(2, 5, 7))
    k = np.arange(4)
    mean, variance = probs @ k, probs @ k ** 2 - (probs @ k) ** 2
    side = (min(block, 5), min(block, 7))
    m, v = _block_sums_by_loop(mean, *side), _block_sums_by_loop(variance, *side)
    n = _block_sums_by_loop(counts, *side)
    expected = np.mean((n - m) ** 2 / (v + 0.25) + np.log(v + 0.25)) / (side[0] * side[1])
    score = training.block_count_score(torch.from_numpy(probs), torch.from_numpy(counts),
                                       block)
    assert float(score) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize('block', [2, 3, 6])
def test_block_count_score_adds_the_pairs_inside_each_block(block):
    """With pair correlations, each block's variance gains twice the covariance of the
    side pairs whose two tiles lie in it (a loop over pairs and blocks here)."""
    rng = np.random.default_rng(10 + block)
    probs = rng.dirichlet(np.ones(4), size=(2, 6, 7))
    counts = rng.integers(0, 4, size=(2, 6, 7))
    rho = rng.uniform(-0.25, 0.0, size=(2, 6, 7, 2))
    k = np.arange(4)
    mean, variance = probs @ k, probs @ k ** 2 - (probs @ k) ** 2
    side = (min(block, 6), min(block, 7))
    m, v = _block_sums_by_loop(mean, *side), _block_sums_by_loop(variance, *side)
    n = _block_sums_by_loop(counts, *side)
    for image, r, c in itertools.product(range(2), range(6), range(7)):
        for (dr, dc), axis in (((0, 1), 0), ((1, 0), 1)):
            block_row, block_col = r // side[0], c // side[1]
            if (r + dr < 6 and c + dc < 7 and (r + dr) // side[0] == block_row
                    and (c + dc) // side[1] == block_col and block_row < v.shape[1]
                    and block_col < v.shape[2]):
                v[image, block_row, block_col] += 2 * rho[image, r, c, axis] * np.sqrt(
                    variance[image, r, c] * variance[image, r + dr, c + dc])
    expected = np.mean((n - m) ** 2 / (v + 0.25) + np.log(v + 0.25)) / (side[0] * side[1])
    score = training.block_count_score(torch.from_numpy(probs), torch.from_numpy(counts),
                                       block, pair_correlation=torch.from_numpy(rho))
    assert float(score) == pytest.approx(expected, rel=1e-10)


def test_block_count_score_with_pairs_has_finite_gradients_at_certain_tiles():
    """Tiles certain of their count (variance 0 in float32) next to uncertain ones: the
    pairs' covariances keep the score's gradient finite, so that `fit` can train with
    them."""
    logits = torch.zeros(1, 4, 4, 4)
    logits[0, :2, :, 1] = 40.0               # certainly one star
    logits.requires_grad_(True)
    rho = torch.full((1, 4, 4, 2), -0.2)
    probs = torch.softmax(logits, -1)
    score = training.block_count_score(probs, torch.ones(1, 4, 4, dtype=torch.long), 4,
                                       pair_correlation=rho)
    score.backward()
    assert torch.isfinite(logits.grad).all()


def test_a_pair_head_in_fit_warns_to_fit_it_afterwards():
    deblender = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7, pair_correlations=True)
    with pytest.warns(UserWarning, match="fit them afterwards with fit_pair_correlations"):
        deblender.fit(n_steps=1, batches_per_epoch=1, **SMALL_FIT)


def test_block_count_score_is_lowest_at_the_true_pair_correlation():
    """Tiles paired side by side share one star at odds 1/3, in either tile at even
    odds: each tile holds a star with probability 1/6 and the pair's counts correlate
    by -(1/6) / (5/6) = -0.2. Over 2 x 2 blocks (two such pairs) the score is lowest
    at that correlation among -0.25, -0.2, -0.1 and 0."""
    generator = torch.Generator().manual_seed(0)
    n_images = 4000
    star = torch.rand(n_images, 8, 4, generator=generator) < 1 / 3
    left = torch.rand(n_images, 8, 4, generator=generator) < 0.5
    counts = torch.stack([star & left, star & ~left], dim=-1).reshape(n_images, 8, 8).long()
    probs = torch.tensor([5 / 6, 1 / 6], dtype=torch.float64).expand(n_images, 8, 8, 2)

    def score(correlation):
        rho = torch.zeros(n_images, 8, 8, 2, dtype=torch.float64)
        rho[:, :, 0::2, 0] = correlation     # the pairs (0, 1), (2, 3), ...
        return float(training.block_count_score(probs, counts, 2, floor=1e-6,
                                                pair_correlation=rho))

    scores = {rho: score(rho) for rho in (-0.25, -0.2, -0.1, 0.0)}
    assert min(scores, key=scores.get) == -0.2


def test_fit_pair_correlations_changes_only_the_pair_head(tmp_path):
    """Fitting the pair head leaves every other weight, and so each tile's posterior, as
    it was; the side weights stay in [0, 1] and sum to at most 1; the head is saved and
    loaded with the model and named in its encoder inputs."""
    deblender = _budget_deblender()
    deblender.fit(n_steps=2, batches_per_epoch=2, **SMALL_FIT)
    before = _weights(deblender)
    history = deblender.fit_pair_correlations(image_side=16, n_steps=10, batch_size=4,
                                              learning_rate=0.05, progress=False)
    assert list(history.colnames) == ["step", "score", "correlation", "seconds"]
    assert -1.0 <= history["correlation"][-1] <= 0.0
    after = _weights(deblender)
    assert set(after) - set(before) == {"pair_head.weight", "pair_head.bias"}
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(p.requires_grad for p in deblender.encoder.parameters())
    deblender.save(tmp_path / "model.pt")
    loaded = StarNetDeblender.load(tmp_path / "model.pt")
    assert describe_model(tmp_path / "model.pt")["encoder_inputs"]["pair_correlations"]
    image = torch.full((1, 2, 24, 24), 900.0)
    background = torch.tensor(BACKGROUND).reshape(1, 2, 1, 1)
    with torch.no_grad():
        mine, theirs = (d.encoder(image, background) for d in (deblender, loaded))
    assert torch.equal(mine.pair_weights, theirs.pair_weights)
    assert (mine.pair_weights >= 0).all() and (mine.pair_weights.sum(-1) <= 1).all()
    with pytest.raises(ValueError, match="needs a trained model"):
        _budget_deblender().fit_pair_correlations(n_steps=1)


def _mean_score(true_pmf, pmf, *, n_images=4000):
    """Mean block score of ``pmf`` for counts drawn tile by tile from ``true_pmf``."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.tensor(true_pmf), n_images * 64, replacement=True,
                               generator=generator).reshape(n_images, 8, 8)
    probs = torch.tensor(pmf, dtype=torch.float64).expand(n_images, 8, 8, len(pmf))
    return float(training.block_count_score(probs, counts, 8, floor=1e-6))


def test_block_count_score_is_lowest_at_the_true_mean_and_spread():
    """A proper score of the first two moments: for counts drawn with P(star) = 0.3 the
    true probabilities score below 0.25 and 0.35 (the mean); for tiles of 0, 1 or 2
    stars at 1/4, 1/2, 1/4 (mean 1, variance 1/2) they score below pmfs of the same mean
    and variance 0 or 1 (the spread)."""
    assert _mean_score([0.7, 0.3], [0.7, 0.3]) < min(_mean_score([0.7, 0.3], [0.75, 0.25]),
                                                     _mean_score([0.7, 0.3], [0.65, 0.35]))
    true = [0.25, 0.5, 0.25]
    assert _mean_score(true, true) < min(_mean_score(true, [0.0, 1.0, 0.0]),
                                         _mean_score(true, [0.5, 0.0, 0.5]))


def test_block_count_score_floor_must_be_positive():
    probs = torch.full((1, 2, 2, 2), 0.5)
    with pytest.raises(ValueError, match='floor must be positive'):
        training.block_count_score(probs, torch.zeros(1, 2, 2), 2, floor=0.0)


@pytest.mark.parametrize('field, value, message', [
    ('count_score_weight', -1.0, 'count_score_weight must be a non-negative number'),
    ('count_score_weight', float('nan'), 'count_score_weight must be a non-negative number'),
    ('count_blocks', (), 'count_blocks must be a tuple'),
    ('count_blocks', (8, 0), 'count_blocks must be a positive integer'),
    ('count_blocks', (True,), 'count_blocks must be a positive integer'),
])
def test_bad_count_score_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainingSettings(**{field: value})


def test_settings_read_back_from_json_equal_the_originals():
    """Lists (as JSON gives them) and numpy numbers become the tuples and Python
    numbers that were written, so settings compare equal and can be written again."""
    settings = TrainingSettings(count_blocks=[np.int64(4), 16], count_score_weight=np.float32(0.5),
                                density_range=[0.01, 0.3])
    assert settings == TrainingSettings(count_blocks=(4, 16), count_score_weight=0.5,
                                        density_range=(0.01, 0.3))
    assert TrainingSettings(**json.loads(json.dumps(settings.to_dict()))) == settings


def test_count_score_adds_its_weight_times_the_block_scores_to_the_loss():
    """The training loss with the count score is the forward KL plus the weight times
    the sum of the block scores of the tiles' count posteriors."""
    deblender = _budget_deblender()
    encoder = deblender.encoder.eval()
    batch = SimulatedBatches(PRIOR, renderer(NARROW), BACKGROUND, (16, 16)).draw_batch(
        3, generator=torch.Generator().manual_seed(0))
    tiles = deblender.grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes,
                                    batch.catalogs.mask, (16, 16))

    def loss(**options):
        settings = TrainingSettings(count_blocks=(2, 8), **options)
        return float(training._training_loss(encoder, batch, tiles, None, settings))

    with torch.no_grad():
        features = encoder.features(batch.images, batch.background,
                                    **batch.encoder_inputs(encoder))
        probs = encoder.tile_posterior(features).count_probs
        scores = sum(float(training.block_count_score(probs, tiles.counts, side))
                     for side in (2, 8))
        assert abs(scores) > 0.01
        assert loss(count_score_weight=0.7) == pytest.approx(loss() + 0.7 * scores, rel=1e-5)


def test_count_score_trains_and_is_saved(tmp_path):
    """A fit with the block count score runs, its settings are kept in the model file,
    and a checkerboard encoder, whose count is not a sum over tiles, refuses it."""
    deblender = _budget_deblender()
    history = deblender.fit(n_steps=2, batches_per_epoch=2, count_score_weight=0.5,
                            count_blocks=(2, 6), **SMALL_FIT)
    assert np.isfinite(history["train_loss"][0])
    deblender.save(tmp_path / 'model.pt')
    loaded = StarNetDeblender.load(tmp_path / 'model.pt').training_settings
    assert loaded.count_score_weight == 0.5 and loaded.count_blocks == (2, 6)
    checkerboard = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                                    tile_hidden=16, stamp_size=7, n_colors=2)
    with pytest.raises(ValueError, match='count_score_weight needs independent tiles'):
        checkerboard.fit(n_steps=1, count_score_weight=0.5, **SMALL_FIT)


def _weights(deblender):
    return {name: value.clone() for name, value in deblender.encoder.state_dict().items()}


def test_averaged_weights_are_the_mean_of_the_steps_then_a_moving_average(tmp_path):
    """With average_steps above the steps taken, a fit returns the mean of the weights
    after each of its steps (fits of 1, 2 and 3 steps at a constant rate give them);
    with average_steps=1 the last step's; a fit resumed from a checkpoint continues
    the same average; and the validation scores are those of the averaged weights."""
    rate = dict(learning_rate=1e-2, final_learning_rate=None, compare_photutils=False)
    steps = []
    for n in (1, 2, 3):
        deblender = _budget_deblender()
        deblender.fit(n_steps=n, batches_per_epoch=3, **rate, **SMALL_FIT)
        steps.append(_weights(deblender))
    averaged = _budget_deblender()
    history = averaged.fit(n_steps=3, batches_per_epoch=3, average_steps=1000, **rate,
                           **SMALL_FIT)
    for name, value in averaged.encoder.state_dict().items():
        if value.is_floating_point():
            mean = sum(step[name] for step in steps) / 3
            torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(value, steps[-1][name])
               for name, value in averaged.encoder.state_dict().items())
    assert averaged.training_settings.average_steps == 1000
    # the validation loss recorded is that of the averaged network
    settings = averaged.training_settings
    batches = averaged._batches(settings.image_shape, settings)
    validation = batches.draw_batch(settings.n_validation,
                                    generator=torch.Generator().manual_seed(settings.seed + 1))
    grid = TileGrid(tile_size=averaged.encoder.tile_size,
                    max_sources=averaged.encoder.max_sources)
    scores = training._validate(averaged.encoder, grid, validation, validation, PRIOR.bands)
    assert scores["val_loss"] == pytest.approx(history["val_loss"][-1], rel=1e-4)
    last = _budget_deblender()
    last.fit(n_steps=3, batches_per_epoch=3, average_steps=1, **rate, **SMALL_FIT)
    for name, value in last.encoder.state_dict().items():
        torch.testing.assert_close(value, steps[-1][name])
    # resumed: two steps, then a third from the checkpoint, as one fit of three
    checkpoint = tmp_path / "fit.ckpt"
    _budget_deblender().fit(n_steps=2, batches_per_epoch=1, average_steps=1000,
                            checkpoint=checkpoint, **rate, **SMALL_FIT)
    resumed = _budget_deblender()
    resumed_history = resumed.fit(n_steps=3, batches_per_epoch=1, average_steps=1000,
                                  checkpoint=checkpoint, **rate, **SMALL_FIT)
    for name, value in resumed.encoder.state_dict().items():
        torch.testing.assert_close(value, averaged.encoder.state_dict()[name],
                                   rtol=1e-5, atol=1e-7)
    assert resumed_history["val_loss"][-1] == pytest.approx(history["val_loss"][-1],
                                                            rel=1e-5)
    state = torch.load(checkpoint, weights_only=True)
    assert checkpoint_weights(state) is state["average"]["weights"]


@pytest.mark.parametrize("value", [-1, 1.5, True, None])
def test_bad_average_steps_are_refused(value):
    with pytest.raises(ValueError, match="average_steps must be a positive integer"):
        TrainingSettings(average_steps=value)


def test_averaging_switched_on_at_resume_averages_the_steps_after_it(tmp_path):
    """A fit of two steps resumed to four with average_steps returns the mean of the
    weights after steps 3 and 4 (those of plain fits of three and four steps)."""
    rate = dict(learning_rate=1e-2, final_learning_rate=None, compare_photutils=False)
    steps = []
    for n in (3, 4):
        deblender = _budget_deblender()
        deblender.fit(n_steps=n, batches_per_epoch=1, **rate, **SMALL_FIT)
        steps.append(_weights(deblender))
    checkpoint = tmp_path / "fit.ckpt"
    _budget_deblender().fit(n_steps=2, batches_per_epoch=1, checkpoint=checkpoint, **rate,
                            **SMALL_FIT)
    resumed = _budget_deblender()
    resumed.fit(n_steps=4, batches_per_epoch=1, average_steps=1000, checkpoint=checkpoint,
                **rate, **SMALL_FIT)
    for name, value in resumed.encoder.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (steps[0][name] + steps[1][name]) / 2,
                                       rtol=1e-5, atol=1e-7)


def test_block_count_score_with_a_shared_spread_adds_its_variance():
    """A spread s per image adds (s v)^2 to a block's variance v: for 16 tiles at even
    odds of one star (v = 4) and s = 0.5, the variance becomes 4 + 4 = 8."""
    probs = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(1, 4, 4, 4)
    counts = torch.arange(16).reshape(1, 4, 4) % 2     # 8 stars: the mean
    score = training.block_count_score(probs, counts, 4, floor=1e-9, spread=torch.tensor([0.5]))
    with_spread = 16 * float(score)
    assert np.isclose(with_spread, np.log(8.0), atol=1e-6)
    without = training.block_count_score(probs, counts, 4, floor=1e-9, spread=torch.zeros(1))
    assert torch.isclose(without, training.block_count_score(probs, counts, 4, floor=1e-9))


def test_fit_density_spread_widens_only_the_count_of_a_model_blind_to_the_density(tmp_path):
    """A barely trained network cannot read the density, which varies 40-fold between
    the training images: its fitted spread grows well above the starting 0.03, while
    every other weight, and so each tile's posterior, stays as it was; the spread is
    saved and loaded with the model."""
    deblender = _budget_deblender()
    deblender.fit(n_steps=2, batches_per_epoch=2, density_range=(0.005, 0.2), **SMALL_FIT)
    before = _weights(deblender)
    history = deblender.fit_density_spread(density_cells=4, n_steps=40, batch_size=8,
                                           learning_rate=0.05, progress=False)
    assert list(history.colnames) == ["step", "score", "spread", "seconds"]
    assert history["spread"][-1] > 0.1
    after = _weights(deblender)
    assert set(after) - set(before) == {"spread_head.weight", "spread_head.bias"}
    for name in before:
        assert torch.equal(before[name], after[name]), name
    deblender.save(tmp_path / "model.pt")
    loaded = StarNetDeblender.load(tmp_path / "model.pt")
    assert loaded.encoder.density_cells == 4
    image = torch.full((1, 2, 24, 24), 900.0)
    background = torch.tensor(BACKGROUND).reshape(1, 2, 1, 1)
    with torch.no_grad():
        mine, theirs = (d.encoder(image, background) for d in (deblender, loaded))
    assert torch.equal(mine.spread, theirs.spread)
    with pytest.raises(ValueError, match="needs a trained model"):
        _budget_deblender().fit_density_spread(n_steps=1)


def test_fit_trains_the_density_spread_with_the_count_score():
    """A model built with density cells trains its spread head in `fit` through the
    block count score (with the spread)."""
    deblender = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7, density_cells=4)
    before = deblender.encoder.spread_head.bias.clone()
    deblender.fit(n_steps=2, batches_per_epoch=2, count_score_weight=0.5, count_blocks=(2, 4),
                  **SMALL_FIT)
    assert not torch.equal(deblender.encoder.spread_head.bias, before)


def test_block_spread_adds_each_cell_offset_variance():
    """Tiles of variance 1.25 (0 to 3 stars at even odds), cells of 4 x 4 tiles: a block
    inside a cell takes the cell's spread; a block over cells gains (s_c v_c)**2 from each,
    so four cells of spread 0.2 (v_c = 20) give the 8 x 8 block sqrt(4 (0.2 x 20)**2) / 80
    = 0.1, and a 6 x 6 block over 16, 8, 8 and 4 of their tiles sqrt(0.04 x 1.25**2 x
    400) / 45; only cell (0, 0) spread gives the 8 x 8 block 0.2 x 20 / 80."""
    spread = torch.full((1, 8, 8), 0.2)
    logits = torch.zeros(1, 8, 8, 4)
    q = TiledPosterior(logits, *[torch.zeros(1, 8, 8, 6, 2)] * 4, spread=spread,
                       density_cells=4)
    blocks = training.block_spread(q, 2)
    assert blocks.shape == (1, 4, 4)
    assert torch.allclose(blocks, torch.tensor(0.2))
    assert torch.allclose(training.block_spread(q, 8), torch.tensor(0.1))
    assert torch.allclose(training.block_spread(q, 6), torch.tensor(5 / 45))
    spread[0, 4:, :] = 0.0
    spread[0, :, 4:] = 0.0
    q = TiledPosterior(logits, *[torch.zeros(1, 8, 8, 6, 2)] * 4, spread=spread,
                       density_cells=4)
    assert torch.allclose(training.block_spread(q, 8), torch.tensor(0.05))
    assert torch.allclose(training.block_spread(q, 2)[0, 2:], torch.tensor(0.0))


def test_a_density_spread_without_the_count_score_warns_that_it_stays_untrained():
    deblender = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                                 tile_hidden=16, stamp_size=7, density_cells=4)
    with pytest.warns(UserWarning, match="only the block count score trains"):
        deblender.fit(n_steps=1, batches_per_epoch=1, **SMALL_FIT)
