import json
import os
import subprocess
import sys
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.io import fits
from astropy.nddata import InverseVariance, NDData
from astropy.table import QTable
from astropy.wcs import WCS
from photutils.utils.exceptions import NoDetectionsWarning

import starnet
from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender
from starnet.m2_benchmark import FIGURES, RESULTS_FILE, _in_region
from starnet.cli import SDSS_FRAME, main
from starnet.psf import pixel_stamps

PSF = PowerLawPSF(sigma1=0.9, sigma2=2.3, b=0.06, p0=0.0)
SKY = 686.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """An untrained one-band model: enough to test the input and output."""
    deblender = StarNetDeblender(prior=StarFieldPrior(bands=["r"]), psf=PSF, background=[SKY],
                                 hidden=8, tile_hidden=16)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    deblender.save(path)
    return path


def _image_file(path, *, shape=(16, 16), header=None):
    """An image in electrons (BUNIT 'electron' unless ``header`` says otherwise)."""
    # a sky with its Poisson noise (a noiseless image fails the sky check)
    data = np.random.default_rng(0).normal(SKY, SKY ** 0.5, shape).astype(np.float32)
    data[..., 4:15, 3:14] += (3e4 * pixel_stamps(PSF, 11, [0.2], [-0.3])[0]).astype(np.float32)
    header = fits.Header({"BUNIT": "electron"}) if header is None else header
    fits.PrimaryHDU(data, header=header).writeto(path)
    return data


def test_catalog_ecsv_is_the_models_catalog(model_path, tmp_path, capsys):
    data = _image_file(tmp_path / "image.fits")
    out = tmp_path / "catalog.ecsv"
    status = main(["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
                   "--background", str(SKY), "--nelec-per-nmgy", "856", "-o", str(out)])
    assert status == 0
    written = QTable.read(out)
    expected = StarNetDeblender.load(model_path)(NDData(
        data[None], unit=u.electron,
        meta={"bands": ["r"], "psf": [PSF], "background": [SKY], "nelec_per_nmgy": 856.0}))
    assert len(written) == len(expected) > 0
    np.testing.assert_allclose(written["x_fit"], expected["x_fit"])
    np.testing.assert_allclose(written["mag_r"].value, expected["mag_r"].value)
    assert written.meta["n_stars_mean"] == pytest.approx(expected.meta["n_stars_mean"])
    assert f"{len(written)} stars" in capsys.readouterr().out


def test_catalog_passes_grid_consensus(model_path, tmp_path, monkeypatch):
    """--grid-consensus reaches the deblender's call (the consensus itself:
    test_grid_consensus.py); without it the call is the default one."""
    _image_file(tmp_path / "image.fits")
    seen = []
    call = StarNetDeblender.__call__

    def spy(self, nddata, **kwargs):
        seen.append(kwargs["grid_consensus"])
        return call(self, nddata, **kwargs)
    monkeypatch.setattr(StarNetDeblender, "__call__", spy)
    args = ["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
            "--background", str(SKY)]
    assert main([*args, "-o", str(tmp_path / "one.ecsv")]) == 0
    # this untrained model's grids agree on no star: an empty catalog, and the warning
    with pytest.warns(NoDetectionsWarning, match="holds no stars"):
        assert main([*args, "--grid-consensus", "-o", str(tmp_path / "four.ecsv")]) == 0
    assert seen == [False, True]
    assert "n_grids" in QTable.read(tmp_path / "four.ecsv").colnames
    assert "n_grids" not in QTable.read(tmp_path / "one.ecsv").colnames


