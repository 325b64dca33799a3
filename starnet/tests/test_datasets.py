"""Tests of starnet.datasets against the bundled SDSS and HST data of M2.

The reference values come from the StarNet paper's own preprocessed image and
truth (``true_hubble_m2.npz``), built by its authors with their code, and
from the provenance notes of the bundled data (run 2583, camcol 2, field 136).
"""

import bz2
import io
import shutil
import warnings
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from photutils.psf import ImagePSF
from scipy.spatial import cKDTree

from starnet.datasets import (load_m2, load_m2_daophot, load_m2_hst,
                              load_sdss_frame, sdss)
from starnet.matching import match_catalogs
from starnet.psf import PowerLawPSF, kl_psf_from_psfield

DATA = Path(sdss.__file__).parent / "data"
SAS = "https://data.sdss.org/sas/dr12/boss"


@pytest.fixture(scope="module")
def paper():
    """The paper's evaluation set: image (r, i) of rows 627:733, cols 307:413."""
    with np.load(DATA / "m2" / "true_hubble_m2.npz") as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def m2():
    return load_m2(border=3)


def test_r_band_reproduces_paper_image_exactly(m2, paper):
    image, _ = m2
    assert image.data.shape == (2, 106, 106)
    assert image.unit == u.electron
    np.testing.assert_array_equal(image.data[0], paper["sdss_image"][0])


def test_i_band_close_to_paper_image(m2, paper):
    # The paper shifted the i band by a constant fitted shift, we use the two
    # WCSs: the images differ by a small sub-pixel shift, which we fit as
    # diff ~ sx * d(image)/dx + sy * d(image)/dy.
    ours = m2[0].data[1].astype(float)
    theirs = paper["sdss_image"][1].astype(float)
    diff = ours - theirs
    assert np.median(np.abs(diff) / theirs) < 0.01
    gy, gx = np.gradient(theirs)
    inner = (slice(1, -1), slice(1, -1))
    design = np.column_stack([gx[inner].ravel(), gy[inner].ravel()])
    shift, *_ = np.linalg.lstsq(design, diff[inner].ravel(), rcond=None)
    assert np.all(np.abs(shift) < 0.15)
    residual = diff[inner].ravel() - design @ shift
    assert np.mean(np.abs(residual)) < 0.5 * np.mean(np.abs(diff))


def test_m2_meta(m2):
    image, _ = m2
    meta = image.meta
    assert meta["bands"] == ["r", "i"]
    assert meta["region"] == (slice(3, 103), slice(3, 103))
    assert meta["evaluation"] == {"nelec_per_nmgy": 856.09845, "border_pad": 5}
    assert meta["cutout"] == (slice(627, 733), slice(307, 413))
    assert (meta["run"], meta["camcol"], meta["field"]) == (2583, 2, 136)
    np.testing.assert_allclose(meta["gain"], [4.6, 5.195], rtol=1e-6)
    # Provenance notes: sky in the region r 686.1-686.4 e-, i 1122.9-1123.3 e-.
    sky = meta["background"][:, 3:103, 3:103]
    assert sky.shape == (2, 100, 100)
    assert 686.0 < sky[0].min() and sky[0].max() < 686.5
    assert 1122.8 < sky[1].min() and sky[1].max() < 1123.3
    assert not image.mask.any()
    # the default PSF is the KL PSF (test_m2_kl_psf); the power law on request
    assert all(isinstance(p, ImagePSF) for p in meta["psf"])
    laws = load_m2(psf="powerlaw")[0].meta["psf"]
    assert all(isinstance(p, PowerLawPSF) for p in laws)
    assert laws[0].sigma1.value == pytest.approx(0.880, abs=1e-3)
    assert laws[1].sigma1.value == pytest.approx(0.886, abs=1e-3)


def test_m2_wcs_of_region_corner(m2):
    # Provenance notes: frame (col 310, row 630) -> RA 323.33025, Dec -0.81253.
    ra, dec = m2[0].wcs.pixel_to_world_values(3, 3)
    assert ra == pytest.approx(323.33025, abs=2e-5)
    assert dec == pytest.approx(-0.81253, abs=2e-5)


