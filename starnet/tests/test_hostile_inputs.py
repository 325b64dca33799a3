"""Hostile inputs (issue 26): data that must not be lost, answers that must not be
wrong without a word, errors that must come early and name the cause, and sizes that
must be refused before memory runs out. Tiny images: each test takes seconds."""

import json
import multiprocessing
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib.resources import files

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.io import fits
from astropy.nddata import InverseVariance, NDData, StdDevUncertainty, VarianceUncertainty

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.cli import main
from starnet.images import read_image, with_changes
from starnet.model_files import metadata_checksum, write_atomically
from starnet.psf import pixel_stamps

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


def _image_file(path, *, shape=(16, 16)):
    data = np.random.default_rng(0).normal(SKY, SKY ** 0.5, shape).astype(np.float32)
    data[..., 4:15, 3:14] += (3e4 * pixel_stamps(PSF, 11, [0.2], [-0.3])[0]).astype(np.float32)
    fits.PrimaryHDU(data).writeto(path)
    return data


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
    with pytest.warns(UserWarning, match="800 masked or non-finite pixels"):
        catalog = deblender(image, background="given", progress_bar=False)
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
