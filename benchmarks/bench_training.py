"""Training throughput, idle and with one core busy; and what denormal weights cost.

(1) **Throughput.** ``StarNetDeblender.fit`` of the model's architecture and training
settings (its images, batch size, PSFs and inputs), warm from its weights, for
``--steps`` steps (one epoch), with the threads starnet chooses (`starnet.threads`)
and with 1 and 2 threads: on an idle machine, and beside a process that keeps one core
busy (a Python busy loop, started and stopped by the benchmark, as on a laptop with
other work or a shared node). Images per second of the training steps (simulation,
forward, backward, optimiser: the history's ``images_per_second``), and busy over idle.

(2) The throughput per block of epochs recorded in the model file's training history.

(3) With ``--denormals``: steps timed on the model's weights as they are in the file
(denormals included; ``StarNetDeblender.load`` would clean them, so the weights are read
raw) and with negligible weights set to zero, each with the old optimiser (Adam with L2
decay) and the new one (AdamW). The model bundled before denormals were cleaned is in
the git history::

    git show b37a1de:starnet/models/sdss-m2.pt > /tmp/sdss-m2-old.pt
    python benchmarks/bench_training.py --model /tmp/sdss-m2-old.pt --denormals

``--precision bfloat16`` runs the fits' convolutions in bfloat16 (faster on CPUs with
AMX or AVX512-BF16; ``StarNetDeblender.fit(precision=)``).

Run::

    python benchmarks/bench_training.py [--model sdss] [--steps 60] [--precision bfloat16]
"""

import argparse
import dataclasses
import subprocess
import sys
import time
import warnings
from importlib import resources

import numpy as np
import torch

from starnet import StarNetDeblender
from starnet.denormals import count_denormals, zero_negligible_weights
from starnet.devices import PRECISIONS
from starnet.threads import choose_threads
from starnet.tiles import TileGrid
from starnet.training import _training_loss


def fit_throughput(model, steps, threads, *, busy, precision=None):
    """Images per second of ``steps`` training steps of ``model`` (a fresh copy), and the
    threads used; with ``busy``, beside a process that keeps one core busy."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog is not None:
            time.sleep(0.5)                   # let the busy loop take its core
        deblender = StarNetDeblender.from_name_or_path(model)
        settings = dataclasses.replace(deblender.training_settings, n_steps=steps,
                                       batches_per_epoch=steps, n_epochs=1, max_time=None,
                                       n_validation=4)
        # what fit does with threads=None, done here to report the number it chose
        threads = choose_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = deblender.fit(settings=settings, threads=threads, progress=False,
                                    compare_photutils=False, precision=precision)
        return float(history["images_per_second"][-1]), threads
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def throughput_table(model, steps, precision=None):
    deblender = StarNetDeblender.from_name_or_path(model)
    settings = deblender.training_settings
    print(f"fit of {model} in {precision or 'float32'}: {steps} steps of "
          f"{settings.batch_size} images of {tuple(settings.image_shape)} (images per second "
          "of the training steps)")
    print(f"{'threads':>16} {'idle':>8} {'one core busy':>14} {'busy / idle':>12}")
    for threads in (None, 1, 2):
        idle, n_idle = fit_throughput(model, steps, threads, busy=False, precision=precision)
        busy, n_busy = fit_throughput(model, steps, threads, busy=True, precision=precision)
        label = "chosen" if threads is None else str(threads)
        if threads is None:
            label += f" ({n_idle}, {n_busy})"
        print(f"{label:>16} {idle:8.1f} {busy:14.1f} {busy / idle:12.2f}", flush=True)


def history_table(deblender, block=50):
    history = deblender.training_history
    if history is None:
        return
    rate = np.asarray(history["images_per_second"])
    print(f"\ntraining history: {len(rate)} epochs")
    print(f"{'epochs':>10} {'images/s':>9}")
    for start in range(0, len(rate), block):
        chunk = rate[start:start + block]
        print(f"{start + 1:>4}-{start + len(chunk):<5} {chunk.mean():9.1f}")


def time_steps(deblender, raw_weights, *, clean, optimizer, steps, batch_size, seed):
    encoder = deblender.encoder
    encoder.load_state_dict(raw_weights)
    if clean:
        zero_negligible_weights(encoder)
    denormals = count_denormals(encoder)
    settings = deblender.training_settings
    batches = deblender._batches(settings.image_shape, settings)
    grid = TileGrid(tile_size=encoder.tile_size, max_sources=encoder.max_sources)
    kind = torch.optim.AdamW if optimizer == "AdamW" else torch.optim.Adam
    optim = kind(encoder.parameters(), lr=settings.learning_rate,
                 weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        batch = batches.draw_batch(batch_size, generator=generator)
        tiles = grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes, batch.catalogs.mask,
                              batch.images.shape[-2:])
        loss = _training_loss(encoder, batch, tiles, generator, settings)
        optim.zero_grad()
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - started)
    encoder.eval()
    times = np.array(times)
    return denormals, batch_size / times[:5].mean(), batch_size / times[5:].mean(), \
        count_denormals(encoder)


def denormal_table(model, steps, batch_size, threads):
    torch.set_num_threads(threads)
    deblender = StarNetDeblender.from_name_or_path(model)
    path = model if "/" in model or model.endswith(".pt") else \
        resources.files("starnet") / "models" / f"{model}.pt"
    raw = torch.load(path, weights_only=True)["weights"]
    print(f"\ntraining steps of {batch_size} images of "
          f"{deblender.training_settings.image_shape} ({threads} threads), "
          f"rate {deblender.training_settings.learning_rate:g}")
    print(f"{'weights':>8} {'optimiser':>9} {'denormals':>9} {'images/s 1-5':>13} "
          f"{'images/s 6-':>12} {'denormals after':>16}")
    for clean in (False, True):
        for optimizer in ("Adam+L2", "AdamW"):
            before, first, rest, after = time_steps(
                deblender, raw, clean=clean, optimizer=optimizer, steps=steps,
                batch_size=batch_size, seed=0)
            print(f"{'clean' if clean else 'as file':>8} {optimizer:>9} {before:9d} "
                  f"{first:13.1f} {rest:12.1f} {after:16d}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss", help="bundled model name or file")
    parser.add_argument("--steps", type=int, default=60,
                        help="training steps per throughput measurement")
    parser.add_argument("--denormals", action="store_true",
                        help="also time steps on the file's raw weights (denormals)")
    parser.add_argument("--denormal-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the denormal table")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="of the network's convolutions in the fits (default float32)")
    args = parser.parse_args(argv)
    throughput_table(args.model, args.steps, args.precision)
    history_table(StarNetDeblender.from_name_or_path(args.model))
    if args.denormals:
        denormal_table(args.model, args.denormal_steps, args.batch_size, args.threads)


if __name__ == "__main__":
    main()
