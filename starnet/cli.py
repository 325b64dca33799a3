"""The ``starnet`` command.

``starnet catalog IMAGE -o OUT [--model NAME_OR_PATH] ...``
    Catalog an image with a StarNet model and write the modal catalog.
``starnet benchmark m2 [--model NAME_OR_PATH] [--output-dir DIR] ...``
    Reproduce the StarNet paper's M2 results (`starnet.m2_benchmark`).

``starnet <command> --help`` describes the options.
"""

import argparse
import contextlib
import gzip
import io
import json
import os
import pickle
import re
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.nddata import InverseVariance
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS

from . import __version__, m2_benchmark
from .datasets import load_sdss_frame
from .deblender import StarNetDeblender
from .devices import PRECISIONS
from .prior import StarFieldPrior
from .images import StarFieldImage
from .model_files import write_atomically
from .psf import PowerLawPSF, psf_from_dict
from .training import TrainingSettings
from .validation import check_memory
from .visualization import quicklook, residual_image

__all__ = ["main"]

SDSS_FRAME = re.compile(r"frame-(?P<band>[ugriz])-(?P<run>\d{6})-(?P<camcol>\d)-"
                        r"(?P<field>\d{4})\.fits\.bz2$")
"""File names of SDSS frames: frame-<band>-<run>-<camcol>-<field>.fits.bz2."""

FPM_MASKED = ("SATUR", "INTERP", "CR")
"""The fpM mask types whose pixels a model that reads the mask is told are missing."""

