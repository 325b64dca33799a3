"""Hostile inputs (issue 26): data that must not be lost, answers that must not be
wrong without a word, errors that must come early and name the cause, and sizes that
must be refused before memory runs out. Tiny images: each test takes seconds."""

import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from importlib.resources import files

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.io import fits
from astropy.nddata import InverseVariance, NDData, StdDevUncertainty, VarianceUncertainty
from astropy.table import QTable

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.background import fit_background
from starnet.calibration import count_pit
from starnet.cli import main
from starnet.images import read_image, with_changes
from starnet.matching import match_catalogs
from starnet.model_files import metadata_checksum, write_atomically
from starnet.tests.test_cli import _image_file
from starnet.training import TrainingSettings
from starnet.validation import BackgroundMismatchWarning, MemoryLimitError, check_background

PSF = PowerLawPSF(sigma1=0.9, sigma2=2.3, b=0.06, p0=0.0)
SKY = 686.0


def _tiny_deblender():
    return StarNetDeblender(prior=StarFieldPrior(bands=["r"]), psf=PSF, background=[SKY],
                            hidden=8, tile_hidden=16)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    _tiny_deblender().save(path)
    return path


@contextmanager
def _file_size_limit(n_bytes):
    """Writes beyond ``n_bytes`` fail with EFBIG (SIGXFSZ ignored) inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------ data lost
@pytest.mark.parametrize("suffix", [".ecsv", ".fits", ".fits.gz"])
def test_failed_catalog_overwrite_keeps_the_old_catalog(model_path, tmp_path, capsys, suffix):
    _image_file(tmp_path / "image.fits")
    out = tmp_path / f"catalog{suffix}"
    args = ["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
            "--background", str(SKY), "-o", str(out), "--overwrite", "--no-progress"]
    assert main(args) == 0
    old = out.read_bytes()
    with _file_size_limit(1000), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    assert "previous catalog is unchanged" in capsys.readouterr().err
    assert out.read_bytes() == old
    assert _leftovers(tmp_path) == []


def _save_new(path, ready, results):
    deblender = _tiny_deblender()
    ready.wait()
    try:
        deblender.save(path)
        results.put("saved")
    except FileExistsError:
        results.put("exists")


def test_racing_saves_without_overwrite_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    path = tmp_path / "model.pt"
    workers = [context.Process(target=_save_new, args=(path, ready, results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    ready.set()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == ["exists", "exists", "exists", "saved"]
    StarNetDeblender.load(path)
    assert _leftovers(tmp_path) == []


def test_write_atomically_without_overwrite_keeps_an_existing_file(tmp_path):
    path = tmp_path / "kept"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_atomically(path, lambda file: file.write(b"new"), overwrite=False)
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_failed_save_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "model.pt"
    deblender = _tiny_deblender()
    deblender.save(path)
    old = path.read_bytes()
    with _file_size_limit(len(old) // 2), pytest.raises(OSError, match="is the disk full"):
        deblender.save(path, overwrite=True)   # torch's 'enforce fail' named as a full disk
    assert path.read_bytes() == old and _leftovers(tmp_path) == []


_KILLED_WRITER = """
import sys, time
from starnet.model_files import metadata_checksum, write_atomically
def write(file):
    file.write(b"partial")
    file.flush()
    print("writing", flush=True)
    time.sleep(60)