def test_catalog_refuses_to_overwrite(model_path, tmp_path):
    _image_file(tmp_path / "image.fits")
    out = tmp_path / "catalog.ecsv"
    out.write_text("keep me")
    args = ["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
            "--background", str(SKY), "-o", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    assert out.read_text() == "keep me"
    assert main([*args, "--overwrite"]) == 0
    assert "x_fit" in QTable.read(out).colnames


def test_catalog_fits_output_with_wcs_and_cutout(model_path, tmp_path):
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 8.0,
                          "CRPIX2": 8.0, "CRVAL1": 323.34, "CRVAL2": -0.81,
                          "CDELT1": -1.1e-4, "CDELT2": 1.1e-4, "BUNIT": "electron"})
    _image_file(tmp_path / "image.fits", shape=(20, 18), header=header)
    out = tmp_path / "catalog.fits"
    assert main(["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
                 "--background", str(SKY), "--cutout", "2:18,1:17", "-o", str(out)]) == 0
    written = QTable.read(out)
    assert len(written) > 0 and "sky_centroid" in written.colnames
    # The cutout's WCS: its pixel (x, y) is the image's (x + 1, y + 2).
    x, y = WCS(header).world_to_pixel(written["sky_centroid"])
    np.testing.assert_allclose(x, written["x_fit"] + 1, atol=1e-6)
    np.testing.assert_allclose(y, written["y_fit"] + 2, atol=1e-6)
    assert written.meta["CUTOUT"] == "2:18,1:17"


def test_catalog_fits_keeps_units_and_writes_header_keywords(model_path, tmp_path):
    """The FITS catalog read back: the same columns with their units (warnings are
    errors here), and the metadata as header keywords, not JSON comments."""
    import starnet
    from datetime import datetime, timezone
    _image_file(tmp_path / "image.fits")
    args = ["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
            "--background", str(SKY), "--nelec-per-nmgy", "856", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "catalog.fits")]) == 0
    assert main([*args, "-o", str(tmp_path / "catalog.ecsv")]) == 0
    written = QTable.read(tmp_path / "catalog.fits")
    expected = QTable.read(tmp_path / "catalog.ecsv")
    assert written.colnames == expected.colnames and len(written) > 0
    for name in expected.colnames:
        assert getattr(written[name], "unit", None) == getattr(expected[name], "unit", None)
        np.testing.assert_array_equal(np.asarray(written[name]), np.asarray(expected[name]))
    assert written["flux_r"].unit == u.electron and written["mag_r"].unit == u.mag
    header = fits.getheader(tmp_path / "catalog.fits", 1)
    assert header["TUNIT" + str(written.colnames.index("mag_r") + 1)] == "mag"
    assert "electron" in header.comments["TTYPE" + str(written.colnames.index("flux_r") + 1)]
    assert not any("=" in str(c) for c in header.get("COMMENT", []) if "{" in str(c))
    meta = written.meta
    assert meta["STARNETV"] == starnet.__version__ == expected.meta["version"]
    assert meta["NSTARS"] == pytest.approx(expected.meta["n_stars_mean"])
    assert (meta["NSTARS05"], meta["NSTARS95"]) == (expected.meta["n_stars_q05"],
                                                    expected.meta["n_stars_q95"])
    assert meta["MODEL"] == str(model_path) == expected.meta["model"]
    assert meta["INPUT"] == str(tmp_path / "image.fits") == expected.meta["input"]
    assert (meta["NBANDS"], meta["BAND1"], meta["BKG1"]) == (1, "r", SKY)
    assert expected.meta["background"] == [SKY] and expected.meta["background_fit"] is None
    assert "BKGFIT" not in meta
    assert meta["MAGZP1"] == pytest.approx(22.5 + 2.5 * np.log10(856))
    made = datetime.fromisoformat(meta["DATE"]).replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - made).total_seconds()) < 600
    assert meta["DATE"] <= expected.meta["date"]   # written first


def test_fits_cards_of_any_metadata():
    from starnet.cli import _fits_cards
    cards = _fits_cards({"bands": ["r", "i"], "background": [686.0, 1123.0],
                         "background_fit": 1.29, "a_long_setting": np.float32(2.5),
                         "flag": True, "nested": {"x": 1}, "skipped": None})
    by_key = {key: (value, comment) for key, value, comment in cards}
    assert by_key["NBANDS"][0] == 2
    assert by_key["BAND2"] == ("i", "name of band 2")
    assert by_key["BKG2"] == (1123.0, "background used in band i, electron / pixel")
    assert by_key["BKGFIT"][0] == 1.29
    assert by_key["HIERARCH A_LONG_SETTING"] == (2.5, "a_long_setting")
    assert type(by_key["HIERARCH A_LONG_SETTING"][0]) is float
    assert by_key["FLAG"][0] is True and by_key["NESTED_X"][0] == 1
    assert not any("SKIPPED" in key for key in by_key)
    header = fits.Header(cards)   # all are valid cards
    assert header["A_LONG_SETTING"] == 2.5


