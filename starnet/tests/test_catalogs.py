import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable
from numpy.testing import assert_array_equal
from photutils.psf import CircularGaussianPRF, CircularGaussianPSF

from starnet import PowerLawPSF, match_catalogs, to_photutils
from starnet.catalogs import (CATALOG_FLAGS, bad_pixel_map, catalog_flags, decode_flags,
                              modal_table)
from starnet.psf import pixel_stamps, psf_fwhm


def test_flag_bits_are_distinct_powers_of_two():
    bits = list(CATALOG_FLAGS)
    assert bits == [1 << k for k in range(len(bits))]
    assert [name for name, _ in CATALOG_FLAGS.values()] == [
        "edge", "bad_pixels", "low_detection", "blend", "saturated"]
    assert decode_flags(np.array([15, 0, 2])) == [
        ["edge", "bad_pixels", "low_detection", "blend"], [], ["bad_pixels"]]


def test_catalog_flags_each_bit():
    # 40 x 30 image (rows, cols), tiles of 4 pixels seeing 5 pixels around them: only
    # the tiles of columns 8..23 and of rows 8..31 see nothing beyond the edge
    x = np.array([15.0, 7.4, 7.6, 23.4, 23.6, 12.0, 12.0, 8.0, 16.5])
    y = np.array([20.0, 12.0, 16.0, 12.0, 16.0, 7.4, 31.4, 31.6, 20.0])
    prob = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.49, 0.5])
    flags = catalog_flags(x, y, prob, shape=(40, 30), tile_size=4, padding=5, fwhm=2.0)
    # star 0 and star 8 are 1.5 pixels apart: a blend
    assert_array_equal(flags, [8, 1, 0, 0, 1, 1, 0, 1 | 4, 8])
    # with fluxes, only the fainter of the two is blended by the other
    for flux, blended in (([2.0] * 8 + [1.0], 8), ([1.0] * 8 + [2.0], 0)):
        flags = catalog_flags(x, y, prob, shape=(40, 30), tile_size=4, padding=5, fwhm=2.0,
                              flux=flux)
        assert np.flatnonzero(flags & 8).tolist() == [blended]
    flags = catalog_flags(x, y, prob, shape=(40, 30), tile_size=4, padding=5, fwhm=2.0,
                          flux=np.ones(9))
    assert np.flatnonzero(flags & 8).tolist() == [0, 8]
    bad = np.zeros((40, 30), bool)
    bad[20, 17] = True   # 2 pixels from star 0, 0.5 from star 8
    flags = catalog_flags(x, y, prob, shape=(40, 30), tile_size=4, padding=5, fwhm=2.0,
                          bad=bad)
    assert_array_equal(flags & 2, [2, 0, 0, 0, 0, 0, 0, 0, 2])
    flags = catalog_flags(x, y, prob, shape=(40, 30), tile_size=4, padding=5, fwhm=1.9,
                          bad=bad)
    assert_array_equal(flags & 2, [0, 0, 0, 0, 0, 0, 0, 0, 2])
    # a star inside a large bad region is on a bad pixel
    bad[10:35, 5:25] = True
    flags = catalog_flags(x, y, prob, shape=(40, 30), tile_size=4, padding=5, fwhm=0.1,
                          bad=bad)
    assert_array_equal(flags & 2 > 0, bad[np.round(y).astype(int), np.round(x).astype(int)])
    empty = catalog_flags([], [], [], shape=(40, 30), tile_size=4, padding=5, fwhm=2.0,
                          bad=bad)
    assert empty.shape == (0,) and empty.dtype == np.int64


def test_bad_pixel_map():
    data = np.ones((2, 4, 5))
    assert bad_pixel_map(NDData(data)) is None
    data[1, 2, 3] = np.nan
    mask = np.zeros((4, 5), bool)
    mask[0, 0] = True
    bad = bad_pixel_map(NDData(data, mask=mask))
    assert bad.shape == (4, 5)
    assert_array_equal(np.argwhere(bad), [[0, 0], [2, 3]])