_FORMATS = {".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".fits.gz": "fits"}

_CATALOG_HELP = """\
IMAGE is either

* an SDSS frame, recognised by its name frame-<band>-<run>-<camcol>-<field>.fits.bz2:
  IMAGE itself (which must exist) and the model's other bands of that field are
  read with starnet.datasets.load_sdss_frame (from IMAGE's folder, else the
  bundled data or the SDSS archive), converted to
  electrons, with the SDSS sky as background and the psField PSFs (the KL PSF at
  the image's centre, or the power law for a model trained on it; for a model that
  reads the PSF, such as sdss, the KL PSF as it varies over the image) and, for a
  model that reads the mask, the saturated, interpolated and cosmic-ray pixels of
  the fpM-<run>-<band><camcol>-<field>.fit.gz files in IMAGE's folder; or
* a FITS file whose first image HDU (or --hdu) holds the image, sky included, with
  shape (bands, rows, cols) or (rows, cols) for a one-band model, bands in the
  model's order, in the unit of --unit, else of the header's BUNIT, else (with a
  warning) electrons. Units (any case): electrons (e-, electron, electrons), ADU
  (adu, DN, counts) with the gain (--gain or GAIN, electrons per ADU), and either
  per second (e-/s, electrons/s, adu/s, ...) with the exposure time (--exptime or
  EXPTIME). --background is then required (numbers or a FITS map, in the image's
  unit); --mask and --weight (inverse variance) give bad pixels and the noise; the
  PSFs are the model's unless --psf gives PSF images; the WCS is read from the
  header when it has one.

When the model has a background encoder (the bundled ones do), the background is
estimated from the pixels (starnet.background.fit_background: a factor on the
background the model was trained with; on images larger than 256 pixels a factor
that varies over 64 pixels), which on M2 lifts F1 from 0.46 to 0.57;
--no-background-fit keeps the given background.

A model that reads the prior (sdss) counts the faint stars of a crowded field from
the bright ones through the prior's flux distribution: --f-max (the brightest flux a
star of the field may have, electrons in the first band) and --alpha (its Pareto
index) tell it the field's, within the range it was trained over (f_max_range and
alpha_range of StarNetDeblender.pretrained("sdss").provenance); the model's prior
otherwise.

The catalog (columns as StarNetDeblender's: x_fit, y_fit, flux_<band>, mag_<band>,
flags, ...) is written as ECSV (.ecsv) or FITS (.fits, .fit, .fits.gz). Its metadata
hold the posterior of the number of stars, the date (UTC), the starnet version, the
model, the input file and the background used per band (with the fitted factor).
FITS: the metadata are header keywords (NSTARS, DATE, STARNETV, MODEL, INPUT, BAND1,
BKG1, BKGFIT, ...; see the card comments), units are TUNIT cards where FITS knows
them (mag, deg); fluxes stay in electrons, which astropy's QTable.read restores
(FITS has no electron unit: the TTYPE card comments say it for other readers).

To check the catalog by eye: --residual FILE.fits writes the image minus the light
of the catalog's stars minus the background used, in electrons (NaN at bad pixels;
pure noise where the catalog explains the image), and --quicklook FILE.png a
picture of the catalog over the image, the residual and the posterior of the number
of stars (starnet.visualization). Existing files are only replaced with --overwrite.
"""


_TRAIN_HELP = """\
The configuration is a JSON object:

  {"prior": {"mu": 0.12, "f_min": 1000, "alpha": 0.5, "bands": ["r", "i"]},
   "psf": [{"psfield": "psField-002583-2-0136.fit", "band": "r"},
           {"psfield": "psField-002583-2-0136.fit", "band": "i"}],
   "background": [686.0, 1123.0],
   "model": {"tile_size": 2, "max_sources": 3, "seed": 0},
   "training": {"n_epochs": 20, "batch_size": 16, "image_shape": [64, 64]}}

"prior" takes the keywords of starnet.StarFieldPrior; "psf" one entry per band, either
an SDSS psField file and band or a PSF as starnet.psf.psf_to_dict writes it; "model" the
keywords of StarNetDeblender (tile_size, max_sources, n_colors, hidden, tile_hidden,
stamp_size, seed); "training" the fields of starnet.training.TrainingSettings. Relative
file names are relative to the configuration file.
"""


def main(argv=None):
    """Run the ``starnet`` command with the arguments ``argv`` (default: sys.argv[1:]).

    Returns the exit status: 0 on success, 1 for a refused or impossible request (an
    output that exists, a missing or inconsistent input), 2 for bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="starnet", description="Probabilistic cataloging of crowded star fields "
                                    "(StarNet).")
    commands = parser.add_subparsers(dest="command", required=True)

    catalog = commands.add_parser(
        "catalog", help="catalog an image", description="Catalog an image with a "
        "StarNet model.", epilog=_CATALOG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    catalog.add_argument("image", help="SDSS frame or FITS image (see below)")
    catalog.add_argument("-o", "--output", required=True,
                         help="output catalog, .ecsv or .fits")
    catalog.add_argument("--model", default="sdss-m2",
                         help="bundled model name or model file (default: sdss-m2)")
    catalog.add_argument("--overwrite", action="store_true",
                         help="replace the outputs (-o, --residual, --quicklook)")
    catalog.add_argument("--background", nargs="+", metavar="B",
                         help="FITS image: background per band in the image's unit per "
                              "pixel (one value per band, or one for all), or a FITS file "
                              "of a background map")
    catalog.add_argument("--hdu", default=None,
                         help="FITS image: the HDU (number or name) that holds the image "
                              "(default: the first HDU with an image)")
    catalog.add_argument("--mask", metavar="FITS",
                         help="FITS image: mask (non-zero: bad pixel), (rows, cols) or "
                              "(bands, rows, cols)")
    catalog.add_argument("--weight", metavar="FITS",
                         help="FITS image: inverse-variance map (zero: bad pixel); the "
                              "noise of each pixel, read as starnet.images.read_image says")
    catalog.add_argument("--psf", nargs="+", metavar="FITS",
                         help="FITS image: a PSF image per band (default: the model's)")
    catalog.add_argument("--unit",
                         help="FITS image: unit of the pixels, e.g. e-, adu, e-/s "
                              "(default: BUNIT, else electrons; see below)")
    catalog.add_argument("--gain", type=float,
                         help="electrons per ADU of an image in ADU (default: GAIN)")
    catalog.add_argument("--exptime", type=float,
                         help="seconds of an image in counts per second (default: EXPTIME)")
    catalog.add_argument("--nelec-per-nmgy", type=float, nargs="+", metavar="C",
                         help="FITS image: electrons per nanomaggy per band, for "
                              "magnitudes 22.5 - 2.5 log10(flux / C) (default: "
                              "instrumental magnitudes)")
    catalog.add_argument("--f-max", type=float, metavar="E",
                         help="the prior's upper flux in electrons, for a model that reads "
                              "the prior (default: the model's; see below)")
    catalog.add_argument("--alpha", type=float, metavar="A",
                         help="the prior's Pareto index, for a model that reads the prior")
    catalog.add_argument("--cutout", metavar="R0:R1,C0:C1",
                         help="catalog only these rows and columns of the image")
    catalog.add_argument("--no-background-fit", action="store_true",
                         help="use the given background as it is (default: estimate "
                              "it from the pixels when the model can; see below)")
    catalog.add_argument("--no-progress", action="store_true",
                         help="no progress bar (it shows the blocks of a large image)")
    catalog.add_argument("--grid-consensus", action="store_true",
                         help="keep the stars that at least half of the shifted tile grids "
                              "find (a better catalog of blended stars; 4 times the work)")
    _add_compute_options(catalog, "the cores other processes leave free; one for images "
                                  "under 512 x 512 pixels")
    catalog.add_argument("--residual", metavar="FITS",
                         help="also write the residual image (image - catalog's light - "
                              "background, electrons) to this FITS file")
    catalog.add_argument("--quicklook", metavar="PNG",
                         help="also write a picture of the catalog, the residual and the "
                              "count posterior to this PNG file")
    catalog.set_defaults(run=_catalog)

    train = commands.add_parser(
        "train", help="train a model from a configuration file",
        description="Train a StarNet model on images simulated from the generative model "
        "that a JSON configuration file describes.", epilog=_TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="JSON configuration file (see below)")
    train.add_argument("-o", "--output", required=True, help="model file to write (.pt)")
    train.add_argument("--checkpoint", help="checkpoint file: written every epoch, resumed "
                                            "from when it exists")
    train.add_argument("--overwrite", action="store_true", help="replace the output")
    _add_compute_options(train, "the cores other processes leave free when training starts")
    train.set_defaults(run=_train)

    benchmark = commands.add_parser("benchmark", help="reproduce the paper's results")
    benchmarks = benchmark.add_subparsers(dest="benchmark", required=True)
    m2 = benchmarks.add_parser("m2", help="M2 field: Table 1 and Figures 7 to 9",
                               description=m2_benchmark.run_m2_benchmark.__doc__.split(
                                   "\n")[0])
    m2_benchmark.add_arguments(m2)
    m2.set_defaults(run=m2_benchmark.run_from_arguments)

    args = parser.parse_args(argv)
    subparser = {"catalog": catalog, "train": train, "benchmark": m2}[args.command]
    with _one_line_warnings(parser.prog):
        return args.run(subparser, args)


@contextlib.contextmanager
def _one_line_warnings(prog):
    """Warnings shown as ``<prog>: warning: <message>``, one line each, without the
    category and source line of Python's format, and each message once (a command
    that catalogs several images would repeat them). `warnings.formatwarning` is
    restored on leaving."""
    shown = set()

    def one_line(message, *args, **kwargs):
        text = f"{prog}: warning: {' '.join(str(message).split())}\n"
        if text in shown:
            return ""
        shown.add(text)
        return text

    original = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original


def _catalog(parser, args):
    output = Path(args.output)
    suffix = ".fits.gz" if output.name.endswith(".fits.gz") else output.suffix.lower()
    if suffix not in _FORMATS:
        parser.error(f"the output must end in {', '.join(_FORMATS)}; got {output.name}")
    _check_output(parser, output, args.overwrite)
    for option, name, suffixes in (("--residual", args.residual, _RESIDUAL_SUFFIXES),
                                   ("--quicklook", args.quicklook, (".png",))):
        if name is not None:
            if not name.lower().endswith(suffixes):
                parser.error(f"{option} must end in {', '.join(suffixes)}; got {name}")
            _check_output(parser, Path(name), args.overwrite)
    _check_threads(parser, args)
    try:
        deblender = StarNetDeblender.from_name_or_path(args.model)
        told = {key: value for key, value in (("f_max", args.f_max), ("alpha", args.alpha))
                if value is not None}
        if told and not deblender.encoder.prior_features:
            raise ValueError(f"model {args.model} does not read the prior; --f-max and "
                             "--alpha are for one that does (such as sdss)")
        deblender.prior = deblender.prior.replace(**told)
        image = _read_image(args, deblender)
        table = deblender(image, background="given" if args.no_background_fit else None,
                          progress=not args.no_progress, threads=args.threads,
                          device=args.device, precision=args.precision,
                          grid_consensus=args.grid_consensus)
    except _USER_ERRORS as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    table.meta.update(_provenance(args))
    meta = dict(table.meta)
    if meta["background_fit"] is not None:
        print(f"background estimated from the pixels: {meta['background_fit']:.3f} times the "
              f"model's ({', '.join(f'{b:.0f}' for b in deblender.background)} e-)"
              + (", the median of a map" if max(image.data.shape[-2:]) > 256 else "")
              + " (--no-background-fit keeps the given one)")
    try:
        write_atomically(output, _catalog_writer(table, suffix), overwrite=args.overwrite)
    except OSError as err:   # a full disk, a file-size limit: the old catalog is intact
        parser.exit(1, f"{parser.prog}: error: writing {output} failed ({err}); "
                       + ("the previous catalog is unchanged" if output.exists() else
                          "nothing was written") + "\n")
    print(f"{len(table)} stars in the modal catalog written to {output}; posterior "
          f"number of stars {meta['n_stars_mean']:.0f} (5 %: {meta['n_stars_q05']}, "
          f"95 %: {meta['n_stars_q95']})")
    if args.residual is None and args.quicklook is None:
        return 0
    try:
        residual = residual_image(deblender, image, table)
        if args.residual is not None:
            suffix = ".fits.gz" if args.residual.lower().endswith(".gz") else ".fits"
            write_atomically(args.residual, _residual_writer(residual, suffix),
                             overwrite=args.overwrite)
            print(f"residual image written to {args.residual}")
        if args.quicklook is not None:
            quicklook(deblender, image, table, args.quicklook, residual=residual,
                      overwrite=args.overwrite)
            print(f"quicklook written to {args.quicklook}")
    except _USER_ERRORS as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    return 0


_RESIDUAL_SUFFIXES = (".fits", ".fit", ".fits.gz")


def _residual_writer(residual, suffix):
    """A ``write(file)`` for `~starnet.model_files.write_atomically` of the residual
    image (`starnet.visualization.residual_image`) as FITS: (rows, cols) for one band,
    else (bands, rows, cols), in electrons, with the image's WCS."""
    data = np.asarray(residual.data, dtype=np.float32)
    header = residual.wcs.to_header() if residual.wcs is not None else fits.Header()
    header["BUNIT"] = ("electron", "image - catalog's star light - background")
    for k, band in enumerate(residual.meta["bands"], 1):
        header[f"BAND{k}"] = (band, f"name of band {k}")
    hdul = fits.HDUList([fits.PrimaryHDU(data[0] if len(data) == 1 else data, header)])

    def write(file):
        _write_fits(hdul, file, suffix)
    return write