@pytest.mark.parametrize("extra, message", [
    ([], "needs --background"),
    (["--background", "1", "2", "3"], "one value per band"),
    (["--background", str(SKY), "--cutout", "0:40,0:5"], "not inside the image"),
    (["--background", str(SKY), "--cutout", "a:b"], "R0:R1,C0:C1"),
    (["--background", "-686"], "--background must be positive numbers"),
    (["--background", "nan"], "--background must be positive numbers"),
    (["--background", str(SKY), "--nelec-per-nmgy", "0"],
     "--nelec-per-nmgy must be positive numbers"),
    (["--background", str(SKY), "--f-max", "5e6"], "does not read the prior"),
])
def test_catalog_bad_requests(model_path, tmp_path, capsys, extra, message):
    _image_file(tmp_path / "image.fits")
    out = tmp_path / "catalog.ecsv"
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
              "-o", str(out), *extra])
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_catalog_rejects_wrong_images(model_path, tmp_path, capsys):
    _image_file(tmp_path / "cube.fits", shape=(2, 16, 16))
    _image_file(tmp_path / "nmgy.fits", header=fits.Header({"BUNIT": "nanomaggy"}))
    for name, message in (("cube.fits", "shape (2, 16, 16)"), ("nmgy.fits", "electrons"),
                          ("missing.fits", "no image file")):
        with pytest.raises(SystemExit):
            main(["catalog", str(tmp_path / name), "--model", str(model_path),
                  "--background", str(SKY), "-o", str(tmp_path / "out.ecsv")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(tmp_path / "cube.fits"), "-o", str(tmp_path / "out.txt")])
    assert exit_info.value.code == 2


def test_sdss_frame_names(model_path, tmp_path, capsys):
    groups = SDSS_FRAME.search("frame-r-002583-2-0136.fits.bz2").groups()
    assert groups == ("r", "002583", "2", "0136")
    assert SDSS_FRAME.search("frame-r-002583-2-0136.fits") is None
    with pytest.raises(SystemExit):
        main(["catalog", str(tmp_path / "frame-r-002583-2-0136.fits.bz2"), "--model",
              str(model_path), "--background", "686", "-o", str(tmp_path / "out.ecsv")])
    assert "SDSS frame carries its own sky" in capsys.readouterr().err


def test_unknown_model(tmp_path, capsys):
    _image_file(tmp_path / "image.fits")
    with pytest.raises(SystemExit):
        main(["catalog", str(tmp_path / "image.fits"), "--model", "no-such-model",
              "--background", str(SKY), "-o", str(tmp_path / "out.ecsv")])
    assert "neither a model file nor a pretrained model" in capsys.readouterr().err


def test_benchmark_refuses_to_overwrite_before_any_work(tmp_path, capsys):
    (tmp_path / FIGURES["fig8"]).write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "m2", "--output-dir", str(tmp_path), "--model", "no-such-model"])
    assert exit_info.value.code == 1
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert (tmp_path / FIGURES["fig8"]).read_text() == "keep me"
    assert not (tmp_path / RESULTS_FILE).exists()


def test_benchmark_region_selection():
    """Stars are kept strictly between the centres of the region's edge pixels."""
    region = (slice(3, 103), slice(3, 103))
    catalog = QTable({"x_fit": [3.0, 3.01, 50.0, 101.99, 102.0, 50.0],
                      "y_fit": [50.0, 50.0, 2.5, 50.0, 50.0, 60.0],
                      "flux_r": [1e3, 1e3, 1e3, 1e3, 1e3, 856.0 * 10**(-0.4)] * u.electron})
    inside = _in_region(catalog, region, 856.0)
    np.testing.assert_allclose(inside["x_fit"], [0.01, 98.99, 47.0])
    np.testing.assert_allclose(inside["y_fit"], [47.0, 47.0, 57.0])
    assert inside["mag_r"][-1].to_value(u.mag) == pytest.approx(23.5)


