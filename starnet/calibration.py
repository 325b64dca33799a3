"""Checking a deblender on images simulated from its own generative model."""

import numpy as np
from astropy.table import QTable
from scipy.stats import norm

from .matching import match_catalogs
from .simulate import simulate_starfield

__all__ = ["evaluate_on_simulations", "count_coverage"]


def evaluate_on_simulations(deblender, *, n_images=20, shape=(100, 100), seed=0, margin=6.0,
                            levels=(0.5, 0.8, 0.9, 0.95), psf=None):
    """Detection accuracy and calibration of the star count on simulated images.

    Images are drawn from the deblender's own prior and background, through its own
    PSFs or through others (``psf``), to see what a PSF error does; stars are drawn
    ``margin`` pixels beyond the edges too, as on a real sky, and only stars inside
    the image count as truth.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    n_images : int, optional
    shape : tuple of int, optional
        ``(rows, cols)`` of the images.
    seed : int, optional
        Image ``k`` is simulated with seed ``seed + k``.
    margin : float, optional
    levels : sequence of float, optional
        Credible levels of the central intervals of the star count to check.
    psf : list, optional
        One PSF per band that renders the images (default: the deblender's). The
        images' ``meta['psf']`` is this PSF, so a large mismatch is warned about.

    Returns
    -------
    results : `~astropy.table.QTable`
        One row per image: ``n_true``, ``n_estimated`` (modal catalog),
        ``n_stars_mean``, ``tpr``, ``ppv``, ``f1`` (one-to-one matching in the first
        band), and for each level ``L`` the interval ``n_low_L``, ``n_high_L`` and
        whether it ``covered_L`` the true count. ``meta['source_coverage']`` gives,
        for the matched stars of all images and each level, the fraction whose true
        ``x``, ``y`` and log flux in the first band lie within the normal interval
        ``estimate +- z * posterior sd`` (matched stars are the well-measured ones, so
        this reads high when the errors are right).
    """
    rows = []
    band = deblender.bands[0]
    z_scores = {"x": [], "y": [], f"flux_{band}": []}
    for k in range(n_images):
        image, truth = simulate_starfield(shape, prior=deblender.prior,
                                          psf=deblender.psfs if psf is None else psf,
                                          background=deblender.background, seed=seed + k,
                                          margin=margin, stamp_size=deblender.stamp_size)
        inside = ((truth["x"] >= -0.5) & (truth["x"] < shape[1] - 0.5)
                  & (truth["y"] >= -0.5) & (truth["y"] < shape[0] - 0.5))
        truth = truth[inside]
        catalog = deblender(image, background="given")
        match = match_catalogs(catalog, truth, band=band)
        est, ref = match.pairs[:, 0], match.pairs[:, 1]
        for axis in ("x", "y"):
            z_scores[axis].append((np.asarray(catalog[f"{axis}_fit"])[est]
                                   - np.asarray(truth[axis])[ref])
                                  / np.asarray(catalog[f"{axis}_err"])[est])
        log_sd = catalog[f"mag_{band}_err"].value[est] * np.log(10) / 2.5
        z_scores[f"flux_{band}"].append(
            np.log(catalog[f"flux_{band}"].value[est] / truth[f"flux_{band}"].value[ref])
            / log_sd)
        pmf = deblender.count_posterior(image, background="given")
        row = {"image": k, "n_true": len(truth), "n_estimated": len(catalog),
               "n_stars_mean": float(np.dot(np.arange(len(pmf)), pmf)),
               "tpr": match.tpr, "ppv": match.ppv, "f1": match.f1}
        cdf = np.cumsum(pmf)
        for level in levels:
            low = int(np.searchsorted(cdf, (1 - level) / 2))
            high = int(np.searchsorted(cdf, 1 - (1 - level) / 2))
            row[f"n_low_{level:g}"] = low
            row[f"n_high_{level:g}"] = high
            row[f"covered_{level:g}"] = low <= len(truth) <= high
        rows.append(row)
    results = QTable(rows=rows, names=list(rows[0]))
    results.meta["levels"] = list(levels)
    results.meta["source_coverage"] = {
        name: [float(np.mean(np.abs(np.concatenate(z)) <= norm.ppf(0.5 + level / 2)))
               for level in levels]
        for name, z in z_scores.items()}
    return results


def count_coverage(results):
    """Coverage of the star-count intervals in `evaluate_on_simulations` results.

    Returns a QTable with ``level`` (nominal) and ``coverage`` (fraction of images whose
    interval holds the true count); ``meta['relative_bias']`` is the mean of
    ``(n_stars_mean - n_true) / n_true``.
    """
    levels = results.meta["levels"]
    table = QTable()
    table["level"] = levels
    table["coverage"] = [float(np.mean(results[f"covered_{level:g}"])) for level in levels]
    table.meta["relative_bias"] = float(np.mean(
        (results["n_stars_mean"] - results["n_true"]) / results["n_true"]))
    return table
