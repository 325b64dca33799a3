"""Training throughput with and without denormal weights, and over a model's history.

Prints (1) the throughput per block of epochs recorded in a model file's training
history, and (2) training steps (simulation, forward, backward, optimiser) timed on the
model's weights as they are in the file (denormals included; ``StarNetDeblender.load``
would clean them, so the weights are read raw) and with negligible weights set to zero,
each with the old optimiser (Adam with L2 decay) and the new one (AdamW).

The model that was bundled before denormals were cleaned is in the git history::

    git show b37a1de:starnet/models/sdss-m2.pt > /tmp/sdss-m2-old.pt
    python benchmarks/bench_training.py --model /tmp/sdss-m2-old.pt
"""

import argparse
import time

import numpy as np
import torch

from starnet import StarNetDeblender
from starnet.denormals import count_denormals, zero_negligible_weights
from starnet.training import SimulatedBatches, _training_loss


def history_table(deblender, block=50):
    history = deblender.training_history
    if history is None:
        return
    rate = np.asarray(history["images_per_second"])
    print(f"training history: {len(rate)} epochs")
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
    batches = SimulatedBatches(deblender.prior, deblender._renderer(), deblender.background,
                               settings.image_shape, margin=settings.margin,
                               background_range=settings.background_range)
    kind = torch.optim.AdamW if optimizer == "AdamW" else torch.optim.Adam
    optim = kind(encoder.parameters(), lr=settings.learning_rate,
                 weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        images, background, catalogs = batches.draw(batch_size, generator=generator)
        tiles = deblender.grid.to_tiles(catalogs.locs, catalogs.fluxes, catalogs.mask,
                                        images.shape[-2:])
        loss = _training_loss(encoder, images, background, tiles, generator)
        optim.zero_grad()
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - started)
    encoder.eval()
    times = np.array(times)
    return denormals, batch_size / times[:5].mean(), batch_size / times[5:].mean(), \
        count_denormals(encoder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdss-m2", help="bundled model name or file")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    path = args.model if "/" in args.model or args.model.endswith(".pt") else None
    if path is None:
        from importlib import resources
        path = resources.files("starnet") / "models" / f"{args.model}.pt"
    raw = torch.load(path, weights_only=True)["weights"]
    history_table(deblender)
    print(f"\ntraining steps of {args.batch_size} images of "
          f"{deblender.training_settings.image_shape} ({args.threads} threads), "
          f"rate {deblender.training_settings.learning_rate:g}")
    print(f"{'weights':>8} {'optimiser':>9} {'denormals':>9} {'images/s 1-5':>13} "
          f"{'images/s 6-':>12} {'denormals after':>16}")
    for clean in (False, True):
        for optimizer in ("Adam+L2", "AdamW"):
            before, first, rest, after = time_steps(
                deblender, raw, clean=clean, optimizer=optimizer, steps=args.steps,
                batch_size=args.batch_size, seed=0)
            print(f"{'clean' if clean else 'as file':>8} {optimizer:>9} {before:9d} "
                  f"{first:13.1f} {rest:12.1f} {after:16d}", flush=True)


if __name__ == "__main__":
    main()