def test_train_from_config(tmp_path, capsys):
    psfield = files("starnet") / "datasets" / "data" / "sdss" / "psField-002583-2-0136.fit"
    config = {"prior": {"mu": 0.02, "bands": ["r"]},
              "psf": [{"psfield": str(psfield), "band": "r"}],
              "background": [686.0],
              "model": {"hidden": 4, "tile_hidden": 8, "stamp_size": 11},
              "training": {"n_epochs": 1, "batches_per_epoch": 1, "batch_size": 2,
                           "image_shape": [16, 16], "n_validation": 1}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    output = tmp_path / "model.pt"
    assert main(["train", str(path), "-o", str(output)]) == 0
    model = StarNetDeblender.load(output)
    assert model.bands == ["r"] and model.encoder.head.in_channels == 8
    assert model.psfs[0].sigma1.value == pytest.approx(0.880, abs=1e-3)
    assert len(model.training_history) == 1
    with pytest.raises(SystemExit):           # never overwrites without --overwrite
        main(["train", str(path), "-o", str(output)])
    path.write_text(json.dumps({**config, "typo": 1}))
    with pytest.raises(SystemExit):
        main(["train", str(path), "-o", str(tmp_path / "other.pt")])
    assert "unknown keys ['typo']" in capsys.readouterr().err


def test_train_passes_threads_device_and_precision_to_fit(tmp_path, capsys, monkeypatch):
    psfield = files("starnet") / "datasets" / "data" / "sdss" / "psField-002583-2-0136.fit"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"prior": {"bands": ["r"]}, "background": [686.0],
                                "psf": [{"psfield": str(psfield), "band": "r"}],
                                "model": {"hidden": 4, "tile_hidden": 8}}))
    if not torch.cuda.is_available():         # the real fit: a clear error before training
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(path), "-o", str(tmp_path / "gpu.pt"), "--device", "cuda"])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert "torch sees no CUDA GPU" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["train", str(path), "-o", str(tmp_path / "m.pt"), "--threads", "0"])
    assert "--threads must be a positive number" in capsys.readouterr().err
    seen = {}

    def fit(self, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")
    monkeypatch.setattr(StarNetDeblender, "fit", fit)
    with pytest.raises(SystemExit):
        main(["train", str(path), "-o", str(tmp_path / "m.pt"), "--threads", "1",
              "--device", "cpu", "--precision", "bfloat16"])
    assert (seen["threads"], seen["device"], seen["precision"]) == (1, "cpu", "bfloat16")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("content", [b"", b"not a model\n", b"PK\x03\x04truncated"])
def test_catalog_with_a_bad_model_file_fails_in_one_line(tmp_path, capsys, content):
    _image_file(tmp_path / "image.fits")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(tmp_path / "image.fits"), "--model", str(bad),
              "--background", str(SKY), "-o", str(tmp_path / "out.ecsv")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and str(bad) in err


def test_catalog_with_a_truncated_fits_file_fails_in_one_line(model_path, tmp_path, capsys):
    _image_file(tmp_path / "image.fits")
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes((tmp_path / "image.fits").read_bytes()[:3000])
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(truncated), "--model", str(model_path),
              "--background", str(SKY), "-o", str(tmp_path / "out.ecsv")])
    assert exit_info.value.code == 1
    assert "error:" in capsys.readouterr().err


def test_outputs_are_checked_before_any_work(model_path, tmp_path, capsys, monkeypatch):
    """A missing folder fails at once: neither inference nor training runs."""
    def fail(*args, **kwargs):
        raise AssertionError("work started")
    monkeypatch.setattr(StarNetDeblender, "__call__", fail)
    monkeypatch.setattr(StarNetDeblender, "fit", fail)
    _image_file(tmp_path / "image.fits")
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
              "--background", str(SKY), "-o", str(tmp_path / "missing" / "out.ecsv")])
    assert exit_info.value.code == 1
    assert "does not exist" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"psf": [], "background": []}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "-o", str(tmp_path / "missing" / "model.pt")])
    assert exit_info.value.code == 1
    assert "does not exist" in capsys.readouterr().err


def test_train_config_missing_a_required_key(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"background": [686.0]}))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), "-o", str(tmp_path / "model.pt")])
    assert exit_info.value.code == 1
    assert "missing ['psf']" in capsys.readouterr().err