def _write_fits(hdul, file, suffix):
    """Write an HDU list into an open binary file, gzipped for ``.fits.gz``."""
    if suffix == ".fits.gz":
        with gzip.GzipFile(fileobj=file, mode="wb") as compressed:
            hdul.writeto(compressed)
    else:
        hdul.writeto(file)


def _provenance(args):
    """Catalog metadata saying how it was made: date, version, model and input file
    (the background used is in the catalog's meta already)."""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "version": __version__, "model": str(args.model), "input": str(args.image),
            "cutout": args.cutout}


#: FITS keywords of the catalog metadata: meta key -> (keyword, comment). Lists (one
#: value per band) become KEY1, KEY2, ...
_FITS_KEYWORDS = {
    "version": ("STARNETV", "starnet version"),
    "date": ("DATE", "UTC date and time the catalog was made"),
    "model": ("MODEL", "StarNet model: bundled name or file"),
    "input": ("INPUT", "image file"),
    "cutout": ("CUTOUT", "rows and columns of the image catalogued"),
    "n_stars_mean": ("NSTARS", "posterior mean of the number of stars"),
    "n_stars_q05": ("NSTARS05", "5 % posterior quantile of the number of stars"),
    "n_stars_q95": ("NSTARS95", "95 % posterior quantile of the number of stars"),
    "bands": ("BAND", "name of band {k}"),
    "background": ("BKG", "background used in band {band}, electron / pixel"),
    "background_fit": ("BKGFIT", "fitted factor on the model's background"),
    "background_source": ("BKGSRC", "background 'fitted' from the pixels or 'given'"),
    "mag_zero_points": ("MAGZP", "magnitude zero point of band {band}"),
    "tile_size": ("TILESIZE", "side of a tile, pixels"),
    "max_sources": ("MAXSRC", "largest number of stars per tile"),
}


