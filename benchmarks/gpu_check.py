"""The GPU check: a catalog made on a GPU equals the CPU one, and how long each takes.

One prepared script for a machine with a CUDA GPU (the project's CI has none; run it
where one is lent). For each bundled model and two images cut from the bundled M2 frame
(the paper's 100 x 100 region and the 1000 x 1000 cut-out rows 300:1300, cols 500:1500,
background given), it makes the catalog with ``device="cpu"`` and ``device="cuda"`` and
prints

- whether the two catalogs hold the same stars: their numbers, the largest difference
  of position (pixels) and of log flux, and of the posterior mean count;
- the best of ``--repeats`` calls on each device (the first call on the GPU also pays
  for moving the network and CUDA's start-up, so it is left out), and on the GPU with
  ``precision="bfloat16"`` (its mean count's difference from the CPU's is printed, not
  checked: bfloat16 is not float32).

Then training (``fit(device=)``) of the bundled ``sdss`` model's architecture, warm
from its weights:

- five steps on each device from the same seed (the same simulated images): their
  losses must agree to 1e-3 relative;
- ``--train-steps`` steps on each device (batches of 16 images of 64 x 64, as the
  bundled model trained), with images per second, and on the GPU also with
  ``precision="bfloat16"``; the model fitted on the GPU in float32 is saved, loaded on
  the CPU and must catalog the 100 x 100 cut-out.

It exits with status 1 if a catalog differs beyond float32 tolerance (positions
1e-3 px, log fluxes 1e-3, mean count 1e-4 relative; a star whose count probabilities
tie within rounding may differ) or the losses differ, else 0.

Run::

    python benchmarks/gpu_check.py [--repeats 3] [--train-steps 200]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from starnet import StarNetDeblender
from starnet.datasets import load_sdss_frame

CUTS = {"100 x 100": ((630, 730), (310, 410)), "1000 x 1000": ((300, 1300), (500, 1500))}


def timed(deblender, image, device, repeats, precision=None):
    """The catalog and the best time of ``repeats`` calls (after one warm-up call)."""
    catalog = deblender(image, background="given", progress=False, device=device,
                        precision=precision)
    best = np.inf
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        catalog = deblender(image, background="given", progress=False, device=device,
                            precision=precision)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return catalog, best


def compare(cpu, gpu, band):
    """Largest differences between two catalogs of the same image (matched by tile
    order, which both keep)."""
    if len(cpu) != len(gpu):
        return {"stars": (len(cpu), len(gpu)), "position": np.inf, "log flux": np.inf}
    position = np.max(np.hypot(cpu["x_fit"] - gpu["x_fit"], cpu["y_fit"] - gpu["y_fit"]),
                      initial=0.0)
    flux = np.max(np.abs(np.log(np.asarray(cpu[f"flux_{band}"].value)
                                / np.asarray(gpu[f"flux_{band}"].value))), initial=0.0)
    return {"stars": (len(cpu), len(gpu)), "position": float(position),
            "log flux": float(flux)}


def fitted(device, n_steps, *, batches_per_epoch, precision=None):
    """The bundled sdss model after ``n_steps`` more steps on ``device``, and its history."""
    deblender = StarNetDeblender.pretrained("sdss")
    history = deblender.fit(n_steps=n_steps, batches_per_epoch=batches_per_epoch,
                            batch_size=16, image_shape=(64, 64), learning_rate=1e-4,
                            n_validation=16, progress=False, device=device,
                            precision=precision)
    return deblender, history


def check_training(n_steps):
    """Losses of the same five steps on each device, then throughput; True if they agree."""
    losses = [float(fitted(device, 5, batches_per_epoch=5)[1]["train_loss"][0])
              for device in ("cpu", "cuda")]
    agree = abs(losses[1] / losses[0] - 1) < 1e-3
    print(f"five steps from one seed: loss {losses[0]:.5f} (CPU), {losses[1]:.5f} (GPU)"
          f"{'' if agree else '  DIFFERS'}")
    print(f"{'device':>7} {'precision':>9} {'steps':>6} {'images/s':>9} {'val F1':>7}")
    for device, precision in (("cpu", "float32"), ("cuda", "bfloat16"), ("cuda", "float32")):
        deblender, history = fitted(device, n_steps, batches_per_epoch=n_steps,
                                    precision=precision)
        print(f"{device:>7} {precision:>9} {n_steps:>6} "
              f"{history['images_per_second'][-1]:9.1f} {history['val_f1'][-1]:7.3f}",
              flush=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gpu.pt"
        deblender.save(path)
        loaded = StarNetDeblender.load(path)
    image = load_sdss_frame(2583, 2, 136, loaded.bands, cutout=CUTS["100 x 100"],
                            psf="kl-grid")
    found = len(loaded(image, background="given", progress=False))
    print(f"fitted on the GPU, loaded on the CPU: {found} stars in the 100 x 100 cut-out")
    return agree


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this check runs where torch sees one")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"CPU threads {torch.get_num_threads()}")
    print(f"{'model':>9} {'image':>12} {'stars':>12} {'max dx px':>10} {'max dlogf':>10} "
          f"{'dN/N':>9} {'CPU s':>8} {'GPU s':>8} {'bf16 s':>8} {'bf16 dN/N':>10}")
    failed = False
    for name in StarNetDeblender.available():
        deblender = StarNetDeblender.pretrained(name)
        for label, cutout in CUTS.items():
            image = load_sdss_frame(2583, 2, 136, deblender.bands, cutout=cutout,
                                    psf="kl-grid" if deblender.encoder.psf_features
                                    else "kl")
            cpu, cpu_seconds = timed(deblender, image, "cpu", args.repeats)
            gpu, gpu_seconds = timed(deblender, image, "cuda", args.repeats)
            bf16, bf16_seconds = timed(deblender, image, "cuda", args.repeats, "bfloat16")
            bf16_count = bf16.meta["n_stars_mean"] / cpu.meta["n_stars_mean"] - 1
            difference = compare(cpu, gpu, deblender.bands[0])
            count = abs(cpu.meta["n_stars_mean"] / gpu.meta["n_stars_mean"] - 1)
            ok = (difference["position"] < 1e-3 and difference["log flux"] < 1e-3
                  and count < 1e-4)
            failed |= not ok
            print(f"{name:>9} {label:>12} {'%d/%d' % difference['stars']:>12} "
                  f"{difference['position']:10.2e} {difference['log flux']:10.2e} "
                  f"{count:9.1e} {cpu_seconds:8.3f} {gpu_seconds:8.3f} "
                  f"{bf16_seconds:8.3f} {bf16_count:10.1e}"
                  f"{'' if ok else '  DIFFERS'}", flush=True)
    failed |= not check_training(args.train_steps)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
