"""The StarNet paper's M2 benchmark: Table 1 and Figures 7 to 9, live.

Run it with ``python -m starnet.m2_benchmark`` or ``starnet benchmark m2``
(``--help`` lists the options).
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.nddata import NDData
from astropy.table import QTable
from matplotlib.figure import Figure

from . import __version__
from .background import fit_background as fit_image_background
from .baselines import CatalogSampler, daophot_catalog
from .datasets import load_m2, load_m2_daophot
from .deblender import StarNetDeblender
from .devices import PRECISIONS, as_precision
from .matching import match_catalogs, metrics_by_magnitude, position_columns
from .images import as_background
from .validation import check_seed

__all__ = ["run_m2_benchmark", "main"]

BORDER = 3
"""Pixels around the 100 x 100 region given to the catalogers (as in the paper)."""

FIGURES = {"fig7": "fig7_m2_catalogs.png", "fig8": "fig8_m2_tpr_ppv_by_magnitude.png",
           "fig9": "fig9_m2_magnitudes.png"}
RESULTS_FILE = "m2_table1.ecsv"
MAGNITUDE_BINS = np.arange(15.0, 22.75, 0.5)

# Table 1 of Liu, Regier et al. (2023), with the paper code's matching rule.
QUOTED = [
    {"method": "PCAT (Portillo et al. 2017), quoted", "tpr_paper": 0.55, "ppv_paper": 0.37,
     "f1_paper": 0.44, "n_mean": 1672.0, "n_q05": 1664.0, "n_q95": 1680.0},
    {"method": "StarNet (Liu et al. 2023), quoted", "tpr_paper": 0.53, "ppv_paper": 0.48,
     "f1_paper": 0.50, "n_mean": 1462.0, "n_q05": 1430.0, "n_q95": 1497.0},
]
_COLUMNS = ["tpr", "ppv", "f1", "tpr_paper", "ppv_paper", "f1_paper", "n_estimated",
            "n_mean", "n_q05", "n_q95", "wall_time"]
_HEADER = (f"{'method':<46} {'one-to-one':^17} {'paper rule':^17} {'N cat':>6} "
           f"{'N posterior':>20} {'time':>7}\n"
           f"{'':<46} {'TPR   PPV   F1':^17} {'TPR   PPV   F1':^17}")


MODELS = ("sdss-m2", "sdss-m2-powerlaw")
"""The bundled M2 models, compared by default: one per PSF."""


def run_m2_benchmark(*, model=MODELS, output_dir="benchmark_output", overwrite=False,
                     fit_background=True, wake=False, n_samples=200, seed=0, pcat_minutes=0.0,
                     refine_sweeps=0, precision=None, grid_consensus=False, verbose=True):
    """Reproduce the StarNet paper's M2 results (Table 1, Figures 7 to 9).

    The paper's evaluation: SDSS run 2583, camcol 2, field 136, r and i bands, the
    100 x 100 pixel region at frame rows 630:730 and columns 310:410, against its 1114
    HST stars (r flux above 1000 electrons). The catalogers see the region with a
    3-pixel border (`~starnet.datasets.load_m2` with ``border=3``); estimated stars
    are kept, as the HST stars were, when they lie strictly inside the region (between
    the centres of its first and last pixels), and the magnitudes of all catalogs are
    ``22.5 - 2.5 log10(flux_r / 856.09845)``. A star is matched within 0.5 pixel and
    0.5 mag under two rules (see `~starnet.match_catalogs`):

    * one-to-one: each star used at most once, Euclidean distance, the whole region;
    * the paper code's rule: an estimate may match any true star, L-infinity
      distance, stars within 5 pixels of the region's edge left out (931 HST stars).

    Rows, printed as they are computed:

    * StarNet (this package), for each model (the bundled ones differ by their PSF: the
      field's SDSS KL PSF, ``sdss-m2``, and the psField power law,
      ``sdss-m2-powerlaw``): the modal catalog with the SDSS sky as background and,
      with ``fit_background`` (for a model with a background encoder), with the
      background fitted by ``starnet.background.fit_background``. ``N posterior`` is
      the mean and 5 and 95 % quantiles of the number of stars strictly inside the
      region over ``n_samples`` catalogs drawn from the posterior. The figures show
      the first model's catalogs. With ``wake``, the first model also gets a row
      whose background is refined by the wake phase (`starnet.wake`: power-law PSF
      and background factors fitted to the image under 8 posterior catalogs drawn
      with the fitted background; the catalog uses the refined background and the
      model's own PSF).
    * DAOPHOT-like: `starnet.baselines.daophot_catalog` on the r band, run live.
    * PCAT-like MCMC, live, with ``pcat_minutes > 0``: `starnet.baselines.CatalogSampler`
      (one chain from an empty catalog, the first model's prior, the image's PSFs and
      the background fitted for the first model, else the SDSS sky) run for
      ``pcat_minutes`` of wall time, the first half burn-in, then
      ``n_samples`` catalogs kept; the scores are those of the last catalog, ``N
      posterior`` over the kept ones.
    * DAOPHOT (An et al. 2008): the published catalogue (`~starnet.datasets.load_m2_daophot`).
    * PCAT and the paper's StarNet: numbers quoted from the paper's Table 1, not
      recomputed (marked "quoted"; given under the paper code's rule).

    Parameters
    ----------
    model : str, path, `~starnet.StarNetDeblender` or a list of them, optional
        Bundled model names (`~starnet.StarNetDeblender.available`), model files
        written by `~starnet.StarNetDeblender.save`, or deblenders.
    output_dir : str or path, optional
        Folder for the figures and the results table (created if needed).
    overwrite : bool, optional
        Replace existing output files; otherwise an existing one is an error,
        raised before any work.
    fit_background : bool, optional
        Also report StarNet with a fitted background.
    wake : bool, optional
        Also report the first model with the background refined by the wake phase
        (about a minute and a half on 2 cores).
    n_samples : int, optional
        Posterior catalogs drawn for the count posterior.
    pcat_minutes : float, optional
        Wall time of the live PCAT-like row, minutes (0: no row; the paper quotes
        about 30 minutes per 100 x 100 image for PCAT).
    refine_sweeps : int, optional
        Add a row of the first model's catalog (fitted background) refined by this
        many sweeps of the PCAT-like MCMC under the same model: its modal catalog
        refined for the scores, 50 of its posterior catalogs (one chain each) for
        ``N posterior`` (0: no row).
    seed : int, optional
        Seed of the posterior draws.
    precision : {None, 'float32', 'bfloat16'}, optional
        Of StarNet's network in its modal catalogs and posterior draws (the wake
        phase's included; `~starnet.StarNetDeblender.__call__`); recorded in the
        results' metadata.
    grid_consensus : bool, optional
        Also give the first model's rows (SDSS sky and fitted background) a row ``, 4
        grids``: the catalog that the shifted tile grids agree on (``grid_consensus=True`` of
        `~starnet.StarNetDeblender.__call__`; the same count posterior).
    verbose : bool, optional
        Print the table row by row.

    Returns
    -------
    results : `~astropy.table.QTable`
        One row per method: ``method``, ``kind`` (``'truth'``, ``'live'``,
        ``'catalogue'``, ``'quoted'``, or ``'failed'`` when the background fit
        raised an error, which is printed), ``tpr``, ``ppv``, ``f1`` (one-to-one),
        ``tpr_paper``, ``ppv_paper``, ``f1_paper`` (paper code's rule),
        ``n_estimated`` (stars in the region), ``n_mean``, ``n_q05``, ``n_q95``
        (posterior of the count) and ``wall_time`` (seconds: for StarNet the
        modal catalog, the posterior draws and any background fit; for a ``4 grids``
        row its catalog alone); NaN where not
        applicable. Also written to ``output_dir`` as ``m2_table1.ecsv``, next to
        ``fig7_m2_catalogs.png`` (the catalogs over the r image),
        ``fig8_m2_tpr_ppv_by_magnitude.png`` (TPR and PPV against r magnitude,
        one-to-one) and ``fig9_m2_magnitudes.png`` (magnitude distributions).
    """
    if not (isinstance(n_samples, (int, np.integer)) and n_samples >= 20):
        raise ValueError(f"n_samples must be an integer >= 20 (for 5 and 95 % quantiles), "
                         f"got {n_samples!r}")
    check_seed(seed)
    as_precision(precision)           # an unknown precision fails before any work
    precision = precision or "float32"
    output_dir = _check_output_dir(Path(output_dir))
    outputs = [output_dir / name for name in (*FIGURES.values(), RESULTS_FILE)]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; pass overwrite=True "
                              "(--overwrite) to replace them")
    models = [model] if isinstance(model, (str, Path, StarNetDeblender)) else list(model)
    deblenders = [StarNetDeblender.from_name_or_path(m) for m in models]
    say = print if verbose else (lambda *args, **kwargs: None)

    image, truth = load_m2(border=BORDER)
    region = image.meta["region"]
    nelec = image.meta["evaluation"]["nelec_per_nmgy"]
    truth = _in_region(truth, region, nelec)
    say("M2 (NGC 7089), SDSS run 2583 camcol 2 field 136, frame rows 630:730 cols 310:410;"
        f" {len(truth)} HST stars with r flux > 1000 e-.")
    say("Matched within 0.5 px and 0.5 mag. one-to-one: each star used once, Euclidean; "
        "paper rule: any match, L-inf,\n5 px border dropped. N cat: stars in the region; "
        "N posterior: mean (5 %, 95 %)."
        + ("" if precision == "float32" else f" StarNet's network in {precision}."))
    say(_HEADER)

    rows, catalogs = [], {}

    def add(row, catalog=None):
        row = {name: np.nan for name in _COLUMNS} | row
        if catalog is not None:
            row.update(_scores(catalog, truth))
        rows.append(row)
        say(_format(row), flush=True)

    add({"method": "HST truth", "kind": "truth", "n_estimated": len(truth)})

    def starnet_row(deblender, name, label, nddata, start, primary):
        counts = _posterior_counts(deblender, nddata, region, n_samples, seed, precision)
        for consensus in (False, True) if grid_consensus and primary else (False,):
            catalog = _in_region(deblender(nddata, background="given", precision=precision,
                                           grid_consensus=consensus), region, nelec)
            grids = ", 4 grids" if consensus else ""
            if primary:
                catalogs[f"StarNet ({label}){grids}"] = catalog
            add({"method": f"StarNet {name} ({label}){grids}", "kind": "live",
                 "n_mean": counts.mean(), "n_q05": np.quantile(counts, 0.05),
                 "n_q95": np.quantile(counts, 0.95),
                 "wall_time": time.perf_counter() - start}, catalog)
            start = time.perf_counter()

    pcat_image, pcat_background = image, "SDSS sky"   # the first model's fit, if made
    for index, (deblender, model_name) in enumerate(zip(deblenders, models)):
        name = _label(model_name)
        starnet_row(deblender, name, "SDSS sky", image, time.perf_counter(), index == 0)
        if not fit_background:
            continue
        start = time.perf_counter()
        try:
            fitted, _ = fit_image_background(deblender, image)
        except ValueError as err:
            say(f"StarNet {name} (fitted background): the fit failed: {err}")
            rows.append({column: np.nan for column in _COLUMNS}
                        | {"method": f"StarNet {name} (fitted background)", "kind": "failed"})
        else:
            starnet_row(deblender, name, "fitted background", fitted, start, index == 0)
            if index == 0:
                pcat_image, pcat_background = fitted, "fitted background"
            if index == 0 and refine_sweeps > 0:
                start = time.perf_counter()
                sampler = CatalogSampler(prior=deblender.prior)
                modal = deblender(fitted, background="given", progress=False,
                                  precision=precision)
                refined = sampler.sample(fitted, n_samples=1, n_sweeps=refine_sweeps,
                                         burn_in=0.0, init=modal, seed=seed)
                draws = deblender.sample(fitted, n_samples=min(n_samples, 50), seed=seed,
                                         background="given", progress=False,
                                         precision=precision)
                chains = sampler.sample(fitted, n_samples=1, n_sweeps=refine_sweeps,
                                        burn_in=0.0, init=draws, seed=seed)
                _, _, inside = _inside_region(chains["x_fit"], chains["y_fit"], region)
                counts = np.bincount(np.asarray(chains["sample"])[inside],
                                     minlength=min(n_samples, 50))
                add({"method": f"StarNet {name} + {refine_sweeps} MCMC sweeps (fitted)",
                     "kind": "live", "n_mean": counts.mean(),
                     "n_q05": np.quantile(counts, 0.05), "n_q95": np.quantile(counts, 0.95),
                     "wall_time": time.perf_counter() - start},
                    _in_region(refined, region, nelec))
            means = np.mean(as_background(fitted.meta["background"], len(deblender.bands),
                                          image.data.shape[1:]), axis=(1, 2))
            fit = fitted.meta["background_fit"]
            say(f"    fitted background: {fit['scale']:.3f} +- {fit['scale_sd']:.3f} times the "
                "model's (SDSS sky): " + ", ".join(
                    f"{band} {value:.0f} e-" for band, value in zip(deblender.bands, means)))
            if wake and index == 0:
                start = time.perf_counter()
                refined, scale = _wake_background(deblender, fitted, seed, precision)
                starnet_row(deblender, name, "wake background", refined, start, False)
                say("    wake phase: background x " + ", ".join(
                    f"{band} {value:.3f}" for band, value in zip(deblender.bands, scale))
                    + " on the fitted one")

    start = time.perf_counter()
    catalog = _in_region(daophot_catalog(image, band="r", nelec_per_nmgy=nelec), region, nelec)
    catalogs["DAOPHOT-like (photutils)"] = catalog
    add({"method": "DAOPHOT-like (photutils)", "kind": "live",
         "wall_time": time.perf_counter() - start}, catalog)

    if pcat_minutes > 0:
        start = time.perf_counter()
        samples = CatalogSampler(prior=deblenders[0].prior).sample(
            pcat_image, n_samples=n_samples, time_limit=60.0 * pcat_minutes, seed=seed)
        last = samples[samples["sample"] == n_samples - 1]
        catalog = _in_region(last, region, nelec)
        catalogs["PCAT-like MCMC (live)"] = catalog
        _, _, inside = _inside_region(samples["x_fit"], samples["y_fit"], region)
        counts = np.bincount(np.asarray(samples["sample"])[inside], minlength=n_samples)
        add({"method": f"PCAT-like MCMC, {pcat_minutes:g} min ({pcat_background})",
             "kind": "live",
             "n_mean": counts.mean(), "n_q05": np.quantile(counts, 0.05),
             "n_q95": np.quantile(counts, 0.95),
             "wall_time": time.perf_counter() - start}, catalog)
        say(f"    {samples.meta['n_sweeps']} sweeps; acceptance "
            + ", ".join(f"{k} {v:.2f}" for k, v in samples.meta["acceptance"].items()))

    catalog = _in_region(load_m2_daophot(border=BORDER), region, nelec)
    catalogs["DAOPHOT (An et al. 2008)"] = catalog
    add({"method": "DAOPHOT (An et al. 2008), published catalogue", "kind": "catalogue"},
        catalog)
    for quoted in QUOTED:
        add({**quoted, "kind": "quoted"})

    results = QTable(rows=rows, names=["method", "kind", *_COLUMNS])
    results["wall_time"].unit = u.s
    results.meta.update({
        "version": __version__, "model": [str(m) for m in models], "n_samples": n_samples,
        "seed": seed, "pcat_minutes": pcat_minutes, "precision": precision,
        "grid_consensus": bool(grid_consensus),
        "max_separation": 0.5, "max_mag_difference": 0.5, "paper_rule_border": 5,
        "nelec_per_nmgy": nelec, "n_true": len(truth),
        "n_true_paper_rule": int(_paper_match(truth, truth).n_true)})
    output_dir.mkdir(parents=True, exist_ok=True)
    results.write(output_dir / RESULTS_FILE, overwrite=True)
    _figure7(image, region, truth, catalogs, output_dir / FIGURES["fig7"])
    _figure8(truth, catalogs, output_dir / FIGURES["fig8"])
    _figure9(truth, catalogs, output_dir / FIGURES["fig9"])
    say(f"Wrote {', '.join(str(p) for p in outputs)}")
    return results


def _wake_background(deblender, nddata, seed, precision):
    """The image with its background refined by the wake phase, and the factors."""
    from .datasets import load_m2
    from .wake import _image_tensors, fit_psf_to_catalogs

    samples = deblender.sample(nddata, n_samples=8, seed=seed, background="given",
                               precision=precision)
    start = load_m2(psf="powerlaw")[0].meta["psf"]
    fit = fit_psf_to_catalogs(nddata, samples, psf=start, n_steps=100, stamp_size=19,
                              seed=seed)
    _, background = _image_tensors(nddata, len(deblender.bands))
    background = background.numpy() * fit.background_scale.reshape(-1, 1, 1)
    refined = NDData(nddata.data, unit=nddata.unit, mask=nddata.mask, wcs=nddata.wcs,
                     meta={**nddata.meta, "background": background})
    return refined, fit.background_scale


def _label(model):
    """Row label of a model: a bundled name, a file's stem, or '' for a deblender."""
    if isinstance(model, StarNetDeblender):
        return ""
    return Path(str(model)).stem


def _inside_region(x, y, region):
    """Region pixel coordinates of positions, and whether they are strictly inside.

    As for the HST truth: ``0 < x < n_cols - 1`` and ``0 < y < n_rows - 1`` in the
    region's pixel coordinates (between the centres of its first and last pixels).
    """
    rows, cols = region
    x = np.asarray(x, dtype=float) - cols.start
    y = np.asarray(y, dtype=float) - rows.start
    inside = ((x > 0) & (x < cols.stop - cols.start - 1)
              & (y > 0) & (y < rows.stop - rows.start - 1))
    return x, y, inside


def _in_region(catalog, region, nelec_per_nmgy):
    """Stars strictly inside the region, in region pixels, with the paper's magnitudes."""
    xcol, ycol = position_columns(catalog, "catalog")
    x, y, inside = _inside_region(catalog[xcol], catalog[ycol], region)
    table = QTable(meta=catalog.meta)
    table[xcol] = x[inside]
    table[ycol] = y[inside]
    flux = u.Quantity(catalog["flux_r"][inside], u.electron)
    table["flux_r"] = flux
    table["mag_r"] = (22.5 - 2.5 * np.log10(flux.value / nelec_per_nmgy)) * u.mag
    return table


def _posterior_counts(deblender, nddata, region, n_samples, seed, precision):
    """Number of stars strictly inside the region in each posterior draw."""
    samples = deblender.sample(nddata, n_samples=n_samples, seed=seed, background="given",
                               precision=precision)
    _, _, inside = _inside_region(samples["x_fit"], samples["y_fit"], region)
    return np.bincount(np.asarray(samples["sample"])[inside], minlength=n_samples)


def _paper_match(catalog, truth):
    return match_catalogs(catalog, truth, band="r", rule="any", border=5,
                          image_shape=(100, 100))


def _scores(catalog, truth):
    one = match_catalogs(catalog, truth, band="r")
    paper = _paper_match(catalog, truth)
    return {"tpr": one.tpr, "ppv": one.ppv, "f1": one.f1, "tpr_paper": paper.tpr,
            "ppv_paper": paper.ppv, "f1_paper": paper.f1, "n_estimated": len(catalog)}


def _format(row):
    def number(value, fmt):
        return format(value, fmt) if np.isfinite(value) else "-"

    one = " ".join(f"{number(row[c], '.2f'):>5}" for c in ("tpr", "ppv", "f1"))
    paper = " ".join(f"{number(row[c], '.2f'):>5}"
                     for c in ("tpr_paper", "ppv_paper", "f1_paper"))
    posterior = "-"
    if np.isfinite(row["n_mean"]):
        posterior = f"{row['n_mean']:.0f} ({row['n_q05']:.0f}, {row['n_q95']:.0f})"
    time_s = number(row["wall_time"], ".1f") + (" s" if np.isfinite(row["wall_time"]) else "")
    return (f"{row['method']:<46} {one:^17} {paper:^17} "
            f"{number(row['n_estimated'], '.0f'):>6} {posterior:>20} {time_s:>7}")


def _figure7(image, region, truth, catalogs, path):
    """The catalogs over the r image: the whole region and a 30 x 30 pixel zoom."""
    from astropy.visualization import simple_norm

    data = np.asarray(image.data[0], dtype=float)[region]
    # the first model's last StarNet catalog: the fitted background's when it was fitted
    starnet = [name for name in catalogs if name.startswith("StarNet")][-1]
    markers = [("HST truth", truth, dict(marker="o", facecolors="none", edgecolors="cyan",
                                         s=30, linewidths=0.8)),
               (starnet, catalogs[starnet],
                dict(marker="x", color="red", s=20, linewidths=0.8)),
               ("DAOPHOT-like (photutils)", catalogs["DAOPHOT-like (photutils)"],
                dict(marker="+", color="yellow", s=40, linewidths=0.8))]
    figure = Figure(figsize=(13, 6.5), layout="constrained")
    norm = simple_norm(data, "asinh", vmin=np.percentile(data, 1),
                       vmax=np.percentile(data, 99), asinh_a=0.1)
    for ax, (lo, hi) in zip(figure.subplots(1, 2), [(-0.5, 99.5), (34.5, 64.5)]):
        ax.imshow(data, origin="lower", cmap="gray", norm=norm, interpolation="nearest")
        for label, catalog, style in markers:
            xcol, ycol = position_columns(catalog)
            ax.scatter(catalog[xcol], catalog[ycol], label=label, **style)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("x (column in the region, pixels)")
        ax.set_ylabel("y (row in the region, pixels)")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
    figure.suptitle("M2, SDSS r band (frame rows 630:730, cols 310:410)")
    figure.savefig(path, dpi=100)


def _figure8(truth, catalogs, path):
    """TPR and PPV against r magnitude (one-to-one matching)."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    centres = 0.5 * (MAGNITUDE_BINS[1:] + MAGNITUDE_BINS[:-1])
    for name, catalog in catalogs.items():
        table = metrics_by_magnitude(catalog, truth, bins=MAGNITUDE_BINS, band="r")
        for ax, column in zip(axes, ("tpr", "ppv")):
            ax.plot(centres, table[column], marker="o", label=name)
    for ax, label in zip(axes, ("TPR (by true magnitude)", "PPV (by estimated magnitude)")):
        ax.set_xlabel("r (mag)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle("M2: one-to-one matching within 0.5 px and 0.5 mag")
    figure.savefig(path, dpi=100)


def _figure9(truth, catalogs, path):
    """Distributions of the r magnitudes of the truth and of the estimates."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    bins = np.arange(14.0, 24.01, 0.25)
    ax.hist(truth["mag_r"].value, bins=bins, color="0.8", label=f"HST truth ({len(truth)})")
    for name, catalog in catalogs.items():
        ax.hist(catalog["mag_r"].value, bins=bins, histtype="step", linewidth=1.5,
                label=f"{name} ({len(catalog)})")
    ax.set_xlabel("r (mag)")
    ax.set_ylabel("stars per 0.25 mag in the region")
    ax.legend(fontsize="small", loc="upper left")
    figure.suptitle("M2: magnitudes of the true and estimated stars")
    figure.savefig(path, dpi=100)


def _check_output_dir(output_dir):
    """``output_dir``, checked before any work to be a writable folder or to be one that
    can be made in a writable folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file; expected a folder "
                                 "(made if missing) for the figures and the table")
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write into {existing} (for --output-dir "
                              f"{output_dir})")
    return output_dir


def add_arguments(parser):
    """Add the benchmark's options to an `argparse.ArgumentParser`."""
    parser.add_argument("--model", nargs="+", default=list(MODELS),
                        help="bundled model names or model files (default: "
                             f"{' '.join(MODELS)}; the figures show the first)")
    parser.add_argument("--output-dir", default="benchmark_output",
                        help="folder for the figures and the table (default: "
                             "benchmark_output)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files")
    parser.add_argument("--no-fit-background", dest="fit_background", action="store_false",
                        help="skip the StarNet row with a fitted background")
    parser.add_argument("--wake", action="store_true",
                        help="also refine the first model's background by the wake phase "
                             "(about 90 s)")
    parser.add_argument("--n-samples", type=int, default=200,
                        help="posterior catalogs drawn for the count posterior "
                             "(default: 200)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="of StarNet's network: float32 (default) or bfloat16 (faster "
                             "on CPUs with AMX or AVX512-BF16, slower elsewhere)")
    parser.add_argument("--grid-consensus", action="store_true",
                        help="also give the first model's rows one of the catalog that "
                             "the shifted tile grids agree on")
    parser.add_argument("--pcat-minutes", type=float, default=0.0,
                        help="add a live PCAT-like MCMC row run for this many minutes "
                             "(default: 0, none; the paper's PCAT took about 30)")
    parser.add_argument("--refine-sweeps", type=int, default=0,
                        help="add a row of the first model's catalog refined by this many "
                             "sweeps of the PCAT-like MCMC (default: 0, none)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the posterior draws (default: 0)")


def run_from_arguments(parser, args):
    """Run the benchmark with parsed options; a refused or impossible request (an output
    that exists, a bad option, a model file that cannot be read) exits with status 1
    and a one-line message."""
    try:
        run_m2_benchmark(model=args.model, output_dir=args.output_dir,
                         overwrite=args.overwrite, fit_background=args.fit_background,
                         wake=args.wake,
                         n_samples=args.n_samples, seed=args.seed,
                         pcat_minutes=args.pcat_minutes, refine_sweeps=args.refine_sweeps,
                         precision=args.precision, grid_consensus=args.grid_consensus)
    except (OSError, ValueError, TypeError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    return 0


def main(argv=None):
    """Entry point of ``python -m starnet.m2_benchmark``."""
    parser = argparse.ArgumentParser(
        prog="python -m starnet.m2_benchmark",
        description="Reproduce the StarNet paper's M2 results (Table 1, Figures 7-9).")
    add_arguments(parser)
    return run_from_arguments(parser, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