def test_catalog_fits_the_background_when_the_model_can(tmp_path, capsys):
    from starnet.background import fit_background
    deblender = StarNetDeblender(prior=StarFieldPrior(bands=["r"]), psf=PSF, background=[SKY],
                                 hidden=4, tile_hidden=8, stamp_size=11)
    deblender.fit(n_epochs=1, batches_per_epoch=1, batch_size=2, image_shape=(16, 16),
                  n_validation=1, background_range=(0.9, 1.6), progress=False)
    deblender.fit_background_encoder(n_steps=2, batch_size=2, image_shape=(16, 16),
                                     progress=False)
    path = tmp_path / "model.pt"
    deblender.save(path)
    data = _image_file(tmp_path / "image.fits", shape=(24, 24))
    image = NDData(data[None], unit=u.electron,
                   meta={"bands": ["r"], "psf": [PSF], "background": [SKY]})
    fitted, _ = fit_background(StarNetDeblender.load(path), image)
    args = ["catalog", str(tmp_path / "image.fits"), "--model", str(path),
            "--background", str(SKY), "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "fit.ecsv")]) == 0
    scale = fitted.meta["background_fit"]["scale"]
    assert f"background estimated from the pixels: {scale:.3f}" in capsys.readouterr().out
    written = QTable.read(tmp_path / "fit.ecsv")
    assert written.meta["n_stars_mean"] == pytest.approx(
        StarNetDeblender.load(path)(fitted).meta["n_stars_mean"])
    assert written.meta["background_fit"] == pytest.approx(scale)
    assert written.meta["background"] == [pytest.approx(np.median(fitted.meta["background"]))]
    assert main([*args, "--no-background-fit", "-o", str(tmp_path / "given.ecsv")]) == 0
    assert "background estimated" not in capsys.readouterr().out


def _catalog_of(model_path, tmp_path, *options):
    out = tmp_path / "out.ecsv"
    assert main(["catalog", *options, "--model", str(model_path), "-o", str(out),
                 "--no-progress", "--overwrite"]) == 0
    return QTable.read(out)


def _api_catalog(model_path, data, **nddata):
    meta = {"bands": ["r"], "psf": [PSF], "background": [SKY]}
    meta.update(nddata.pop("meta", {}))
    return StarNetDeblender.load(model_path)(NDData(data[None], meta=meta, **nddata))


def test_catalog_of_an_adu_image_in_an_extension(model_path, tmp_path):
    """ADU with the gain in the header, the image in a named extension: the same catalog as
    the image in electrons given to the API."""
    data = _image_file(tmp_path / "electrons.fits")
    header = fits.Header({"BUNIT": "adu", "GAIN": 4.0})
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data / 4.0, name="SCI",
                                                          header=header)])
    hdus.writeto(tmp_path / "adu.fits")
    expected = _api_catalog(model_path, data, unit=u.electron)
    for options in ([], ["--hdu", "SCI"], ["--hdu", "1"]):
        written = _catalog_of(model_path, tmp_path, str(tmp_path / "adu.fits"),
                              "--background", str(SKY / 4.0), *options)
        np.testing.assert_allclose(written["x_fit"], expected["x_fit"], atol=1e-4)
        np.testing.assert_allclose(written["flux_r"].value, expected["flux_r"].value,
                                   rtol=1e-4)
    with pytest.raises(SystemExit):
        main(["catalog", str(tmp_path / "adu.fits"), "--hdu", "WHT", "--background", "1",
              "--model", str(model_path), "-o", str(tmp_path / "x.ecsv")])


