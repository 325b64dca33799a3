"""Time and peak memory of cataloging with the bundled SDSS model, beside photutils.

Each measurement runs in a fresh process, so that the peak resident memory it reports
(``ru_maxrss``) is the job's own; the time is the best of ``--repeats`` calls in that
process (the first call also pays for loading the model; ``IterativePSFPhotometry``,
which takes seconds, is called once), and excludes reading the image. Images are cut
from the bundled SDSS frame of M2 (r and i, electrons): the 100 x 100 region of the
paper, two 1000 x 1000 cut-outs (a sparse one, frame rows 300:1300, cols 500:1500, and
one through the cluster core, rows 0:1000, cols 0:1000) and the whole 1489 x 2048
frame; with ``--sizes``, also 3000 x 3000 and 6000 x 6000 images made by mirroring
the whole frame (data, mask and background map; no WCS) at its edges, to measure
memory on large images. photutils' ``DAOStarFinder`` (on the r band) and
``IterativePSFPhotometry`` (r band, SDSS power-law PSF; only up to 1000 x 1000) run on
the same images; the last column is the time over ``DAOStarFinder``'s on the same image
in the same run. StarNet runs with the image's background (``background="given"``) and,
as ``deblender(image)`` does by default, with the background fitted by the model's
background encoder first (``"fit"``; ``starnet, fitted bg``). A job that passes
``--timeout`` seconds is stopped and reported as such. starnet chooses its threads
(`starnet.threads.choose_threads`) unless ``--threads`` is given; ``--busy`` runs every
job beside a process that keeps one core busy (a Python busy loop, started and stopped
by the benchmark), as on a laptop with other work or a shared node. ``--precision
bfloat16`` runs starnet's network in bfloat16 (`starnet.devices`). ``--grid-consensus``
adds the default call with ``grid_consensus=True`` (`starnet.grid_consensus`: the network
on every offset of the tile grid).

Speed figures in the documentation come from the bundled models (``--model``; a model
that reads the PSF is given the KL PSF as it varies over the image, a
`~photutils.psf.GriddedPSFModel`); another model is refused unless
``--allow-other-model`` is given.

Run::

    python benchmarks/bench_inference.py [--threads 2] [--busy] [--precision bfloat16]
    python benchmarks/bench_inference.py --sizes "1000 x 1000" "3000 x 3000" "6000 x 6000"
"""

import argparse
import multiprocessing as mp
import resource
import subprocess
import sys
import time
from queue import Empty

SIZES = {"100 x 100": (slice(630, 730), slice(310, 410)),
         "1000 x 1000": (slice(300, 1300), slice(500, 1500)),
         "1000 x 1000 core": (slice(0, 1000), slice(0, 1000)),
         "whole frame": (slice(0, 1489), slice(0, 2048))}
# images larger than the frame: the whole frame mirrored at its edges to this shape
MIRRORED = {"3000 x 3000": (3000, 3000), "6000 x 6000": (6000, 6000)}
DEFAULT_SIZES = list(SIZES)
SIZES.update({name: (slice(0, 1489), slice(0, 2048)) for name in MIRRORED})


def _mirrored(image, shape):
    """``image`` (bands, rows, cols) mirrored at its bottom and right edges to ``shape``:
    data, mask and background map (the WCS is dropped)."""
    import numpy as np
    from astropy.nddata import NDData

    def grow(array):
        array = np.asarray(array)
        pad = [(0, 0)] * (array.ndim - 2) + [(0, n - m) for n, m in zip(shape, array.shape[-2:])]
        return np.pad(array, pad, mode="symmetric")

    meta = dict(image.meta)
    meta["background"] = grow(meta["background"])
    return NDData(grow(image.data), unit=image.unit, meta=meta,
                  mask=None if image.mask is None else grow(image.mask))


BUNDLED = "sdss-m2"