write_atomically(sys.argv[1], write)
"""


def test_killed_save_leaves_the_file_and_a_named_temporary(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old model")
    with subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)],
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline().strip() == "writing"
        process.kill()
    assert path.read_bytes() == b"old model"
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".model.pt.{process.pid}.")


# ------------------------------------------------------------ wrong answers, silently
def test_a_missing_sdss_frame_is_refused_not_replaced_by_the_bundled_one(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "frame-r-002583-2-0136.fits.bz2"
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(missing), "-o", str(tmp_path / "out.ecsv")])
    assert exit_info.value.code == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.ecsv").exists()


def test_the_users_sdss_frame_is_read_not_the_bundled_one(tmp_path, capsys):
    own = tmp_path / "frame-r-002583-2-0136.fits.bz2"
    own.write_bytes(b"not the bundled frame")
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(own), "-o", str(tmp_path / "out.ecsv")])
    assert exit_info.value.code == 1
    assert not (tmp_path / "out.ecsv").exists()


def test_an_sdss_frame_of_a_band_the_model_lacks_is_refused(tmp_path, capsys):
    own = tmp_path / "frame-g-002583-2-0136.fits.bz2"
    own.write_bytes(b"g band")
    with pytest.raises(SystemExit):
        main(["catalog", str(own), "-o", str(tmp_path / "out.ecsv")])
    assert "does not use" in capsys.readouterr().err


def _electron_image(shape=(1, 24, 24), **kwargs):
    data = np.random.default_rng(1).normal(SKY, SKY ** 0.5, shape).astype(np.float32)
    meta = {"bands": ["r"], "psf": [PSF], "background": [SKY], **kwargs.pop("meta", {})}
    return NDData(data, unit=kwargs.pop("unit", u.electron), meta=meta, **kwargs)


def test_zero_inverse_variance_masks_the_pixels(tmp_path):
    deblender = StarNetDeblender.pretrained("sdss-m2")
    image, _ = simulate_starfield((40, 40), psf=deblender.psfs, seed=3,
                                  background=deblender.background)
    data = np.array(image.data)
    data[:, 10:30, 10:30] = 50_000.0   # saturated: no information
    weight = 1 / data
    weight[:, 10:30, 10:30] = 0.0
    image = with_changes(image, data=data, uncertainty=InverseVariance(weight))
    with pytest.warns(UserWarning, match="800 masked, non-finite or saturated pixels"):
        catalog = deblender(image, background="given", progress=False)
    inside = ((catalog["x_fit"] > 11) & (catalog["x_fit"] < 28)
              & (catalog["y_fit"] > 11) & (catalog["y_fit"] < 28))
    assert len(catalog) > 0 and not inside.any()
    assert read_image(image, deblender.bands).bad[:, 10:30, 10:30].all()


@pytest.mark.parametrize("uncertainty", [InverseVariance(np.zeros((1, 24, 24))),
                                         VarianceUncertainty(np.full((1, 24, 24), np.nan))])
def test_no_valid_variance_anywhere_is_an_error(uncertainty):
    with pytest.raises(ValueError, match="every pixel is masked, not finite or has no valid"):
        read_image(_electron_image(uncertainty=uncertainty), ["r"])


def test_negative_or_huge_variances_are_named():
    with pytest.raises(ValueError, match="negative variances"):
        read_image(_electron_image(uncertainty=VarianceUncertainty(-np.ones((1, 24, 24)))),
                   ["r"])
    with pytest.raises(ValueError, match="exceeds the pixels' Poisson variance"):
        read_image(_electron_image(uncertainty=StdDevUncertainty(np.full((1, 24, 24), 1e20))),
                   ["r"])


@pytest.mark.parametrize("value", [0.0, -4.7, np.nan, np.inf, "four"])
@pytest.mark.parametrize("key, unit", [("gain", u.adu), ("exptime", u.electron / u.s)])
def test_bad_gain_or_exposure_time_is_named(key, unit, value):
    image = _electron_image(unit=unit, meta={key: value})
    with pytest.raises(ValueError, match=rf"meta\['{key}'\] must be"):
        read_image(image, ["r"])


# ------------------------------------------------------- late or misleading errors
@pytest.mark.parametrize("option", ["--weight", "--mask"])
def test_a_wrong_shape_weight_or_mask_file_is_named(model_path, tmp_path, capsys, option):
    _image_file(tmp_path / "image.fits")
    fits.PrimaryHDU(np.ones((17, 16), np.float32)).writeto(tmp_path / "map.fits")
    with pytest.raises(SystemExit):
        main(["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
              "--background", str(SKY), option, str(tmp_path / "map.fits"),
              "-o", str(tmp_path / "out.ecsv")])
    assert f"{option} {tmp_path / 'map.fits'} has shape (17, 16)" in capsys.readouterr().err


def _edit_model(source, target, change, *, reseal=False):
    """Copy a model file with its metadata edited by ``change(metadata)``; ``reseal``:
    with the metadata checksum updated, as a careful forger would."""
    state = torch.load(source, weights_only=True)
    metadata = json.loads(state["metadata"])
    change(metadata)
    if reseal:
        metadata["sha256"] = metadata_checksum(metadata)
    state["metadata"] = json.dumps(metadata)
    torch.save(state, target)
    return target


_BUNDLED = files("starnet") / "models" / "sdss-m2.pt"


@pytest.mark.parametrize("change", [
    lambda m: m["prior"].update(bands=["i", "r"]),
    lambda m: m.update(stamp_size=15),
    lambda m: m.update(background=[10 * b for b in m["background"]]),
    lambda m: m["psf_variants"][0][0].update(sigma1=2.0),
    lambda m: m["prior"].update(mu=0.5)], ids=["bands", "stamp", "background", "psf", "mu"])
def test_a_model_file_with_edited_metadata_is_refused(tmp_path, change):
    path = _edit_model(_BUNDLED, tmp_path / "edited.pt", change)
    with pytest.raises(ValueError, match="corrupted or was edited: the checksum of its "
                                         "metadata does not match"):
        StarNetDeblender.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(colour="blue"), r"unknown keys \['colour'\]"),
    (lambda m: m.update(stamp_size="25"), "'stamp_size' is str, expected int"),
    (lambda m: m.update(hidden=True), "'hidden' is bool, expected int"),
    (lambda m: m.update(provenance=[]), "'provenance' is list, expected dict"),
    (lambda m: m.pop("psf"), r"missing keys \['psf'\]"),
    (lambda m: m.update(background=[686.0, -1.0]), "not positive and finite"),
    (lambda m: m["training_settings"].update(speed=3), r"unknown training settings \['speed'\]"),
    (lambda m: m["prior"].update(mu="many"), "do not describe a model")])
def test_model_metadata_of_unknown_keys_or_wrong_types_are_refused(tmp_path, change, message):
    path = _edit_model(_BUNDLED, tmp_path / "edited.pt", change, reseal=True)
    with pytest.raises(ValueError, match=message):
        StarNetDeblender.load(path)


# --------------------------------------------------------------------------- seeds
_PRIOR = StarFieldPrior(mu=0.05, bands=["r"])


@pytest.mark.parametrize("seed, error", [(1.5, TypeError), (0.3, TypeError), (True, TypeError),
                                         ("1", TypeError), (np.float64(2.0), TypeError),
                                         ([1, 2], TypeError), (-1, ValueError)])
def test_seeds_are_validated_as_numpy_does_everywhere(seed, error):
    match = "seed must be an integer >= 0, a numpy Generator or None"
    with pytest.raises(error, match=match):
        _PRIOR.sample((8, 8), seed=seed)
    with pytest.raises(error, match=match):
        simulate_starfield((8, 8), prior=_PRIOR, psf=PSF, background=SKY, seed=seed)
    with pytest.raises(error, match=match):
        StarNetDeblender(prior=_PRIOR, psf=PSF, background=[SKY], hidden=4, tile_hidden=8,
                         seed=seed)
    with pytest.raises(error, match=match):
        count_pit([0.5, 0.5], 1, seed=seed)
    with pytest.raises((TypeError, ValueError), match=match):
        TrainingSettings(seed=seed)


def test_valid_seeds_give_reproducible_draws():
    draws = {seed: len(_PRIOR.sample((40, 40), seed=seed)) for seed in (0, 1, np.int64(2))}
    assert draws == {seed: len(_PRIOR.sample((40, 40), seed=seed)) for seed in draws}
    assert len(_PRIOR.sample((8, 8), seed=np.random.default_rng(0))) >= 0


# ------------------------------------------------------------------------ training
_FIT = dict(n_epochs=1, batches_per_epoch=3, batch_size=2, image_shape=(16, 16),
            n_validation=2, progress=False)


def test_a_diverging_fit_stops_and_keeps_finite_weights():
    deblender = _tiny_deblender()
    with pytest.raises(RuntimeError, match=r"training diverged at epoch 1, step \d+: .* "
                                           "lower the learning rate \\(1e\\+06\\)"):
        deblender.fit(learning_rate=1e6, final_learning_rate=None, **_FIT)
    assert all(bool(torch.isfinite(p).all()) for p in deblender.encoder.parameters())


def test_a_missing_checkpoint_folder_is_refused_before_training(tmp_path, monkeypatch):
    deblender = _tiny_deblender()
    monkeypatch.setattr("starnet.training._training_loss", _never)
    with pytest.raises(FileNotFoundError, match="folder .*no_such_dir of the checkpoint"):
        deblender.fit(checkpoint=tmp_path / "no_such_dir" / "fit.ckpt", **_FIT)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        deblender.fit(checkpoint=tmp_path, **_FIT)


def _never(*args, **kwargs):
    raise AssertionError("the work started before the check")


def test_starnet_train_checks_the_checkpoint_folder_first(tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "prior": {"bands": ["r"]}, "background": [SKY],
        "psf": [{"type": "PowerLawPSF", "sigma1": 0.9, "sigma2": 2.3, "sigmap": 3.0,
                 "beta": 3.0, "b": 0.06, "p0": 0.0}],
        "model": {"hidden": 4, "tile_hidden": 8}, "training": {"n_epochs": 1}}))
    monkeypatch.setattr("starnet.training._training_loss", _never)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "-o", str(tmp_path / "model.pt"),
              "--checkpoint", str(tmp_path / "no_such_dir" / "fit.ckpt")])
    assert exit_info.value.code == 1
    assert "no_such_dir of the checkpoint fit.ckpt does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("options, name", [(dict(n_steps=0), "n_steps"),
                                           (dict(batch_size=0), "batch_size"),
                                           (dict(n_steps=2.5), "n_steps")])
def test_background_encoder_needs_steps_and_images(options, name):
    deblender = _tiny_deblender()
    deblender.fit(background_range=(0.8, 1.2), **_FIT)
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        deblender.fit_background_encoder(image_shape=(16, 16), progress=False, **options)
    assert deblender.background_encoder is None


# --------------------------------------------------------------------- the sky check
@pytest.fixture(scope="module")
def m2_electrons():
    from starnet.datasets import load_m2
    image, _ = load_m2()
    return read_image(image, ["r", "i"])


def _sky_warnings(data, background):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_background(data, background, ["r", "i"])
    return [str(w.message) for w in caught if w.category is BackgroundMismatchWarning]


def test_the_m2_sky_passes_the_sky_check(m2_electrons):
    assert _sky_warnings(m2_electrons.data, m2_electrons.background) == []


def test_a_background_half_too_low_is_noticed(m2_electrons):
    found = _sky_warnings(m2_electrons.data, 0.5 * m2_electrons.background)
    assert any("darkest pixels lie at" in message and "is the background too low" in message
               for message in found)


def test_adu_labelled_as_electrons_is_noticed(m2_electrons):
    found = _sky_warnings(m2_electrons.data / 4.7, m2_electrons.background / 4.7)
    assert len(found) == 2 and all("is the image in electrons" in m for m in found)


@pytest.mark.parametrize("mu", [0.002, 0.05, 0.2])
def test_no_false_alarm_on_simulated_fields(mu):
    for seed in range(3):
        image, _ = simulate_starfield((48, 48), prior=StarFieldPrior(mu=mu, bands=["r", "i"]),
                                      psf=PSF, background=[686.0, 1123.0], seed=seed)
        electrons = read_image(image, ["r", "i"])
        assert _sky_warnings(electrons.data, electrons.background) == []
        if mu < 0.1:
            assert len(_sky_warnings(electrons.data, 0.5 * electrons.background)) >= 1


# ------------------------------------------------------- a background map, fitted
def _gradient_image(deblender, shape=(48, 64)):
    """A simulated image whose background rises from 0.6 to 1.8 times 1.1 times the
    model's from left to right, declared exactly, and that map."""
    gradient = np.linspace(0.6, 1.8, shape[1])[None, None, :]
    truth = np.asarray(deblender.background)[:, None, None] * 1.1 * gradient
    image, _ = simulate_starfield(shape, psf=deblender.psfs, seed=4,
                                  prior=StarFieldPrior(mu=0.01, bands=deblender.bands),
                                  background=np.broadcast_to(truth, (2, *shape)))
    return image, np.broadcast_to(truth, (2, *shape))