def test_catalog_with_mask_weight_background_map_and_psf_files(model_path, tmp_path):
    data = _image_file(tmp_path / "image.fits")
    mask = np.zeros(data.shape, np.uint8)
    mask[:3, :5] = 1
    weight = 1.0 / (np.maximum(data, 1.0) + 100.0)     # Poisson plus a read noise of 10 e-
    background = np.full(data.shape, SKY, np.float32) + np.arange(16)[None, :]
    stamp = pixel_stamps(PSF, 15, [0.0], [0.0])[0]
    for name, array in (("mask", mask), ("weight", weight), ("background", background),
                        ("psf", stamp)):
        fits.PrimaryHDU(array).writeto(tmp_path / f"{name}.fits")
    with pytest.warns(UserWarning, match="15 masked"):
        written = _catalog_of(model_path, tmp_path, str(tmp_path / "image.fits"),
                              "--mask", str(tmp_path / "mask.fits"),
                              "--weight", str(tmp_path / "weight.fits"),
                              "--background", str(tmp_path / "background.fits"),
                              "--psf", str(tmp_path / "psf.fits"))
    with pytest.warns(UserWarning, match="15 masked"):
        expected = _api_catalog(model_path, data, unit=u.electron, mask=mask[None] != 0,
                                uncertainty=InverseVariance(weight[None]),
                                meta={"background": background[None], "psf": [stamp]})
    assert len(written) == len(expected)
    np.testing.assert_allclose(written["x_fit"], expected["x_fit"], atol=1e-4)
    assert written.meta["background"] == pytest.approx(expected.meta["background"])


def test_catalog_threads_option(model_path, tmp_path, capsys):
    _image_file(tmp_path / "image.fits")
    args = ["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
            "--background", str(SKY), "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--threads", "0", "-o", str(tmp_path / "zero.ecsv")])
    assert exit_.value.code == 2
    assert "--threads must be a positive number of threads; got 0" in capsys.readouterr().err
    assert main([*args, "--threads", "1", "-o", str(tmp_path / "one.ecsv")]) == 0
    assert main([*args, "--threads", "2", "-o", str(tmp_path / "two.ecsv")]) == 0
    one, two = QTable.read(tmp_path / "one.ecsv"), QTable.read(tmp_path / "two.ecsv")
    np.testing.assert_allclose(np.asarray(one["x_fit"]), np.asarray(two["x_fit"]), atol=1e-4)
    assert main([*args, "--device", "cpu", "-o", str(tmp_path / "cpu.ecsv")]) == 0
    on_cpu = QTable.read(tmp_path / "cpu.ecsv")
    np.testing.assert_allclose(np.asarray(on_cpu["x_fit"]), np.asarray(two["x_fit"]), atol=1e-4)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--device", "cuda", "-o", str(tmp_path / "gpu.ecsv")])
        assert exit_.value.code == 1
        assert "torch sees no CUDA GPU" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # on a CPU without bfloat16 arithmetic
        assert main([*args, "--precision", "bfloat16", "-o", str(tmp_path / "bf16.ecsv")]) == 0
    bf16 = QTable.read(tmp_path / "bf16.ecsv")
    assert abs(len(bf16) - len(two)) <= 0.02 * len(two) + 1
    assert bf16.meta["n_stars_mean"] == pytest.approx(two.meta["n_stars_mean"], rel=0.01)


#: BUNIT values as FITS files write them, the header keywords they need, and the
#: electrons per unit that these give.
_UNIT_CASES = [
    ("e-", {}, 1.0), ("ELECTRONS", {}, 1.0), ("electron", {}, 1.0), ("Electrons", {}, 1.0),
    ("electrons/s", {"EXPTIME": 50.0}, 50.0), ("e-/s", {"EXPTIME": 50.0}, 50.0),
    ("electron s-1", {"EXPTIME": 50.0}, 50.0), ("adu", {"GAIN": 4.0}, 4.0),
    ("ADU", {"GAIN": 4.0}, 4.0), ("DN", {"GAIN": 4.0}, 4.0), ("counts", {"GAIN": 4.0}, 4.0),
    ("ADU/s", {"GAIN": 4.0, "EXPTIME": 50.0}, 200.0),
]


@pytest.mark.parametrize("bunit, keywords, scale", _UNIT_CASES)
def test_catalog_reads_units_as_fits_writes_them(model_path, tmp_path, bunit, keywords,
                                                 scale):
    """The image in its unit gives the catalog of the same image in electrons."""
    data = _image_file(tmp_path / "electrons.fits")
    fits.PrimaryHDU(data / scale, header=fits.Header({"BUNIT": bunit, **keywords})).writeto(
        tmp_path / "image.fits")
    written = _catalog_of(model_path, tmp_path, str(tmp_path / "image.fits"),
                          "--background", str(SKY / scale))
    expected = _api_catalog(model_path, data, unit=u.electron)
    assert len(written) == len(expected) > 0
    np.testing.assert_allclose(written["x_fit"], expected["x_fit"], atol=1e-4)
    np.testing.assert_allclose(written["flux_r"].value, expected["flux_r"].value, rtol=1e-4)