def _fits_cards(meta):
    """Header cards ``(keyword, value, comment)`` of catalog metadata: the keywords of
    `_FITS_KEYWORDS`, others upper-cased (HIERARCH when longer than 8 characters or
    not a plain FITS keyword); lists numbered from 1, dicts flattened; None skipped."""
    bands = list(meta.get("bands", []))
    cards = [("NBANDS", len(bands), "number of bands")] if bands else []

    def add(key, value, keyword, comment):
        if value is None:
            return
        if isinstance(value, dict):
            for name, item in value.items():
                add(f"{key}_{name}", item, f"{keyword}_{name}".upper(), f"{key}: {name}")
            return
        if isinstance(value, (list, tuple, np.ndarray)):
            for k, item in enumerate(value, 1):
                band = bands[k - 1] if len(value) == len(bands) else k
                add(key, item, f"{keyword}{k}", comment.format(k=k, band=band))
            return
        if isinstance(value, np.generic):
            value = value.item()
        if not re.fullmatch(r"[A-Z0-9_-]{1,8}", keyword):
            keyword = f"HIERARCH {keyword}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", VerifyWarning)
            try:
                fits.Card(keyword, value, comment).image
            except VerifyWarning:   # no room for the comment beside a long value
                comment = ""
        cards.append((keyword, value, comment))

    for key, value in meta.items():
        keyword, comment = _FITS_KEYWORDS.get(key, (key.upper(), key))
        add(key, value, keyword, comment)
    return cards