def test_fitting_the_background_keeps_the_given_maps_shape():
    deblender = StarNetDeblender.pretrained("sdss-m2")
    image, truth = _gradient_image(deblender)
    fitted, _ = fit_background(deblender, image)
    ratio = fitted.meta["background"] / truth
    assert np.ptp(ratio) < 1e-3 * ratio.max()          # the shape is the given map's
    assert 0.85 < ratio.mean() < 1.15                  # the level is fitted
    assert fitted.meta["background"][0, 0, -1] / fitted.meta["background"][0, 0, 0] == \
        pytest.approx(3.0, rel=1e-3)


def test_bands_of_different_shapes_warn_that_the_difference_is_dropped():
    deblender = StarNetDeblender.pretrained("sdss-m2")
    image, truth = _gradient_image(deblender)
    flat_i = np.array(truth)
    flat_i[1] = np.median(truth[1])
    image = with_changes(image, meta=dict(image.meta, background=flat_i))
    with pytest.warns(UserWarning, match="differ in shape .* the difference is dropped"):
        fit_background(deblender, image)


# -------------------------------------------------------------------- size checks
@pytest.mark.parametrize("shape", [(-5, 10), (10, 0), (2.5, 10), (10,), "big", (True, 4)])
def test_impossible_shapes_are_named(shape):
    with pytest.raises(ValueError, match=r"shape must be \(rows, cols\), two positive integers"):
        simulate_starfield(shape, prior=_PRIOR, psf=PSF, background=SKY, seed=0)