def _catalog_error(model_path, tmp_path, image, *options):
    """The one-line error (exit status 1) of cataloguing ``image``."""
    out = tmp_path / "out.ecsv"
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(image), "--model", str(model_path), "--background", "100",
              "-o", str(out), *options])
    assert exit_info.value.code == 1 and not out.exists()
    return exit_info


def test_catalog_refuses_an_unknown_bunit_naming_it_and_the_accepted_ones(
        model_path, tmp_path, capsys):
    _image_file(tmp_path / "jy.fits", header=fits.Header({"BUNIT": "Jy/beam"}))
    _catalog_error(model_path, tmp_path, tmp_path / "jy.fits")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "BUNIT = 'Jy/beam' is not a unit starnet reads" in err
    for accepted in ("e-", "electron(s)", "adu", "DN", "counts", "e-/s"):
        assert accepted in err
    _catalog_error(model_path, tmp_path, tmp_path / "jy.fits", "--unit", "furlong")
    assert "--unit = 'furlong' is not a unit" in capsys.readouterr().err


@pytest.mark.parametrize("keywords, options, message", [
    ({"BUNIT": "adu"}, [], "the image is in adu: give its gain in electrons per ADU with "
                           "--gain (or the header keyword GAIN)"),
    ({"BUNIT": "e-/s"}, [], "give its exptime in seconds with --exptime"),
    ({"BUNIT": "adu/s", "EXPTIME": 9.0}, [], "--gain"),
    ({"BUNIT": "DN"}, ["--gain", "-2"], "--gain must be a positive number of electrons per "
                                        "ADU; got -2.0"),
    ({"BUNIT": "DN", "GAIN": "unknown"}, [], "the header's GAIN must be a positive number "
                                             "of electrons per ADU; got 'unknown' (give "
                                             "--gain)"),
    ({"BUNIT": "e-/s", "EXPTIME": 0.0}, [], "the header's EXPTIME must be a positive"),
])
def test_catalog_asks_for_gain_and_exposure_time_by_its_options(model_path, tmp_path, capsys,
                                                                keywords, options, message):
    _image_file(tmp_path / "image.fits", header=fits.Header(keywords))
    _catalog_error(model_path, tmp_path, tmp_path / "image.fits", *options)
    err = capsys.readouterr().err
    assert message in err and "meta[" not in err


def test_catalog_without_bunit_warns_and_unit_option_states_it(model_path, tmp_path):
    data = _image_file(tmp_path / "plain.fits", header=fits.Header())
    expected = _api_catalog(model_path, data, unit=u.electron)
    with pytest.warns(UserWarning, match=r"plain.fits has no BUNIT keyword: its pixels are "
                                         r"taken as electrons \(--unit states"):
        written = _catalog_of(model_path, tmp_path, str(tmp_path / "plain.fits"),
                              "--background", str(SKY))
    np.testing.assert_allclose(written["flux_r"].value, expected["flux_r"].value, rtol=1e-4)
    # --unit states the unit of a file without BUNIT (no warning) and overrides a BUNIT
    fits.PrimaryHDU(data / 4.0).writeto(tmp_path / "adu.fits")
    fits.PrimaryHDU(data / 4.0, header=fits.Header({"BUNIT": "e-"})).writeto(
        tmp_path / "wrong.fits")
    for name in ("adu.fits", "wrong.fits"):
        written = _catalog_of(model_path, tmp_path, str(tmp_path / name), "--unit", "ADU",
                              "--gain", "4", "--background", str(SKY / 4.0))
        np.testing.assert_allclose(written["flux_r"].value, expected["flux_r"].value,
                                   rtol=1e-4)