def _catalog_writer(table, suffix):
    """A ``write(file)`` for `~starnet.model_files.write_atomically` that writes the
    catalog in the format of the output's ``suffix``: ECSV, or FITS with the metadata
    as header keywords (`_fits_cards`), units as TUNIT cards where FITS knows them, the
    others (electron) restored by astropy's QTable.read and named in the TTYPE card
    comments (gzipped for ``.fits.gz``)."""
    def write(file):
        if _FORMATS[suffix] != "fits":
            text = io.StringIO()
            table.write(text, format=_FORMATS[suffix])
            file.write(text.getvalue().encode("utf-8"))
            return
        with _fits_catalog(table) as hdul:
            _write_fits(hdul, file, suffix)
    return write


def _fits_catalog(table):
    """The catalog as an HDU list (see `_catalog_writer`)."""
    plain = table.copy(copy_data=False)
    plain.meta = {}
    buffer = io.BytesIO()
    with warnings.catch_warnings():   # astropy keeps it in its own column metadata
        warnings.filterwarnings("ignore", "The unit 'electron' could not be saved",
                                AstropyUserWarning)
        plain.write(buffer, format="fits")
    buffer.seek(0)
    hdul = fits.open(buffer)
    header = hdul[1].header
    for n in range(1, header["TFIELDS"] + 1):
        name = header[f"TTYPE{n}"]
        unit = getattr(table[name], "unit", None) if name in table.colnames else None
        if unit is not None and f"TUNIT{n}" not in header:
            header.comments[f"TTYPE{n}"] = f"[{unit}]"
    for keyword, value, comment in _fits_cards(table.meta):
        header.append((keyword, value, comment), end=True)
    return hdul


def _add_compute_options(subparser, default_threads):
    """--threads (whose default is ``default_threads``), --device and --precision."""
    subparser.add_argument("--threads", type=int, default=None, metavar="N",
                           help=f"CPU threads (default: {default_threads})")
    subparser.add_argument("--device", default=None, metavar="DEVICE",
                           help="where the network runs: cpu (default), cuda (a GPU, which "
                                "must be there), cuda:N or auto (a GPU if there is one)")
    subparser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                           help="of the network's convolutions: float32 (default) or "
                                "bfloat16 (faster on CPUs with AMX or AVX512-BF16 and on "
                                "GPUs, slower elsewhere; slightly less exact)")


def _check_threads(parser, args):
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive number of threads; got {args.threads}")


def _train(parser, args):
    output = Path(args.output)
    _check_output(parser, output, args.overwrite)
    _check_threads(parser, args)
    try:
        deblender, settings = _deblender_from_config(Path(args.config))
    except _USER_ERRORS as err:
        parser.exit(1, f"{parser.prog}: error: bad configuration {args.config}: {err}\n")
    deblender.provenance["command"] = " ".join(["starnet train", args.config, "-o",
                                                args.output])
    try:
        deblender.fit(settings=settings, checkpoint=args.checkpoint, threads=args.threads,
                      device=args.device, precision=args.precision)
        deblender.save(output, overwrite=args.overwrite)
    except _USER_ERRORS as err:   # a checkpoint of another model, a full disk, ...
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    last = deblender.training_history[-1]
    print(f"trained {last['epoch']} epochs (validation F1 {last['val_f1']:.3f}); "
          f"wrote {output}")
    return 0