@pytest.fixture
def eight_gib(monkeypatch):
    """The memory limit of a machine with 16 GiB, whatever this one has."""
    monkeypatch.setattr("starnet.validation.memory_limit", lambda: 8 * 2**30)


def test_a_huge_simulated_image_is_refused_before_allocating(eight_gib):
    with pytest.raises(MemoryLimitError, match="60000 x 60000 pixels would need 80 GiB"):
        simulate_starfield((60000, 60000), prior=_PRIOR, psf=PSF, background=SKY, seed=0)
    assert issubclass(MemoryLimitError, ValueError) and issubclass(MemoryLimitError, MemoryError)


# ------------------------------------------------------------ the benchmark command
@pytest.mark.parametrize("arguments, message", [
    (["--output-dir", "{file}"], "is a file; expected a folder"),
    (["--n-samples", "5"], "n_samples must be an integer >= 20"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
    (["--model", "{truncated}"], "may be truncated or corrupted")])
def test_benchmark_errors_come_first_in_one_line(tmp_path, capsys, monkeypatch, arguments,
                                                 message):
    (tmp_path / "a_file").write_text("")
    truncated = tmp_path / "model.pt"
    truncated.write_bytes(_BUNDLED.read_bytes()[:5000])
    monkeypatch.setattr("starnet.m2_benchmark.load_m2", _never)
    monkeypatch.chdir(tmp_path)     # not the benchmark_output/ an earlier run left in the cwd
    arguments = [a.format(file=tmp_path / "a_file", truncated=truncated) for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "m2", *arguments])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.splitlines()) == 1