def test_cli_prints_warnings_in_one_line_without_source(model_path, tmp_path):
    """Run as a command: each warning is one line ``starnet: warning: ...`` on stderr."""
    _image_file(tmp_path / "plain.fits", header=fits.Header())
    mask = np.zeros((16, 16), np.uint8)
    mask[:2, :3] = 1
    fits.PrimaryHDU(mask).writeto(tmp_path / "mask.fits")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(starnet.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "starnet.cli", "catalog", str(tmp_path / "plain.fits"),
         "--model", str(model_path), "--background", str(SKY), "--mask",
         str(tmp_path / "mask.fits"), "--no-progress", "-o", str(tmp_path / "out.ecsv")],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines == [
        "starnet: warning: plain.fits has no BUNIT keyword: its pixels are taken as electrons "
        "(--unit states their unit, e.g. --unit adu)",
        "starnet: warning: 6 masked, non-finite or saturated pixels are replaced by the "
        "background; stars there are not detected"]
    assert "stars in the modal catalog" in result.stdout


def test_main_restores_the_warning_format(model_path, tmp_path):
    _image_file(tmp_path / "image.fits")
    before = warnings.formatwarning
    _catalog_of(model_path, tmp_path, str(tmp_path / "image.fits"), "--background", str(SKY))
    assert warnings.formatwarning is before


def test_a_repeated_warning_is_printed_once():
    """``starnet benchmark m2`` catalogs the field four times with a model told another
    PSF: each of its warnings is formatted once, then as nothing."""
    from starnet.cli import _one_line_warnings
    with _one_line_warnings("starnet"):
        texts = [warnings.formatwarning(message, UserWarning, "file.py", 1)
                 for message in ("the same\n  message", "the same message", "another")]
    assert texts == ["starnet: warning: the same message\n", "",
                     "starnet: warning: another\n"]


def test_catalog_writes_residual_and_quicklook(model_path, tmp_path, capsys):
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 8.0,
                          "CRPIX2": 8.0, "CRVAL1": 323.34, "CRVAL2": -0.81,
                          "CDELT1": -1.1e-4, "CDELT2": 1.1e-4, "BUNIT": "adu", "GAIN": 2.0})
    data = _image_file(tmp_path / "electrons.fits", shape=(20, 20))
    fits.PrimaryHDU(data / 2.0, header=header).writeto(tmp_path / "image.fits")
    residual, picture = tmp_path / "residual.fits.gz", tmp_path / "quicklook.png"

    def run(catalog, *options):
        return main(["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
                     "--background", str(SKY / 2.0), "--no-progress", "-o",
                     str(tmp_path / catalog), "--residual", str(residual), "--quicklook",
                     str(picture), *options])

    assert run("c.ecsv") == 0
    out = capsys.readouterr().out
    assert f"residual image written to {residual}" in out
    assert f"quicklook written to {picture}" in out
    # the image in electrons minus the catalog's light minus the background
    catalog = QTable.read(tmp_path / "c.ecsv")
    light = StarNetDeblender.load(model_path).render(catalog, (20, 20))[0]
    with fits.open(residual) as hdul:
        written, written_header = hdul[0].data, hdul[0].header
    assert written.shape == (20, 20) and written_header["BUNIT"] == "electron"
    np.testing.assert_allclose(written, data - light - SKY, atol=0.05)
    assert WCS(written_header).wcs.crval.tolist() == [323.34, -0.81]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # existing outputs are refused before any work and kept; --overwrite replaces them
    residual.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        run("d.ecsv")
    assert exit_info.value.code == 1
    assert f"{residual} exists; pass --overwrite" in capsys.readouterr().err
    assert residual.read_bytes() == b"keep me" and not (tmp_path / "d.ecsv").exists()
    assert run("d.ecsv", "--overwrite") == 0
    with fits.open(residual) as hdul:
        np.testing.assert_allclose(hdul[0].data, written)


@pytest.mark.parametrize("option, name", [("--residual", "r.png"), ("--quicklook", "q.fits")])
def test_catalog_residual_and_quicklook_names(model_path, tmp_path, capsys, option, name):
    _image_file(tmp_path / "image.fits")
    with pytest.raises(SystemExit) as exit_info:
        main(["catalog", str(tmp_path / "image.fits"), "--model", str(model_path),
              "--background", str(SKY), "-o", str(tmp_path / "c.ecsv"), option,
              str(tmp_path / name)])
    assert exit_info.value.code == 2
    assert f"{option} must end in" in capsys.readouterr().err