def _check_output(parser, output, overwrite):
    """Exit (status 1) before any work when ``output`` cannot be written."""
    problem = None
    if output.exists() and not overwrite:
        problem = f"{output} exists; pass --overwrite to replace it"
    elif output.is_dir():
        problem = f"{output} is a folder; give a file name"
    elif not output.parent.is_dir():
        problem = f"the folder {output.parent} of {output.name} does not exist"
    elif not os.access(output.parent, os.W_OK):
        problem = f"the folder {output.parent} is not writable"
    if problem:
        parser.exit(1, f"{parser.prog}: error: {problem}\n")


def _deblender_from_config(path):
    """A deblender and its training settings from a JSON configuration file."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError("the configuration must be a JSON object")
    unknown = set(config) - {"prior", "psf", "background", "model", "training"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    missing = [key for key in ("psf", "background") if key not in config]
    if missing:
        raise ValueError(f"missing {missing}: 'psf' (one PSF per band) and 'background' "
                         "(electrons per pixel, one per band) are required; 'prior', "
                         "'model' and 'training' are optional")
    prior = StarFieldPrior(**config.get("prior", {}))
    psfs = []
    for entry in config["psf"]:
        if "psfield" in entry:
            psfs.append(PowerLawPSF.from_psfield(path.parent / entry["psfield"],
                                                 band=entry["band"]))
        else:
            psfs.append(psf_from_dict(entry))
    deblender = StarNetDeblender(prior=prior, psf=psfs, background=config["background"],
                                 **config.get("model", {}))
    return deblender, TrainingSettings(**config.get("training", {}))


#: Bytes per pixel of an image while it is read and catalogued (its pixels as read and
#: in float32, the background, the bad pixels, the encoder's block).
_BYTES_PER_PIXEL = 40

#: Errors that a user's input can cause: reported in one line, exit status 1.
_USER_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, EOFError,
                pickle.UnpicklingError)


def _read_image(args, deblender):
    """The image as the deblender takes it (see the catalog command's help)."""
    cutout = _parse_cutout(args.cutout)
    path = Path(args.image)
    frame = SDSS_FRAME.search(path.name)
    if frame:
        given = [option for option, value in (
            ("--background", args.background), ("--nelec-per-nmgy", args.nelec_per_nmgy),
            ("--hdu", args.hdu), ("--mask", args.mask), ("--weight", args.weight),
            ("--psf", args.psf), ("--unit", args.unit), ("--gain", args.gain),
            ("--exptime", args.exptime))
            if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} are for FITS images; an SDSS frame carries "
                             "its own sky, calibration, mask and PSF")
        if not path.is_file():   # never replaced by a bundled or downloaded frame
            raise FileNotFoundError(f"no SDSS frame {path}: the file does not exist")
        if frame["band"] not in deblender.bands:
            raise ValueError(f"{path.name} is a frame of band {frame['band']}, which the "
                             f"model (bands {deblender.bands}) does not use")
        run, camcol, field = (int(frame[key]) for key in ("run", "camcol", "field"))
        # a model that reads the PSF gets the KL PSF as it varies over the frame; another,
        # the PSF it was trained with: the psField power law or the KL PSF
        psf = ("kl-grid" if deblender.encoder.psf_features
               else "powerlaw" if all(isinstance(p, PowerLawPSF) for p in deblender.psfs)
               else "kl")
        # a model that reads the mask gets the fpM masks beside the frame
        masks = [path.parent / f"fpM-{run:06d}-{band}{camcol}-{field:04d}.fit.gz"
                 for band in deblender.bands]
        planes = None
        if deblender.encoder.mask_channel:
            if all(mask.is_file() for mask in masks):
                planes = FPM_MASKED
            else:
                warnings.warn(f"no fpM mask files ({', '.join(m.name for m in masks)}) beside "
                              f"{path.name}: saturated and interpolated pixels are not masked")
        return load_sdss_frame(run, camcol, field, deblender.bands, cutout=cutout,
                               cache_dir=path.parent, psf=psf, fpm_planes=planes)

    data, header = _read_fits(path, args.hdu, "image")
    n_bands = len(deblender.bands)
    data = _bands_first(data, n_bands, deblender.bands, path)
    if args.background is None:
        raise ValueError("a FITS image needs --background (per band in the image's unit, "
                         f"one value per band {deblender.bands} or one for all, or a FITS "
                         "map of the image's shape)")
    meta = {"bands": deblender.bands, "psf": deblender.psfs,
            "background": _background(args.background, data.shape, deblender.bands)}
    if args.psf:
        meta["psf"] = [_read_fits(Path(name), None, "PSF")[0] for name in args.psf]
    if args.nelec_per_nmgy:
        meta["nelec_per_nmgy"] = _per_band(args.nelec_per_nmgy, n_bands, "--nelec-per-nmgy")
    unit = _image_unit(args, header, path)
    meta.update(_calibration(unit, args, header))
    mask = uncertainty = None
    if args.mask:
        mask = _pixel_map(args.mask, "--mask", data.shape, deblender.bands) != 0
    if args.weight:
        weight = _pixel_map(args.weight, "--weight", data.shape, deblender.bands)
        bad = ~(np.isfinite(weight) & (weight > 0))
        mask = bad if mask is None else (mask | bad)
        uncertainty = InverseVariance(np.where(bad, 1.0, weight), unit=unit ** -2)
    wcs = WCS(header)
    wcs = wcs.celestial if wcs.has_celestial else None
    image = StarFieldImage(data, unit=unit, wcs=wcs, mask=mask, uncertainty=uncertainty,
                           meta=meta)
    if cutout is not None:
        (r0, r1), (c0, c1) = cutout
        if not (0 <= r0 < r1 <= data.shape[1] and 0 <= c0 < c1 <= data.shape[2]):
            raise ValueError(f"--cutout {args.cutout} is not inside the image of "
                             f"{data.shape[1]} x {data.shape[2]} pixels")
        image = image[:, r0:r1, c0:c1]
    return image