def test_a_billion_posterior_catalogs_are_refused_before_encoding(monkeypatch):
    deblender = StarNetDeblender.pretrained("sdss-m2")
    image, _ = simulate_starfield((20, 20), psf=deblender.psfs, seed=0,
                                  background=deblender.background)
    monkeypatch.setattr(deblender, "_prepare", _never)
    with pytest.raises(MemoryLimitError, match="1000000000 posterior catalogs of an image of "
                                               "20 x 20 pixels would need"):
        deblender.sample(image, n_samples=10**9)


def test_ten_thousand_stars_at_one_position_are_refused_at_once():
    n = 10_000
    pile = QTable({"x": np.full(n, 5.0), "y": np.full(n, 5.0), "flux_r": np.full(n, 1e4)})
    started = time.perf_counter()
    with pytest.raises(MemoryLimitError, match="100000000 candidate pairs lie within 0.5"):
        match_catalogs(pile, pile, band="r")
    assert time.perf_counter() - started < 5


# ------------------------------------------------------------ generic errors named
_CATALOG = QTable({"x": [1.0, 4.0], "y": [1.0, 3.0], "flux_r": [1e4, 2e4]})


@pytest.mark.parametrize("options, error, message", [
    (dict(max_separation="0.5"), ValueError, "max_separation must be a positive number"),
    (dict(max_mag_difference="0.5"), ValueError, "max_mag_difference must be a positive"),
    (dict(rule=["any"]), ValueError, "rule must be one of"),
    (dict(band=1), TypeError, "band must be a band name")])
