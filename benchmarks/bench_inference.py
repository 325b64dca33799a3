"""Time and peak memory of cataloging with the bundled SDSS model, beside photutils.

Each measurement runs in a fresh process, so that the peak resident memory it reports
(``ru_maxrss``) is the job's own. Images are cut from the bundled SDSS frame of M2
(r and i, electrons): 100 x 100, 1000 x 1000 and the whole 1489 x 2048 frame.
photutils' ``DAOStarFinder`` (on the r band) and ``IterativePSFPhotometry`` (r band,
SDSS power-law PSF; the whole frame is skipped) run on the same images; a job that passes
``--timeout`` seconds is stopped and reported as such.

Run::

    python benchmarks/bench_inference.py [--model sdss-m2] [--threads 2]
"""

import argparse
import multiprocessing as mp
import resource
import time
from queue import Empty

SIZES = {"100 x 100": (slice(630, 730), slice(310, 410)),
         "1000 x 1000": (slice(300, 1300), slice(500, 1500)),
         "whole frame": (slice(0, 1489), slice(0, 2048))}


def _job(method, size, model, threads, queue):
    import numpy as np
    import torch
    from starnet import StarNetDeblender
    from starnet.datasets import load_sdss_frame

    torch.set_num_threads(threads)
    image = load_sdss_frame(2583, 2, 136, ("r", "i"), cutout=SIZES[size])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if method == "starnet":
        deblender = StarNetDeblender.pretrained(model) if "/" not in model else \
            StarNetDeblender.load(model)
        n_found = len(deblender(image))
    else:
        from photutils.detection import DAOStarFinder
        data = image.data[0] - image.meta["background"][0]
        sigma = float(np.sqrt(np.median(image.meta["background"][0])))
        psf = image.meta["psf"][0]
        if method == "DAOStarFinder":
            found = DAOStarFinder(threshold=3 * sigma, fwhm=psf.fwhm)(data)
            n_found = 0 if found is None else len(found)
        else:
            from photutils.psf import IterativePSFPhotometry
            photometry = IterativePSFPhotometry(
                psf, (11, 11), finder=DAOStarFinder(threshold=3 * sigma, fwhm=psf.fwhm),
                aperture_radius=3, maxiters=2)
            n_found = len(photometry(data, error=np.sqrt(np.abs(image.data[0]))))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((seconds, peak / 1024, (peak - base) / 1024, n_found))


def measure(method, size, model, threads, timeout):
    """(seconds, peak MB, job MB, stars) of one job, or None when it passes ``timeout``."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_job, args=(method, size, model, threads, queue))
    process.start()
    try:
        result = queue.get(timeout=timeout)
    except Empty:
        result = None
        process.terminate()
    process.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds after which a job is stopped and reported as such")
    args = parser.parse_args(argv)
    print(f"{'image':>12} {'method':>22} {'seconds':>9} {'peak MB':>9} {'job MB':>8} "
          f"{'stars':>7}")
    for size in SIZES:
        methods = ["starnet", "DAOStarFinder"]
        if size != "whole frame":
            methods.append("IterativePSFPhotometry")
        for method in methods:
            result = measure(method, size, args.model, args.threads, args.timeout)
            if result is None:
                print(f"{size:>12} {method:>22} {'> ' + str(int(args.timeout)):>9}", flush=True)
                continue
            seconds, peak, job, n_found = result
            print(f"{size:>12} {method:>22} {seconds:9.2f} {peak:9.0f} {job:8.0f} "
                  f"{n_found:7d}", flush=True)


if __name__ == "__main__":
    main()
