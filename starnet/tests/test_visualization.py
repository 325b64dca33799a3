import numpy as np
import pytest
from astropy import units as u
from astropy.table import QTable
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import poisson

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield, \
    to_photutils
from starnet.visualization import (plot_catalog, plot_count_posterior, quicklook,
                                   residual_image)

PSF = PowerLawPSF(sigma1=0.9, sigma2=2.3, b=0.06, p0=0.0)
SKY = 686.0
PRIOR = StarFieldPrior(mu=0.02, f_min=1000.0, bands=["r"])
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def deblender():
    """An untrained one-band model: its PSF renders catalogs, whatever its encoder."""
    return StarNetDeblender(prior=PRIOR, psf=PSF, background=[SKY], hidden=8, tile_hidden=16,
                            stamp_size=15)


def _simulated(shape, seed, **kwargs):
    return simulate_starfield(shape, prior=PRIOR, psf=PSF, noise="poisson", seed=seed,
                              stamp_size=15, **kwargs)


def test_residual_of_the_true_catalog_is_poisson_noise(deblender):
    """Image rendered from its true catalog by the same renderer, with Poisson noise: the
    residual has mean 0 and the variance of the expected counts (sky + star light)."""
    image, truth = _simulated((64, 64), 1, background=SKY)
    assert len(truth) > 40
    residual = residual_image(deblender, image, truth)
    assert residual.unit == u.electron and residual.data.shape == (1, 64, 64)
    assert residual.meta["background_source"] == "given" and not residual.mask.any()
    data = residual.data[0]
    expected = SKY + deblender.render(truth, (64, 64))[0]     # Poisson mean = variance
    n = data.size
    assert abs(data.mean()) < 4 * np.sqrt(expected.mean() / n)
    pulls = data / np.sqrt(expected)
    assert pulls.std() == pytest.approx(1.0, abs=4 / np.sqrt(2 * n))
    # away from the stars the noise is the sky's alone
    sky_only = expected < SKY + 1.0
    assert sky_only.sum() > 300
    assert data[sky_only].std() == pytest.approx(np.sqrt(SKY), rel=0.1)
    # a star left out stands out by its flux
    brightest = np.argmax(truth["flux_r"])
    without = residual_image(deblender, image, truth[np.arange(len(truth)) != brightest])
    extra = without.data[0] - data
    assert extra.sum() == pytest.approx(truth["flux_r"][brightest].value, rel=1e-3)


def test_residual_subtracts_a_background_map_and_marks_bad_pixels(deblender):
    gradient = SKY + np.linspace(-200, 200, 48)[None, None, :] * np.ones((1, 48, 48))
    image, truth = _simulated((48, 48), 2, background=gradient)
    image.mask = np.zeros((1, 48, 48), bool)
    image.mask[0, :4, :5] = True
    residual = residual_image(deblender, image, truth)
    assert np.array_equal(residual.mask, image.mask)
    assert np.isnan(residual.data[image.mask]).all()
    good = residual.data[~image.mask]
    assert abs(good.mean()) < 4 * np.sqrt(gradient.max() / good.size)
    # the columns' means follow no trend: the gradient is gone
    slope = np.polyfit(np.arange(48), np.nanmean(residual.data[0], axis=0), 1)[0]
    assert abs(slope) < 0.5


def test_residual_uses_the_background_the_catalog_was_made_with(deblender):
    image, truth = _simulated((24, 24), 3, background=SKY)
    truth.meta["background_source"] = "fitted"
    with pytest.raises(ValueError, match="background='fit' needs a model with a background"):
        residual_image(deblender, image, truth)
    assert residual_image(deblender, image, truth, background="given").data.shape == (1, 24, 24)


def test_render_refuses_a_catalog_without_fluxes(deblender):
    catalog = QTable({"x": [3.0], "y": [4.0]})
    with pytest.raises(ValueError, match=r"the catalog lacks flux_r \(its columns: x, y\)"):
        deblender.render(catalog, (8, 8))
    photutils_catalog = to_photutils(QTable({
        "id": [1], "x_fit": [3.0], "y_fit": [4.0], "x_err": [0.1], "y_err": [0.1],
        "flux_r": [1e3] * u.electron, "flux_r_err": [10.0] * u.electron,
        "flags": [0], "detection_prob": [1.0]}), band="r")
    with pytest.raises(ValueError, match="lacks flux_r"):
        deblender.render(photutils_catalog, (8, 8))
    with pytest.raises(ValueError, match=r"lacks x_fit, y_fit \(or x, y\)"):
        deblender.render(QTable({"flux_r": [1.0]}), (8, 8))


def _catalog():
    return QTable({"x_fit": [3.0, 7.2, 9.5], "y_fit": [4.0, 5.5, 1.0],
                   "x_err": [0.1, 0.4, 1.5], "y_err": [0.2, 0.3, 2.0],
                   "detection_prob": [0.99, 0.6, 0.1]})


