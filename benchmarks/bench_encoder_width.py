"""Time of the encoder alone on a 1000 x 1000 two-band image, by network width.

Random weights (the speed does not depend on them once they hold no denormals):
what a narrower network would gain, before training one. Run::

    python benchmarks/bench_encoder_width.py [--threads 2]
"""

import argparse
import time

import torch

from starnet.encoder import StarNetEncoder

WIDTHS = [(32, 128), (32, 96), (24, 96), (32, 64), (16, 64)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    background = torch.tensor([686.0, 1123.0]).reshape(1, 2, 1, 1).expand(
        1, 2, args.size, args.size)
    image = background + 30 * torch.rand(1, 2, args.size, args.size, generator=generator)
    print(f"encoder on {args.size} x {args.size}, 2 bands, {args.threads} threads, "
          "chunks of 128 tiles, best of 3")
    print(f"{'pixel ch.':>9} {'tile ch.':>8} {'weights':>8} {'seconds':>8}")
    for hidden, tile_hidden in WIDTHS:
        encoder = StarNetEncoder(n_bands=2, hidden=hidden, tile_hidden=tile_hidden).eval()
        times = []
        with torch.no_grad():
            for _ in range(4):
                started = time.perf_counter()
                encoder(image, background, chunk_tiles=128)
                times.append(time.perf_counter() - started)
        n_weights = sum(p.numel() for p in encoder.parameters())
        print(f"{hidden:9d} {tile_hidden:8d} {n_weights:8d} {min(times[1:]):8.2f}", flush=True)


if __name__ == "__main__":
    main()