#: Units of FITS images (BUNIT or --unit, any case, spaces ignored), by name; each may
#: be a rate, per second.
_UNITS = {"e-": u.electron, "e": u.electron, "electron": u.electron,
          "electrons": u.electron, "adu": u.adu, "dn": u.adu, "count": u.adu,
          "counts": u.adu}

#: A unit name, per second or not: "e-", "e-/s", "electrons / sec", "electron s-1".
_UNIT_TEXT = re.compile(r"(?P<name>[a-z-]+)(?P<rate>/(s|sec|second)|s(\*\*|\^)?-1)?")


def _image_unit(args, header, path):
    """The unit of a FITS image: ``--unit``, else the header's BUNIT, else electrons
    (with a warning that says so)."""
    if args.unit is not None:
        return _parse_unit(args.unit, "--unit")
    if not str(header.get("BUNIT", "")).strip():
        warnings.warn(f"{path.name} has no BUNIT keyword: its pixels are taken as "
                      "electrons (--unit states their unit, e.g. --unit adu)", UserWarning)
        return u.electron
    return _parse_unit(header["BUNIT"], "BUNIT")


def _parse_unit(text, source):
    """The astropy unit of a FITS unit name (`_UNITS`, or one of them per second)."""
    match = _UNIT_TEXT.fullmatch("".join(str(text).lower().split()))
    if match is None or match["name"] not in _UNITS:
        raise ValueError(f"{source} = {text!r} is not a unit starnet reads: it needs "
                         "electrons, or ADU with the gain, or either per second with the "
                         "exposure time; accepted (any case): e-, electron(s), adu, DN, "
                         "counts, each also per second (e.g. e-/s, electrons/s, adu/s)")
    unit = _UNITS[match["name"]]
    return unit / u.s if match["rate"] else unit


def _calibration(unit, args, header):
    """The meta entries ``gain`` and ``exptime`` that convert ``unit`` to electrons,
    from ``--gain`` and ``--exptime`` or the header's GAIN and EXPTIME."""
    rate = unit.is_equivalent(u.electron / u.s) or unit.is_equivalent(u.adu / u.s)
    needs = []
    if unit.is_equivalent(u.adu) or unit.is_equivalent(u.adu / u.s):
        needs.append(("gain", args.gain, "electrons per ADU"))
    if rate:
        needs.append(("exptime", args.exptime, "seconds"))
    meta = {}
    for key, option, what in needs:
        keyword = key.upper()
        if option is None and keyword not in header:
            raise ValueError(f"the image is in {unit}: give its {key} in {what} with "
                             f"--{key} (or the header keyword {keyword})")
        source = f"--{key}" if option is not None else f"the header's {keyword}"
        value = option if option is not None else header[keyword]
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = np.nan
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{source} must be a positive number of {what}; got "
                             f"{option if option is not None else header[keyword]!r}"
                             + ("" if option is not None else f" (give --{key})"))
        meta[key] = value
    return meta