def test_m2_psf_images():
    image, _ = load_m2(psf="image")
    for psf in image.meta["psf"]:
        assert psf.data.shape == (25, 25)
        assert psf.data.sum() == pytest.approx(1.0)
        assert np.unravel_index(psf.data.argmax(), psf.data.shape) == (12, 12)


def test_m2_kl_psf():
    image, _ = load_m2(psf="kl")
    psfield = DATA / "sdss" / "psField-002583-2-0136.fit"
    r, i = image.meta["psf"]
    for psf, size in ((r, 25), (i, 27)):
        assert isinstance(psf, ImagePSF)
        assert psf.data.shape == (size, size)
        assert psf.data.sum() == pytest.approx(1.0)
        assert np.unravel_index(psf.data.argmax(), psf.data.shape) == (size // 2,) * 2
    # r: at the centre of the region (rows 630:730, cols 310:410)
    expected = kl_psf_from_psfield(psfield, band="r", row=679.5, col=359.5)
    np.testing.assert_array_equal(r.data, expected.data)
    # i: at the same place on the sky, i row ~ r row + 2.8, col - 0.58
    # (provenance notes); this field's i KL PSF does not vary anyway
    # (provenance notes), blurred by the bilinear resampling onto the r pixels
    kl_i = kl_psf_from_psfield(psfield, band="i", row=682.3, col=358.9)
    assert "row 682.3" in i.name and "col 358.9" in i.name and "resampled" in i.name
    assert i.data.max() < 0.85 * kl_i.data.max()
    # the bundled images are the KL PSF elsewhere (row 600, col 500): the
    # same in i, slightly different in r (measured: half L1 0.0035)
    bundled, _ = load_m2(psf="image")
    np.testing.assert_allclose(kl_i.data, bundled.meta["psf"][1].data, atol=1e-7)
    half_l1 = np.abs(r.data - bundled.meta["psf"][0].data).sum() / 2
    assert 0.002 < half_l1 < 0.01
    # the border does not move the PSF, nor change the image
    bordered, _ = load_m2(border=3, psf="kl")
    np.testing.assert_array_equal(bordered.meta["psf"][0].data, r.data)
    plain, _ = load_m2()
    np.testing.assert_array_equal(image.data, plain.data)


# Bright isolated stars of the r frame, far from M2 (benchmarks/psf_diagnostic.py's
# selection), among the 30 brightest those far from the row = column diagonal, where
# the two orders of the KL coefficients differ most: frame column, row
BRIGHT_ISOLATED_STARS = [(1507.5, 354.1), (1814.5, 548.7), (1779.3, 125.0),
                         (1925.9, 692.7), (1502.1, 913.4), (1385.1, 823.1),
                         (1929.6, 598.4), (1478.2, 341.6), (1536.9, 1283.7),
                         (977.9, 550.8), (914.5, 500.1), (1917.6, 444.4)]


def _psf_fit_chi2(data, variance, psf, x, y):
    """chi^2 of a weighted fit of flux, position and sky within 8 px."""
    from scipy.optimize import least_squares

    from starnet.psf import pixel_stamps
    ix, iy = int(round(x)), int(round(y))
    box = (slice(iy - 8, iy + 9), slice(ix - 8, ix + 9))
    stamp, sigma = data[box], np.sqrt(variance[box])
    inside = np.hypot(*np.mgrid[-8:9, -8:9]) <= 8

    def residual(p):
        model = p[0] * pixel_stamps(psf, 17, [p[1]], [p[2]])[0] + p[3]
        return ((stamp - model) / sigma)[inside]

    start = [stamp.sum(), x - ix, y - iy, 0.0]
    return float(np.sum(least_squares(residual, start, x_scale=[stamp.sum(), 0.1, 0.1, 1.0])
                        .fun ** 2))


def test_kl_psf_coefficient_order_fits_stars():
    # The KL weights are polynomials in row and column; read with the rows and
    # columns exchanged (photoop's sdss_psf_recon, pydl), they describe this
    # frame's stars worse (measured: all 12 stars, total chi^2 2.5 times larger;
    # on all 136 stars of the diagnostic, 120 fit better with this order).
    psfield = DATA / "sdss" / "psField-002583-2-0136.fit"
    frame = load_sdss_frame(2583, 2, 136, ("r",))
    data = frame.data[0] - frame.meta["background"][0]
    variance = np.maximum(frame.data[0], 1.0)
    ours, exchanged = [], []
    for x, y in BRIGHT_ISOLATED_STARS:
        ours.append(_psf_fit_chi2(data, variance, kl_psf_from_psfield(
            psfield, band="r", row=y, col=x), x, y))
        # the exchanged order at (row, col) is this order at (col, row)
        exchanged.append(_psf_fit_chi2(data, variance, kl_psf_from_psfield(
            psfield, band="r", row=x, col=y), x, y))
    ours, exchanged = np.array(ours), np.array(exchanged)
    assert np.sum(ours < exchanged) >= 10
    assert ours.sum() < 0.8 * exchanged.sum()


def test_sdss_frame_kl_psf_at_cutout_centre():
    psfield = DATA / "sdss" / "psField-002583-2-0136.fit"
    near = load_sdss_frame(2583, 2, 136, ("r",), cutout=((0, 20), (0, 40)),
                           psf="kl")
    far = load_sdss_frame(2583, 2, 136, ("r",), cutout=((1469, 1489), (2008, 2048)),
                          psf="kl")
    np.testing.assert_array_equal(
        near.meta["psf"][0].data,
        kl_psf_from_psfield(psfield, band="r", row=9.5, col=19.5).data)
    np.testing.assert_array_equal(
        far.meta["psf"][0].data,
        kl_psf_from_psfield(psfield, band="r", row=1478.5, col=2027.5).data)
    assert np.abs(near.meta["psf"][0].data - far.meta["psf"][0].data).sum() > 0.02
    # the default is unchanged: the power law
    assert isinstance(load_sdss_frame(2583, 2, 136, ("r",), cutout=((0, 20), (0, 40)))
                      .meta["psf"][0], PowerLawPSF)


def test_sdss_frame_kl_psf_grid_holds_the_kl_psf_at_its_points():
    """psf='kl-grid': a GriddedPSFModel whose stamps are the KL PSF at its points (the
    cutout's corners, at most PSF_GRID_STEP apart), in the cutout's pixels; in i, with
    the resampling blur of each point."""
    from photutils.psf import GriddedPSFModel
    from starnet.datasets.sdss import PSF_GRID_STEP, resampled_psf
    psfield = DATA / "sdss" / "psField-002583-2-0136.fit"
    rows, cols = (100, 400), (300, 900)
    image = load_sdss_frame(2583, 2, 136, cutout=(rows, cols), psf="kl-grid")
    r, i = image.meta["psf"]
    assert isinstance(r, GriddedPSFModel) and isinstance(i, GriddedPSFModel)
    xs, ys = np.unique(r.grid_xypos[:, 0]), np.unique(r.grid_xypos[:, 1])
    assert xs[0] == ys[0] == 0 and (xs[-1], ys[-1]) == (599, 299)
    assert np.diff(xs).max() <= PSF_GRID_STEP and np.diff(ys).max() <= PSF_GRID_STEP
    corner = np.flatnonzero((r.grid_xypos[:, 0] == 599) & (r.grid_xypos[:, 1] == 299))[0]
    np.testing.assert_allclose(r.data[corner], kl_psf_from_psfield(
        psfield, band="r", row=rows[1] - 1, col=cols[1] - 1).data, rtol=1e-12)
    first = np.flatnonzero((i.grid_xypos[:, 0] == 0) & (i.grid_xypos[:, 1] == 0))[0]
    wcs_r = load_sdss_frame(2583, 2, 136, ("r",), cutout=((0, 1), (0, 1))).wcs
    i_frame = load_sdss_frame(2583, 2, 136, ("i",), cutout=((0, 1), (0, 1))).wcs
    ra, dec = wcs_r.all_pix2world(cols[0], rows[0], 0)
    x, y = i_frame.all_world2pix(ra, dec, 0)
    kl = kl_psf_from_psfield(psfield, band="i", row=float(y), col=float(x))
    np.testing.assert_allclose(i.data[first], resampled_psf(kl, float(x) % 1,
                                                            float(y) % 1).data, rtol=1e-12)


def test_sdss_frame_fpm_masks_saturated_pixels():
    """fpm_planes: the r fpM's saturated pixels are masked in r, and in i every pixel
    resampled from a saturated i pixel; the bright stars' cores are among them."""
    from starnet.datasets.fpm import read_fpm_mask
    cutout = ((0, 1489), (0, 2048))
    image = load_sdss_frame(2583, 2, 136, cutout=cutout, fpm_planes=["SATUR"])
    plain = load_sdss_frame(2583, 2, 136, cutout=cutout)
    saturated_r = read_fpm_mask(DATA / "sdss" / "fpM-002583-r2-0136.fit.gz",
                                planes=["SATUR"])
    np.testing.assert_array_equal(image.mask[0], plain.mask[0] | saturated_r)
    np.testing.assert_array_equal(image.meta["saturated"][0], saturated_r)
    added = image.mask[1] & ~plain.mask[1]
    assert 0.5 < added.sum() / read_fpm_mask(DATA / "sdss" / "fpM-002583-i2-0136.fit.gz",
                                             planes=["SATUR"]).sum() < 4
    assert np.median(image.data[1][added]) > 10 * np.median(image.data[1])


@pytest.mark.parametrize("psf", ["image", "KL", None])
def test_sdss_frame_bad_psf_choice(psf):
    with pytest.raises(ValueError, match="psf must be 'powerlaw', 'kl' or 'kl-grid'"):
        load_sdss_frame(2583, 2, 136, ("r",), cutout=((0, 20), (0, 40)), psf=psf)


def test_truth_positions_against_independent_hst_list(m2):
    # The paper's truth (bliss locs convention) and Portillo's list (x =
    # col - 310, y = row - 630) were made by different people; every one of
    # the 1114 stars must be in the 6048-star list at the same place.
    _, truth = m2
    assert len(truth) == 1114
    assert truth["flux_r"].unit == u.electron
    inner = truth["x"] - 3, truth["y"] - 3
    assert all(np.all((v > 0) & (v < 99)) for v in inner)
    hst = load_m2_hst(border=3)
    dist, index = cKDTree(np.column_stack([hst["x"], hst["y"]])).query(
        np.column_stack([truth["x"], truth["y"]]))
    assert dist.max() < 1e-4
    # The two lists use different HST magnitude columns: +0.15 mag median.
    dmag = truth["mag_r"] - hst["mag_r"][index]
    assert np.median(dmag) == pytest.approx(0.15, abs=0.02)


def test_bright_truth_stars_sit_on_image_peaks(m2):
    image, truth = m2
    signal = image.data[0] - image.meta["background"][0]
    brightest = truth[np.argsort(truth["flux_r"].value)[::-1][:20]]

    def centroid_offsets(x_all, y_all):
        on_peak, offsets = [], []
        for x, y in zip(x_all, y_all):
            ix, iy = int(round(x)), int(round(y))
            window = signal[iy - 1:iy + 2, ix - 1:ix + 2]
            on_peak.append(window.argmax() == 4)
            dy, dx = np.mgrid[-1:2, -1:2]
            offsets.append([(window * dx).sum() / window.sum() + ix - x,
                            (window * dy).sum() / window.sum() + iy - y])
        return np.mean(on_peak), np.median(offsets, axis=0)

    fraction, median = centroid_offsets(brightest["x"], brightest["y"])
    assert fraction >= 0.9
    assert np.all(np.abs(median) < 0.15)
    # A half-pixel convention error would move most peaks off the centre.
    for shift in (-0.5, 0.5):
        fraction, _ = centroid_offsets(brightest["x"] + shift,
                                       brightest["y"] + shift)
        assert fraction <= 0.5


def test_truth_fluxes_and_magnitudes(m2, paper):
    _, truth = m2
    np.testing.assert_allclose(truth["flux_r"].value, paper["true_fluxes"][:, 0])
    assert truth["flux_r"].value.min() > 1000
    expected = 22.5 - 2.5 * np.log10(truth["flux_r"].value / 856.09845)
    np.testing.assert_allclose(truth["mag_r"], expected)
    assert truth["mag_r"].max() < 22.5 - 2.5 * np.log10(1000 / 856.09845)


def test_border_shifts_coordinates_only():
    _, truth0 = load_m2()
    image5, truth5 = load_m2(border=5)
    assert image5.data.shape == (2, 110, 110)
    np.testing.assert_allclose(truth5["x"], truth0["x"] + 5)
    np.testing.assert_allclose(truth5["y"], truth0["y"] + 5)
    hst0, hst5 = load_m2_hst(), load_m2_hst(border=5)
    np.testing.assert_allclose(hst5["x"] - hst0["x"], 5)
    dao0, dao5 = load_m2_daophot(), load_m2_daophot(border=5)
    np.testing.assert_allclose(dao5["y"] - dao0["y"], 5)


@pytest.mark.parametrize("border", [-1, 311, 2.0, "3"])
def test_bad_border(border):
    with pytest.raises(ValueError, match="border must be an integer"):
        load_m2(border=border)


def test_bad_psf_choice():
    with pytest.raises(ValueError, match="psf must be 'powerlaw', 'image' or 'kl'"):
        load_m2(psf="gaussian")


def test_hst_list():
    hst = load_m2_hst()
    assert len(hst) == 6048
    assert hst.colnames == ["x", "y", "flux_r", "mag_r"]
    # First line of the file: x, y, flux in r counts (nmgy per count 0.00546689).
    row = hst[0]
    assert row["x"] == pytest.approx(-0.18286533944558414)
    assert row["y"] == pytest.approx(99.42107996064226)
    counts = 15.04733758833834578
    assert row["mag_r"] == pytest.approx(22.5 - 2.5 * np.log10(counts * 0.00546689))
    bright = load_m2_hst(full=False)
    assert 1114 < len(bright) < 6048
    assert bright["flux_r"].value.min() > 1000


def test_daophot_reproduces_paper_row(m2):
    _, truth = m2
    dao = load_m2_daophot(border=3)
    assert len(dao) == 356
    # Provenance notes: DAOPHOT y is ~1 px larger than HST, x ~0.03 px.
    dx, dy = dao.meta["offset"]
    assert abs(dx) < 0.1
    assert -1.15 < dy < -0.95
    # Paper, Table 1: DAOPHOT TPR 0.20, PPV 0.65, F1 0.31.
    for rule in ("one-to-one", "any"):
        result = match_catalogs(dao, truth, band="r", rule=rule, border=8,
                                image_shape=(106, 106))
        assert result.n_true == 931
        assert result.tpr == pytest.approx(0.20, abs=0.01)
        assert result.ppv == pytest.approx(0.63, abs=0.02)
        assert result.f1 == pytest.approx(0.30, abs=0.01)


def test_sky_and_no_sky():
    cut = ((700, 710), (1000, 1020))
    with_sky = load_sdss_frame(2583, 2, 136, cutout=cut)
    without = load_sdss_frame(2583, 2, 136, cutout=cut, include_sky=False)
    np.testing.assert_allclose(with_sky.data - without.data,
                               with_sky.meta["background"], atol=1e-3)
    assert not without.meta["background"].any()
    # The r sky is the psField's sky (150.75 counts) within a few percent.
    assert with_sky.meta["background"][0].mean() / 4.6 == pytest.approx(150.75, rel=0.05)


def test_nelec_per_nmgy_over_all_columns():
    # The paper's 856.09845 is the mean of gain / calibration over all columns.
    image = load_sdss_frame(2583, 2, 136, ("r",), cutout=(slice(0, 1), slice(None)))
    assert image.data.shape == (1, 1, 2048)
    assert image.meta["nelec_per_nmgy"][0] == pytest.approx(856.09845, rel=1e-6)


def test_cutout_forms_and_wcs():
    a = load_sdss_frame(2583, 2, 136, ("r", "i"), cutout=((40, 50), (60, 75)))
    b = load_sdss_frame(2583, 2, 136, ("r", "i"), cutout=(slice(40, 50), slice(60, 75)))
    np.testing.assert_array_equal(a.data, b.data)
    assert a.data.shape == (2, 10, 15)
    full = sdss._read_frame(str(DATA / "sdss" / "frame-r-002583-2-0136.fits.bz2")).header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # RADECSYS, MJD-OBS
        wcs = WCS(full)
    np.testing.assert_allclose(a.wcs.pixel_to_world_values(3, 2),
                               wcs.pixel_to_world_values(63, 42))


def test_mask_where_other_band_leaves_frame():
    # r row y is i row ~ y + 2.83 (provenance notes): r rows above 1485.17
    # fall outside the i frame (rows 0..1488).
    image = load_sdss_frame(2583, 2, 136, cutout=((1480, 1489), (1000, 1010)))
    assert not image.mask[0].any()
    outside_rows = np.flatnonzero(image.mask[1].all(axis=1))
    np.testing.assert_array_equal(outside_rows, [6, 7, 8])  # rows 1486..1488
    assert not image.mask[1][:6].any()
    assert np.all(np.isfinite(image.data))


@pytest.mark.parametrize("bands", [("r", "x"), ("r", "r"), (), "ri"])
def test_bad_bands(bands):
    with pytest.raises(ValueError, match="bands must be distinct SDSS band"):
        load_sdss_frame(2583, 2, 136, bands)


@pytest.mark.parametrize("cutout", [((1400, 1500), (0, 10)), ((10, 5), (0, 10)),
                                    ((0, 10), (-5, 10)), ((0, 10), slice(2040, 2050))])
def test_cutout_outside_frame(cutout):
    with pytest.raises(ValueError, match="not inside the frame"):
        load_sdss_frame(2583, 2, 136, ("r",), cutout=cutout)


@pytest.mark.parametrize("cutout", [(0, 10), ((0, 10.5), (0, 10)),
                                    (slice(0, 10, 2), slice(0, 10))])
def test_malformed_cutout(cutout):
    with pytest.raises((TypeError, ValueError), match="cutout must be"):
        load_sdss_frame(2583, 2, 136, ("r",), cutout=cutout)


def test_unknown_field_in_photofield(monkeypatch):
    def no_download(url, cache=False, **kwargs):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(sdss, "download_file", no_download)
    with pytest.raises(ValueError, match="field 999 is not in photoField-002583-2.fits"):
        load_sdss_frame(2583, 2, 999)


def test_missing_file_without_network(monkeypatch, tmp_path):
    def offline(url, cache=False, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(sdss, "download_file", offline)
    url = f"{SAS}/photoObj/frames/301/2583/2/frame-r-002583-2-0137.fits.bz2"
    with pytest.raises(OSError, match="downloading it from " + url):
        load_sdss_frame(2583, 2, 137, ("r",), cache_dir=tmp_path)


def _write_synthetic_frame(path):
    """A 6 x 8 SDSS-like frame (bz2) with known image, calibration and sky."""
    image = np.full((6, 8), 2.0, dtype=np.float32)
    image[1, 2] = 10.0
    calibration = np.linspace(0.004, 0.006, 8, dtype=np.float32)
    allsky = (100 + 10 * np.arange(12, dtype=np.float32)).reshape(3, 4)
    xinterp = (np.arange(8, dtype=np.float32) - 0.5) / 2  # -0.25 .. 3.25
    yinterp = np.arange(6, dtype=np.float32) / 2          # 0, 0.5 (tie), ..
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
                          "CRPIX1": 4.0, "CRPIX2": 3.0, "CRVAL1": 323.3,
                          "CRVAL2": -0.8, "CD1_1": 0.0, "CD1_2": 1.1e-4,
                          "CD2_1": 1.1e-4, "CD2_2": 0.0})
    sky = fits.BinTableHDU.from_columns([
        fits.Column("ALLSKY", format="12E", dim="(4, 3)", array=allsky[None]),
        fits.Column("XINTERP", format="8E", array=xinterp[None]),
        fits.Column("YINTERP", format="6E", array=yinterp[None])])
    hdul = fits.HDUList([fits.PrimaryHDU(image, header),
                         fits.ImageHDU(calibration), sky])
    buffer = io.BytesIO()
    hdul.writeto(buffer)
    path.write_bytes(bz2.compress(buffer.getvalue()))
    return image, calibration, allsky


