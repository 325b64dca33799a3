"""What an encoder reads beside the pixels: the image's PSFs (a map where they vary),
its mask of missing pixels and saturation, and the prior it is read under, through the
deblender and its model file."""

import warnings

import numpy as np
import pytest
import torch
from astropy.nddata import NDData
from photutils.psf import CircularGaussianPRF, GriddedPSFModel

from starnet import StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.catalogs import decode_flags
from starnet.inference import modal_catalog, prepare_image
from starnet.model_files import read_model
from starnet.psf_family import DESCRIPTOR_SIZE, image_descriptors, psf_descriptor

PRIOR = StarFieldPrior(mu=0.03, f_min=1000.0, bands=["r"])
NARROW, WIDE = CircularGaussianPRF(fwhm=2.5), CircularGaussianPRF(fwhm=3.5)
BACKGROUND = [700.0]


def gridded(fwhms, xs, ys):
    """A GriddedPSFModel with a Gaussian of ``fwhms[k]`` at each (x, y) of the grid."""
    y, x = np.mgrid[-12:13, -12:13]
    points = [(px, py) for py in ys for px in xs]
    stamps = [CircularGaussianPRF(fwhm=f)(x, y) for f in fwhms]
    return GriddedPSFModel(NDData(np.array(stamps), meta={"grid_xypos": points,
                                                          "oversampling": 1}))


@pytest.fixture(scope="module")
def deblender():
    """A small deblender that reads the PSF, the mask, the prior and its context, briefly
    trained."""
    model = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                             tile_hidden=16, stamp_size=15, reads_psf=True, reads_mask=True,
                             reads_prior=True, context_cells=4)
    model.psf_variants = [[WIDE]]
    model.fit(n_epochs=1, batches_per_epoch=3, batch_size=2, image_shape=(24, 24),
              n_validation=2, progress=False)
    return model


def image_with(psf, *, seed=0, shape=(40, 40), **meta):
    image, truth = simulate_starfield(shape, prior=PRIOR, psf=NARROW, background=BACKGROUND,
                                      seed=seed, stamp_size=15)
    image.meta.update(psf=[psf], **meta)
    return image, truth


def test_a_constant_grid_is_the_descriptor_of_its_psf():
    """A GriddedPSFModel whose stamps are all the same PSF gives that PSF's descriptor
    at every tile; one that widens from left to right gives tiles between its ends."""
    same = image_descriptors([gridded([3.0] * 4, [0, 40], [0, 40])], (40, 40), tile_size=2)
    expected = psf_descriptor(CircularGaussianPRF(fwhm=3.0))
    assert same.shape == (1, DESCRIPTOR_SIZE, 20, 20)
    np.testing.assert_allclose(same[0].numpy(), np.broadcast_to(
        expected[:, None, None], (DESCRIPTOR_SIZE, 20, 20)), atol=2e-3)
    varying = image_descriptors([gridded([2.5, 3.5, 2.5, 3.5], [0, 40], [0, 40])], (40, 40),
                                tile_size=2)[0, 0].numpy()     # the core annulus
    narrow, wide = (psf_descriptor(p)[0] for p in (NARROW, WIDE))
    assert varying[:, 0] == pytest.approx(np.full(20, varying[0, 0]))      # along columns
    assert narrow > varying[5, 0] > varying[5, 10] > varying[5, -1] > wide


def test_the_encoder_reads_the_psf_it_is_told(deblender):
    """The same pixels told two PSFs give two posteriors; a per-tile map of one PSF
    gives the posterior of that PSF given once for the image."""
    image, _ = image_with(NARROW)
    told_narrow = deblender._prepare(image)
    assert told_narrow.psf.shape == (1, DESCRIPTOR_SIZE)
    image.meta["psf"] = [WIDE]
    told_wide = deblender._prepare(image)
    with torch.no_grad():
        q_narrow = deblender.encoder(told_narrow.image, told_narrow.background,
                                     **told_narrow.network_inputs)
        q_wide = deblender.encoder(told_wide.image, told_wide.background,
                                   **told_wide.network_inputs)
    assert not torch.allclose(q_narrow.count_logits, q_wide.count_logits)
    image.meta["psf"] = [gridded([2.5] * 4, [0, 40], [0, 40])]
    as_map = deblender._prepare(image)
    assert as_map.psf.shape == (1, DESCRIPTOR_SIZE, 20, 20)
    with torch.no_grad():
        q_map = deblender.encoder(as_map.image, as_map.background, **as_map.network_inputs)
    torch.testing.assert_close(q_map.count_logits, q_narrow.count_logits, atol=5e-3, rtol=0)