@pytest.mark.parametrize("fwhm", [1.5, 2.5, 4.0])
def test_psf_fwhm(fwhm):
    assert psf_fwhm(CircularGaussianPSF(fwhm=fwhm)) == pytest.approx(fwhm, rel=0.01)
    power_law = PowerLawPSF(sigma1=fwhm / np.sqrt(8 * np.log(2)), sigma2=3.0, b=0.0, p0=0.0)
    assert psf_fwhm(power_law) == pytest.approx(fwhm, rel=1e-6)
    # pixel-integrated: wider, by the pixel's own width added in quadrature (about)
    wider = np.sqrt(fwhm**2 + 2.3548**2 / 12)
    assert psf_fwhm(CircularGaussianPRF(fwhm=fwhm)) == pytest.approx(wider, rel=0.03)
    image = pixel_stamps(power_law, 25, [0.0], [0.0])[0]
    assert psf_fwhm(image) == pytest.approx(wider, rel=0.05)


def starnet_catalog():
    return QTable({"id": [1, 2, 3], "x_fit": [10.1, 20.0, 30.3], "y_fit": [10.0, 19.8, 5.0],
                   "x_err": [0.1, 0.2, 0.1], "y_err": [0.1, 0.2, 0.3],
                   "flux_r": [1000.0, 2000.0, 3000.0] * u.electron,
                   "flux_r_err": [50.0, 60.0, 70.0] * u.electron,
                   "flux_i": [1500.0, 2500.0, 3500.0] * u.electron,
                   "flux_i_err": [55.0, 65.0, 75.0] * u.electron,
                   "mag_r": [-7.5, -8.25, -8.69] * u.mag,
                   "detection_prob": [0.9, 0.6, 0.3], "flags": [0, 8, 4]},
                  meta={"bands": ["r", "i"], "version": "x"})


def test_to_photutils_names_and_values():
    catalog = starnet_catalog()
    table = to_photutils(catalog, band="i")
    assert table.colnames == ["id", "x_fit", "y_fit", "flux_fit", "x_err", "y_err",
                              "flux_err", "flags", "detection_prob"]
    assert_array_equal(table["flux_fit"], catalog["flux_i"])
    assert_array_equal(table["flux_err"], catalog["flux_i_err"])
    assert table["flux_fit"].unit == u.electron
    assert_array_equal(table["flags"], catalog["flags"])
    assert table.meta["band"] == "i" and table.meta["version"] == "x"
    # scored the same as the catalog it came from
    truth = QTable({"x": [10.0, 30.0], "y": [10.0, 5.0],
                    "flux_i": [1500.0, 3600.0] * u.electron})
    assert_array_equal(match_catalogs(table, truth, band="i").pairs,
                       match_catalogs(catalog, truth, band="i").pairs)


def test_to_photutils_errors():
    catalog = starnet_catalog()
    with pytest.raises(ValueError, match=r"bands \['r', 'i'\]; pass band="):
        to_photutils(catalog)
    with pytest.raises(ValueError, match=r"lacks the columns \['flux_g', 'flux_g_err'\]"):
        to_photutils(catalog, band="g")
    one = catalog[["x_fit", "y_fit", "x_err", "y_err", "flux_r", "flux_r_err", "flags"]]
    one.meta = {}
    table = to_photutils(one)   # the only band, from the column names
    assert table.meta["band"] == "r"
    assert_array_equal(table["id"], [1, 2, 3])


def test_the_lower_limit_of_a_saturated_star_is_its_recorded_saturated_light():
    """A star of 1e6 e- whose log flux has deviation 0.1 has a 5 % quantile of
    1e6 exp(-1.645 x 0.1) = 848,000 e-; two saturated pixels within a FWHM of it
    recorded 300,000 e- in all, which its flux must exceed: that is its q05. A star far
    from them keeps its posterior quantile."""
    rows = {"locs": np.array([[10.0, 10.0], [30.0, 30.0]]), "sd": np.full((2, 2), 0.1),
            "fluxes": np.array([[1e6], [1e6]]), "flux_sd": np.array([[0.1], [0.1]]),
            "detection": np.array([1.0, 1.0])}
    saturated = np.zeros((40, 40), bool)
    saturated[10, 10:12] = True
    meta = {"background_median": [700.0], "saturated_pixels": saturated,
            "saturated_light": (np.array([0, 0]), np.array([10, 11]), np.array([10, 10]),
                                np.array([1.5e5, 1.5e5]))}
    table = modal_table(rows, 0, np.array([0.0, 0.0, 1.0]),
                        nddata=NDData(np.zeros((1, 40, 40))), meta=meta, bands=["r"],
                        tile_size=2, max_sources=3, padding=7, fwhm=2.5)
    assert decode_flags(table["flags"]) == [["saturated"], []]
    np.testing.assert_allclose(table["flux_r_q05"].value,
                               [3e5, 1e6 * np.exp(-1.6448536 * 0.1)], rtol=1e-6)