def test_synthetic_frame_downloaded_into_cache_dir(monkeypatch, tmp_path):
    # Field 137 is not bundled: "download" a synthetic frame and a copy of
    # field 136's psField; the photoField (per camcol) is bundled.
    frame_url = f"{SAS}/photoObj/frames/301/2583/2/frame-r-002583-2-0137.fits.bz2"
    psfield_url = f"{SAS}/photo/redux/301/2583/objcs/2/psField-002583-2-0137.fit"
    calls = []

    def fake_download(url, cache=False, **kwargs):
        calls.append((url, cache))
        path = tmp_path / "download" / Path(url).name
        path.parent.mkdir(exist_ok=True)
        if url == frame_url:
            _write_synthetic_frame(path)
        else:
            assert url == psfield_url
            shutil.copy(DATA / "sdss" / "psField-002583-2-0136.fit", path)
        return str(path)

    monkeypatch.setattr(sdss, "download_file", fake_download)
    cache = tmp_path / "cache"
    image = load_sdss_frame(2583, 2, 137, ("r",), cache_dir=cache)
    assert sorted(calls) == sorted([(frame_url, False), (psfield_url, False)])
    assert sorted(p.name for p in cache.iterdir()) == [
        "frame-r-002583-2-0137.fits.bz2", "psField-002583-2-0137.fit"]

    nmgy, calibration, allsky = _write_synthetic_frame(tmp_path / "expected.bz2")
    gain = np.float32(4.6)  # photoField, field 137, r
    # Nearest ALLSKY node of each row and column; ties (row 0.5 etc.) go down.
    iy, ix = [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2, 3, 3]
    sky = allsky[np.ix_(iy, ix)] * gain
    np.testing.assert_allclose(image.meta["background"][0], sky, rtol=1e-6)
    np.testing.assert_allclose(image.data[0], nmgy * gain / calibration + sky,
                               rtol=1e-6)
    assert image.meta["nelec_per_nmgy"][0] == pytest.approx(
        np.mean(4.6 / calibration.astype(float)), rel=1e-6)
    assert image.meta["field"] == 137
    # A second call finds the files in cache_dir.
    calls.clear()
    load_sdss_frame(2583, 2, 137, ("r",), cache_dir=cache)
    assert calls == []