def test_the_encoder_reads_the_prior_it_is_told(deblender):
    """The same pixels read under two upper fluxes give two posteriors; the prior must
    be given, with the model's bands."""
    image, _ = image_with(NARROW)
    kwargs = dict(bands=["r"], psfs=[NARROW], stamp_size=15, encoder=deblender.encoder)
    told = [prepare_image(image, prior=StarFieldPrior(mu=0.03, f_max=f_max, bands=["r"]),
                          **kwargs) for f_max in (1e5, 1e7)]
    assert told[0].prior.shape == (1, 2)
    with torch.no_grad():
        low, high = (deblender.encoder(t.image, t.background, **t.network_inputs)
                     for t in told)
    assert not torch.allclose(low.count_logits, high.count_logits)
    with pytest.raises(ValueError, match="reads the prior"):
        prepare_image(image, **kwargs)
    with pytest.raises(ValueError, match="bands"):
        prepare_image(image, prior=StarFieldPrior(bands=["i"]), **kwargs)


def test_a_prior_outside_the_trained_family_is_warned_of(deblender, monkeypatch):
    image, _ = image_with(NARROW)
    monkeypatch.setattr(deblender, "provenance", {"f_max_range": [3e5, 2e7],
                                                  "alpha_range": [0.35, 0.75]})
    monkeypatch.setattr(deblender, "prior", PRIOR.replace(f_max=5e6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deblender._prepare(image)
    monkeypatch.setattr(deblender, "prior", PRIOR.replace(f_max=1e8, alpha=0.5))
    with pytest.warns(UserWarning, match=r"f_max \(1e\+08\) is outside .*\(300000 to 2e\+07\)"):
        deblender._prepare(image)


def test_fit_over_prior_ranges_tells_the_encoder_each_images_prior(deblender, monkeypatch):
    """With f_max_range and alpha_range in the training settings, the fit's images draw
    their own upper flux and index within them and carry their descriptors; a prior
    outside the ranges is then warned of, from the settings alone."""
    from dataclasses import replace

    from starnet.prior import prior_descriptor
    settings = replace(deblender.training_settings, f_max_range=(1e5, 1e7),
                       alpha_range=(0.4, 0.7))
    batch = deblender._batches((24, 24), settings).draw_batch(
        64, generator=torch.Generator().manual_seed(0))
    low, high = (prior_descriptor(torch.tensor([f]), torch.tensor([a]))[0]
                 for f, a in ((1e5, 0.4), (1e7, 0.7)))
    told = batch.prior.numpy()
    assert np.all(told >= low.numpy() - 1e-6) and np.all(told <= high.numpy() + 1e-6)
    assert told[:, 0].std() > 0.3 and told[:, 1].std() > 0.2      # spread over the ranges
    monkeypatch.setattr(deblender, "training_settings", settings)
    monkeypatch.setattr(deblender, "provenance", {})
    monkeypatch.setattr(deblender, "prior", PRIOR.replace(f_max=2e7))
    image, _ = image_with(NARROW)
    with pytest.warns(UserWarning, match=r"f_max \(2e\+07\) is outside .*\(100000 to 1e\+07\)"):
        deblender._prepare(image)


def test_blocks_equal_one_shot_with_a_psf_map_and_a_mask(deblender):
    """Encoded in blocks (with a halo for the context branch), a varying PSF and a mask
    give the one-shot catalog and count."""
    image, _ = image_with(gridded([2.5, 3.5, 2.5, 3.5], [0, 48], [0, 48]), shape=(48, 48))
    image.mask = np.zeros((1, 48, 48), dtype=bool)
    image.mask[0, :, 20] = True             # a bad column
    inputs = deblender._prepare(image)
    assert inputs.mask.shape == (1, 1, 48, 48) and int(inputs.mask.sum()) == 48
    whole, whole_offset, whole_pmf = modal_catalog(deblender.encoder, inputs)
    rows, offset, pmf = modal_catalog(deblender.encoder, inputs, chunk_tiles=8)
    for key in whole:
        np.testing.assert_allclose(rows[key], whole[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert (whole_offset, len(whole_pmf)) == (offset, len(pmf))
    np.testing.assert_allclose(pmf, whole_pmf, atol=1e-6)


def test_saturated_pixels_are_masked_and_their_stars_flagged(deblender):
    """Pixels at the saturation level are missing data for the encoder (no warning: it
    reads the mask), and stars within a FWHM of them carry the saturated flag."""
    image, truth = image_with(NARROW, seed=3)
    brightest = np.argmax(truth["flux_r"])
    x, y = (int(round(float(truth[c][brightest]))) for c in ("x", "y"))
    level = float(image.data[0, y, x]) - 1.0        # its peak pixel saturates
    image.meta["saturation"] = level
    inputs = deblender._prepare(image)
    saturated = inputs.meta["saturated_pixels"]
    np.testing.assert_array_equal(saturated, image.data[0] >= level)
    np.testing.assert_array_equal(inputs.mask[0, 0].numpy(), saturated)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)      # no "replaced" warning
        catalog = deblender(image, background="given", progress=False)
    near = np.hypot(catalog["x_fit"] - x, catalog["y_fit"] - y) <= 1.0
    flagged = np.array(["saturated" in names for names in decode_flags(catalog["flags"])])
    assert flagged[near].all()
    assert not flagged[np.hypot(catalog["x_fit"] - x, catalog["y_fit"] - y) > 8].any()


def test_a_saturated_star_has_a_lower_limit_below_its_flux(deblender):
    """A star of 2e6 e- clipped at 30,000 e- (its core holds a third of its light): the
    5 % flux quantile of the star flagged at its place is at most the light left in its
    saturated pixels within one FWHM, which is below its true flux, however wrong the
    barely trained network's flux is."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:40, :40]
    star = CircularGaussianPRF(fwhm=2.5, flux=2e6, x_0=20.3, y_0=19.6)(cols, rows)
    data = rng.poisson(BACKGROUND[0] + star).astype(float)[None]
    level = 30000.0
    data = np.minimum(data, level)
    image = NDData(data, unit="electron", meta={"bands": ["r"], "psf": [NARROW],
                                                "background": BACKGROUND,
                                                "saturation": level})
    catalog = deblender(image, background="given", progress=False)
    flagged = np.array(["saturated" in names for names in decode_flags(catalog["flags"])])
    near = flagged & (np.hypot(catalog["x_fit"] - 20.3, catalog["y_fit"] - 19.6) <= 1.5)
    assert near.any()
    fwhm = deblender._largest_fwhm()
    # the posterior's own 5 % quantile, from the flux and the log flux's deviation
    posterior_q05 = catalog["flux_r"].value * np.exp(
        -1.6448536 * catalog["mag_r_err"].value * np.log(10) / 2.5)
    for x, y, q05, own in zip(catalog["x_fit"][near], catalog["y_fit"][near],
                              catalog["flux_r_q05"][near].value, posterior_q05[near]):
        within = (np.hypot(cols - x, rows - y) <= fwhm) & (data[0] >= level)
        recorded = (data[0][within] - BACKGROUND[0]).sum()
        assert 0 < recorded < 2e6
        assert q05 == pytest.approx(min(own, recorded), rel=1e-5)


def test_a_map_of_saturated_pixels_is_read_as_a_level_is(deblender):
    """meta['saturated'] (as load_sdss_frame gives SDSS's fpM SATUR) marks the same
    pixels as the level that saturates them."""
    image, _ = image_with(NARROW, seed=3)
    level = float(np.sort(image.data[0].ravel())[-5])
    by_level = deblender._prepare(dict_meta(image, saturation=level))
    by_map = deblender._prepare(dict_meta(image, saturated=image.data >= level))
    np.testing.assert_array_equal(by_map.meta["saturated_pixels"],
                                  by_level.meta["saturated_pixels"])
    assert int(by_map.meta["saturated_pixels"].sum()) == 5
    torch.testing.assert_close(by_map.mask, by_level.mask)


def dict_meta(image, **meta):
    """``image`` with ``meta`` added to its meta."""
    return NDData(image.data, unit=image.unit, meta=dict(image.meta, **meta))


def test_a_model_that_does_not_read_the_mask_warns_of_saturated_pixels():
    plain = StarNetDeblender(prior=PRIOR, psf=NARROW, background=BACKGROUND, hidden=8,
                             tile_hidden=16, stamp_size=15)
    image, _ = image_with(NARROW, saturation=900.0)
    n_saturated = int((image.data >= 900.0).sum())
    assert n_saturated > 0
    with pytest.warns(UserWarning, match=f"{n_saturated} masked, non-finite or saturated"):
        inputs = prepare_image(image, bands=["r"], psfs=[NARROW], stamp_size=15,
                               encoder=plain.encoder)
    assert inputs.mask is None and inputs.psf is None
    assert float(inputs.image.max()) < 900.0


def test_the_model_file_records_the_inputs_and_loads_the_same_model(deblender, tmp_path):
    path = tmp_path / "model.pt"
    deblender.save(path)
    metadata, _ = read_model(path)
    assert metadata["encoder_inputs"] == {"reads_psf": True, "reads_mask": True,
                                          "reads_prior": True, "context_cells": 4}
    loaded = StarNetDeblender.load(path)
    assert loaded.encoder.config() == deblender.encoder.config()
    image, _ = image_with(WIDE, seed=5)
    first = deblender(image, background="given", progress=False)
    again = loaded(image, background="given", progress=False)
    np.testing.assert_array_equal(first["x_fit"], again["x_fit"])