def test_plot_catalog_draws_one_ellipse_per_star_coloured_by_detection():
    catalog = _catalog()
    image = np.random.default_rng(0).normal(100.0, 10.0, (3, 10, 12))
    figure = Figure()
    FigureCanvasAgg(figure)
    ax = plot_catalog(image, catalog, band=1, ax=figure.subplots())
    figure.canvas.draw()
    (ellipses,) = ax.collections
    np.testing.assert_allclose(ellipses.get_offsets(), np.column_stack(
        [catalog["x_fit"], catalog["y_fit"]]))
    # half-axes: the posterior standard deviations (matplotlib keeps half-widths)
    np.testing.assert_allclose(ellipses._widths, catalog["x_err"])
    np.testing.assert_allclose(ellipses._heights, catalog["y_err"])
    colours = ellipses.get_edgecolor()
    np.testing.assert_allclose(colours, ellipses.cmap(np.array([0.99, 0.6, 0.1])))
    assert ellipses.get_clim() == (0.0, 1.0)
    np.testing.assert_array_equal(ax.images[0].get_array(), image[1])
    assert ax.get_title() == "3 stars, band 1"


def test_plot_catalog_takes_band_names_and_checks_its_inputs(deblender):
    image, _ = _simulated((16, 16), 4, background=SKY)
    ax = plot_catalog(image, _catalog(), band="r", ax=Figure().subplots())
    assert ax.get_title() == "3 stars, band r"
    with pytest.raises(ValueError, match=r"band 'g' is not one of the image's bands \['r'\]"):
        plot_catalog(image, _catalog(), band="g", ax=Figure().subplots())
    with pytest.raises(ValueError, match=r"lacks the columns \['x_err', 'y_err'"):
        plot_catalog(image, QTable({"x_fit": [1.0], "y_fit": [1.0]}), ax=Figure().subplots())


def test_plot_catalog_on_pyplot_axes():
    import matplotlib.pyplot as plt
    plt.figure()
    try:
        ax = plot_catalog(np.ones((10, 12)), _catalog())
        assert ax is plt.gca() and len(ax.collections[0].get_offsets()) == 3
    finally:
        plt.close("all")


def test_plot_count_posterior_marks_mean_and_90_percent_interval():
    pmf = poisson.pmf(np.arange(400), 150.0)
    ax = plot_count_posterior(pmf, truth=160, ax=Figure().subplots())
    q05, q95 = poisson.ppf([0.05, 0.95], 150.0)
    low, high = poisson.ppf([0.001, 0.999], 150.0)
    assert len(ax.patches) == high - low + 1 + 1          # the bars and the interval
    bars = [p for p in ax.patches if p.get_width() == 1.0]
    assert bars[0].get_x() + 0.5 == low and bars[-1].get_x() + 0.5 == high
    mean_line, truth_line = ax.lines
    assert mean_line.get_xdata()[0] == pytest.approx(150.0, abs=1e-6)
    assert truth_line.get_xdata()[0] == 160
    assert ax.get_title() == f"number of stars: 150.0 ({q05:.0f}, {q95:.0f})"
    assert f"90 % interval ({q05:.0f}, {q95:.0f})" in [
        text.get_text() for text in ax.get_legend().get_texts()]


@pytest.mark.parametrize("pmf", [np.ones((2, 3)) / 6, [0.5, 0.6], [1.2, -0.2]])
def test_plot_count_posterior_refuses_what_is_not_a_pmf(pmf):
    with pytest.raises(ValueError, match="pmf must be the probabilities of 0, 1, 2"):
        plot_count_posterior(pmf, ax=Figure().subplots())


def test_quicklook_writes_a_png_and_never_clobbers(deblender, tmp_path):
    image, _ = _simulated((24, 24), 5, background=SKY)
    catalog = deblender(image, progress=False)
    path = tmp_path / "quicklook.png"
    figure = quicklook(deblender, image, catalog, path)
    assert path.read_bytes()[:8] == PNG
    image_ax, residual_ax, count_ax = figure.axes[:3]
    assert len(image_ax.collections[0].get_offsets()) == len(catalog)
    np.testing.assert_allclose(residual_ax.images[0].get_array(),
                               residual_image(deblender, image, catalog).data[0])
    assert count_ax.get_xlabel() == "number of stars"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="quicklook.png exists; pass overwrite=True"):
        quicklook(deblender, image, catalog, path)
    assert path.read_bytes() == b"keep me"
    pmf = np.zeros(10)
    pmf[3] = 1.0
    figure = quicklook(deblender, image, catalog, path, pmf=pmf, overwrite=True)
    assert path.read_bytes()[:8] == PNG
    assert figure.axes[2].get_title() == "number of stars: 3.0 (3, 3)"