def test_download_into_astropy_cache(monkeypatch):
    calls = []

    def fake_download(url, cache=False, **kwargs):
        calls.append((url, cache))
        name = Path(url).name.replace("0137", "0136")
        return str(DATA / "sdss" / name)

    monkeypatch.setattr(sdss, "download_file", fake_download)
    image = load_sdss_frame(2583, 2, 137, ("r",), cutout=((0, 2), (0, 2)))
    assert image.data.shape == (1, 2, 2)
    assert len(calls) == 2
    assert all(cache is True for _, cache in calls)


@pytest.mark.parametrize("fx, fy", [(0.42, 0.80), (0.1, 0.5)])
def test_resampled_psf_is_the_psf_of_a_bilinearly_resampled_image(fx, fy):
    """Render stars on a frame, resample it bilinearly at pixel fractions (fx, fy) as
    load_sdss_frame does, and compare with the stars rendered through resampled_psf."""
    from scipy.ndimage import map_coordinates
    from starnet import PowerLawPSF
    from starnet.datasets.sdss import resampled_psf
    from starnet.simulate import StarFieldRenderer

    psf = PowerLawPSF(sigma1=0.9, sigma2=2.2, sigmap=1.6, beta=2.3, b=0.06, p0=0.01)
    shape = (40, 40)
    frame_xy = np.array([[12.3, 14.8], [25.6, 22.1]])       # stars in frame pixels
    fluxes = torch.tensor([[[1e4], [2e4]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    frame = StarFieldRenderer([psf], stamp_size=31).render(
        torch.tensor(frame_xy[None], dtype=torch.float32), fluxes, mask, shape)[0, 0]
    rows, cols = np.mgrid[0:shape[0] - 1, 0:shape[1] - 1]
    resampled = map_coordinates(frame.double().numpy(), [rows + fy, cols + fx], order=1)
    # output pixel (r, c) sits at frame (r + fy, c + fx): stars move by -(fx, fy)
    out_xy = frame_xy - [fx, fy]
    expected = StarFieldRenderer([resampled_psf(psf, fx, fy, size=31)], stamp_size=31).render(
        torch.tensor(out_xy[None], dtype=torch.float32), fluxes, mask,
        resampled.shape)[0, 0].double().numpy()
    sharp = StarFieldRenderer([psf], stamp_size=31).render(
        torch.tensor(out_xy[None], dtype=torch.float32), fluxes, mask,
        resampled.shape)[0, 0].double().numpy()
    peak = resampled.max()
    # 1 % of the peak: the interpolation of an image PSF at sub-pixel offsets
    assert np.abs(resampled - expected).max() < 0.02 * peak
    assert np.abs(resampled - sharp).max() > 0.05 * peak     # the blur is real