def _job(method, size, model, threads, repeats, precision, queue):
    import numpy as np
    import torch
    from starnet import StarNetDeblender
    from starnet.datasets import load_sdss_frame

    if threads is not None:
        torch.set_num_threads(threads)   # photutils jobs; starnet gets it per call
    # starnet gets the PSF of its model (KL; for a model that reads the PSF, the KL PSF as
    # it varies over the image); photutils the power law, which has a FWHM
    deblender = (StarNetDeblender.from_name_or_path(model) if method.startswith("starnet")
                 else None)
    psf = ("powerlaw" if deblender is None
           else "kl-grid" if deblender.encoder.psf_features else "kl")
    image = load_sdss_frame(2583, 2, 136, ("r", "i"), cutout=SIZES[size], psf=psf)
    if size in MIRRORED:
        image = _mirrored(image, MIRRORED[size])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if deblender is not None:
        background = "given" if method == "starnet" else "fit"

        def run():
            return len(deblender(image, background=background, progress=False,
                                 threads=threads, precision=precision,
                                 grid_consensus=method == "starnet, grid consensus"))
    else:
        from photutils.detection import DAOStarFinder
        data = image.data[0] - image.meta["background"][0]
        sigma = float(np.sqrt(np.median(image.meta["background"][0])))
        psf = image.meta["psf"][0]
        finder = DAOStarFinder(threshold=3 * sigma, fwhm=psf.fwhm)
        if method == "DAOStarFinder":
            def run():
                found = finder(data)
                return 0 if found is None else len(found)
        else:
            from photutils.psf import IterativePSFPhotometry
            photometry = IterativePSFPhotometry(psf, (11, 11), finder=finder,
                                                aperture_radius=3, maxiters=2)

            def run():
                return len(photometry(data, error=np.sqrt(np.abs(image.data[0]))))
    times = []
    for _ in range(1 if method == "IterativePSFPhotometry" else repeats):
        started = time.perf_counter()
        n_found = run()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((min(times), peak / 1024, (peak - base) / 1024, n_found))


def measure(method, size, model, threads, repeats, timeout, *, busy=False, precision=None):
    """(seconds, peak MB, job MB, stars) of one job, or None when it passes ``timeout``;
    with ``busy``, beside a process that keeps one core busy."""
    if busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            return measure(method, size, model, threads, repeats, timeout,
                           precision=precision)
        finally:
            hog.kill()
            hog.wait()
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_job,
                              args=(method, size, model, threads, repeats, precision,
                                    queue))
    process.start()
    try:
        result = queue.get(timeout=timeout)
    except Empty:
        result = None
        process.terminate()
    process.join()
    return result


def main(argv=None):
    from starnet.devices import PRECISIONS     # here: the jobs import this module
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED)
    parser.add_argument("--allow-other-model", action="store_true",
                        help="measure a model other than the bundled one")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: starnet's own choice, "
                             "starnet.threads.choose_threads)")
    parser.add_argument("--busy", action="store_true",
                        help="run every job beside a process that keeps one core busy "
                             "(started and stopped by the benchmark)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="calls per job; the best time is reported")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=DEFAULT_SIZES,
                        metavar="SIZE",
                        help=f"images to run, of {list(SIZES)} (default: the first four)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="of starnet's network (default float32)")
    parser.add_argument("--grid-consensus", action="store_true",
                        help="also time the default call with grid_consensus=True")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds after which a job is stopped and reported as such")
    args = parser.parse_args(argv)
    from starnet import StarNetDeblender
    if args.model not in StarNetDeblender.available() and not args.allow_other_model:
        parser.error(f"speed figures are measured with the bundled models "
                     f"{StarNetDeblender.available()}; pass --allow-other-model to measure "
                     "another")
    threads = "threads chosen by starnet" if args.threads is None else f"{args.threads} threads"
    print(f"model {args.model}, {threads}, best of {args.repeats} calls"
          + (", one core kept busy by another process" if args.busy else "")
          + (f", network in {args.precision}" if args.precision else ""))
    print(f"{'image':>16} {'method':>22} {'seconds':>9} {'peak MB':>9} {'job MB':>8} "
          f"{'stars':>7} {'x DAO':>6}")
    for size in args.sizes:
        methods = ["DAOStarFinder", "starnet", "starnet, fitted bg"]
        if args.grid_consensus:
            methods.append("starnet, grid consensus")
        if size != "whole frame" and size not in MIRRORED:
            methods.append("IterativePSFPhotometry")
        finder_seconds = None
        for method in methods:
            result = measure(method, size, args.model, args.threads, args.repeats,
                             args.timeout, busy=args.busy, precision=args.precision)
            if result is None:
                print(f"{size:>16} {method:>22} {'> ' + str(int(args.timeout)):>9}", flush=True)
                continue
            seconds, peak, job, n_found = result
            finder_seconds = seconds if method == "DAOStarFinder" else finder_seconds
            ratio = f"{seconds / finder_seconds:6.1f}" if finder_seconds else ""
            print(f"{size:>16} {method:>22} {seconds:9.2f} {peak:9.0f} {job:8.0f} "
                  f"{n_found:7d} {ratio}", flush=True)


if __name__ == "__main__":
    main()