def _read_fits(path, hdu, what):
    """The data and header of a FITS file's HDU ``hdu`` (default: the first with data)."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file {path}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fits.open(path) as hdul:
            truncated = [str(w.message) for w in caught if "truncated" in str(w.message)]
            if truncated:
                raise ValueError(f"{path} is not a whole FITS file: {truncated[0]}")
            if hdu is None:   # from the headers: no data is read before the size check
                found = [h for h in hdul if getattr(h, "is_image", False)
                         and h.header.get("NAXIS", 0) > 0]
                if not found:
                    raise ValueError(f"{path} holds no image in any HDU")
                chosen = found[0]
            else:
                try:
                    chosen = hdul[int(hdu) if str(hdu).isdigit() else hdu]
                except (KeyError, IndexError):
                    raise ValueError(f"{path} has no HDU {hdu!r}; it has "
                                     f"{[h.name for h in hdul]}") from None
                if not chosen.is_image or chosen.header.get("NAXIS", 0) == 0:
                    raise ValueError(f"HDU {hdu!r} of {path} holds no image")
            # the pixels as read, in float32, and the arrays the catalog is made with
            check_memory(_BYTES_PER_PIXEL * int(np.prod(chosen.shape)),
                         f"the {what} {path} of shape {chosen.shape}")
            header, data = chosen.header, np.asarray(chosen.data, dtype=np.float32)
    for warning in caught:   # the others are the user's to see
        warnings.warn(warning.message, warning.category, stacklevel=2)
    return data, header


def _bands_first(data, n_bands, bands, path, *, allow_2d=False):
    """``data`` as (bands, rows, cols); a (rows, cols) array for a one-band model (or for
    any model when ``allow_2d``: a mask or weight map shared by the bands)."""
    if data.ndim == 2 and (n_bands == 1 or allow_2d):
        data = np.broadcast_to(data, (n_bands, *data.shape))
    if data.ndim != 3 or data.shape[0] != n_bands:
        raise ValueError(f"{path} holds an image of shape {data.shape}; the model needs "
                         f"(bands={n_bands}, rows, cols) for bands {bands}"
                         + (" or (rows, cols)" if n_bands == 1 or allow_2d else ""))
    return data


def _pixel_map(name, option, shape, bands):
    """The FITS map of ``option`` (a mask or weight file) as (bands, rows, cols),
    checked to fit the image's ``shape``."""
    data = _bands_first(_read_fits(Path(name), None, option[2:] + " map")[0], len(bands),
                        bands, name, allow_2d=True)
    if data.shape != tuple(shape):
        raise ValueError(f"{option} {name} has shape {data.shape[1:]} (per band); expected "
                         f"the image's (rows, cols) = {tuple(shape[1:])}")
    return data


def _background(values, shape, bands):
    """``--background``: numbers (one per band or one for all) or a FITS map."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        if len(values) != 1:
            raise ValueError("--background takes numbers or one FITS file of a map, got "
                             f"{values}") from None
        data, _ = _read_fits(Path(values[0]), None, "background map")
        data = _bands_first(data, len(bands), bands, values[0], allow_2d=True)
        if data.shape != tuple(shape):
            raise ValueError(f"the background map {values[0]} has shape {data.shape}; the "
                             f"image's is {tuple(shape)}") from None
        return np.array(data)
    return _per_band(numbers, len(bands), "--background")


def _per_band(values, n_bands, option):
    values = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"{option} must be positive numbers, got {values.tolist()}")
    if values.size == 1:
        return np.full(n_bands, values[0])
    if values.size != n_bands:
        raise ValueError(f"{option} takes one value per band ({n_bands}) or one for all; "
                         f"got {values.size}")
    return values


def _parse_cutout(text):
    """``'R0:R1,C0:C1'`` as ``((r0, r1), (c0, c1))``, or None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*,\s*(\d+):(\d+)\s*", text)
    if not match:
        raise ValueError(f"--cutout must look like R0:R1,C0:C1 (e.g. 630:730,310:410); "
                         f"got {text!r}")
    r0, r1, c0, c1 = (int(v) for v in match.groups())
    return (r0, r1), (c0, c1)


if __name__ == "__main__":
    sys.exit(main())