def test_match_catalogs_names_text_and_odd_arguments(options, error, message):
    with pytest.raises(error, match=message):
        match_catalogs(_CATALOG, _CATALOG, **{"band": "r", **options})


def test_match_catalogs_takes_dicts_and_structured_arrays_and_refuses_the_rest():
    structured = np.zeros(2, dtype=[("x", float), ("y", float), ("flux_r", float)])
    structured["x"], structured["y"], structured["flux_r"] = [1, 4], [1, 3], [1e4, 2e4]
    as_dict = {name: _CATALOG[name].tolist() for name in _CATALOG.colnames}
    assert match_catalogs(structured, as_dict, band="r").f1 == 1.0
    with pytest.raises(TypeError, match="catalog must be an astropy Table"):
        match_catalogs([[1.0, 1.0]], _CATALOG, band="r")


@pytest.mark.parametrize("bands", [None, "ri", ["r", 2], 3])
def test_bands_must_be_a_list_of_names(bands):
    with pytest.raises(TypeError, match="bands must be a list of band names"):
        StarFieldPrior(bands=bands)


def test_a_one_pixel_psf_is_named():
    with pytest.raises(ValueError, match="at least 4 x 4 pixels .* got 1 x 1"):
        StarNetDeblender(prior=_PRIOR, psf=np.ones((1, 1)), background=[SKY])


def test_render_refuses_non_finite_positions_and_bad_shapes():
    deblender = StarNetDeblender.pretrained("sdss-m2")
    stars = QTable({"x": [np.nan, 2.0], "y": [1.0, 2.0], "flux_r": [1e4, 2e4],
                    "flux_i": [1e4, 2e4]})
    with pytest.raises(ValueError, match="1 stars have non-finite positions"):
        deblender.render(stars, (10, 10))
    stars["x"][0] = 1.0
    with pytest.raises(ValueError, match="shape must be"):
        deblender.render(stars, (-1, 10))


def test_a_fits_image_declared_huge_is_refused_before_reading(model_path, tmp_path, capsys,
                                                              eight_gib):
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": 60000,
                          "NAXIS2": 60000})
    path = tmp_path / "huge.fits"
    path.write_bytes(header.tostring().encode("ascii"))
    os.truncate(path, 2880 + 4 * 60000 ** 2)   # 14 GB, sparse: no disk is used
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(path), "--model", str(model_path), "--background", str(SKY),
              "-o", str(tmp_path / "out.ecsv")])
    assert exit_info.value.code == 1
    assert "of shape (60000, 60000) would need 134 GiB of memory, more than the 8 GiB " \
        "allowed" in capsys.readouterr().err
