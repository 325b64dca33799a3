"""Train the bundled SDSS M2 model ``starnet/models/sdss-m2.pt``.

The generative model comes from the data only: the prior of the paper (0.12 stars per
pixel, Pareto index 0.5 above 1000 electrons), the PSFs of the field's psField file
(``--psf``: the power law of HDU 6, or the KL PSF of HDUs 1-5 at the M2 region), and the
SDSS sky of the frame as the background (the median of the sky map over the M2 region,
r and i). With ``--psf-variants``, training images are rendered between the PSF and
those variants (``--variant-range``), so that the model tolerates a PSF error of that
size. With ``--density-range``, each training image has its own star density, so that
the model catalogs sparse fields (a whole frame's outskirts) as well as the core. With
``--context-cells``, the encoder also reads a coarse view of its surroundings (a context
branch, as ``sdss`` has), so that it can tell the density it is in; ``--count-score-weight``
adds the score of the counts of blocks of tiles to the loss (`starnet.TrainingSettings`).
Training images get backgrounds scaled by a random factor in
``--background-range`` so the encoder reads the background from its input; then a
background encoder is fitted on such images (``--background-steps``) and
`starnet.background.fit_background` estimates the factor of a real image from its pixels.

Run (the command that made the bundled model is recorded in its metadata)::

    python scripts/train_sdss_m2.py --minutes 35 --seed 0 --overwrite

Training resumes from ``--checkpoint`` when it exists; ``--init-from`` starts from the
weights of another model (fine-tuning) instead of random ones (with ``--context-cells``,
a context branch that model lacks starts with a zero output, so the fine-tune begins
from that model exactly), and with
``--keep-background-encoder`` (and ``--background-steps 0``) keeps that model's
background encoder, so that only the catalog encoder changes. ``--mu`` and ``--alpha``
change the prior (``benchmarks/prior_sensitivity.py`` fine-tunes the bundled model so).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from starnet import StarFieldPrior, StarNetDeblender
from starnet.datasets import load_m2
from starnet.devices import PRECISIONS
from starnet.training import TrainingSettings, cosine_rate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sdss import narrowed_weights  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="starnet/models/sdss-m2.pt")
    parser.add_argument("--checkpoint", default="runs/sdss-m2.ckpt")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                        help="stop after this epoch, keeping the schedule of --epochs")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after the epoch that passes this wall time")
    parser.add_argument("--batches-per-epoch", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--tile-size", type=int, default=2)
    parser.add_argument("--max-sources", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32, help="pixel-layer channels")
    parser.add_argument("--tile-hidden", type=int, default=128,
                        help="tile-layer channels (an --init-from model that is wider is "
                             "narrowed: scripts/train_sdss.py's narrowed_weights)")
    parser.add_argument("--n-colors", type=int, default=1, choices=(1, 2, 4),
                        help="checkerboard colours (1: independent tiles as in the paper)")
    parser.add_argument("--background-range", type=float, nargs=2, default=(0.9, 1.6))
    parser.add_argument("--psf", default="powerlaw",
                        help="the model's PSF: a psf option of starnet.datasets.load_m2")
    parser.add_argument("--psf-variants", nargs="*", default=[], metavar="PSF",
                        help="PSFs (load_m2 psf options) that training images are rendered "
                             "towards, by fractions drawn from --variant-range")
    parser.add_argument("--variant-range", type=float, nargs=2, default=(0.0, 0.0))
    parser.add_argument("--mu", type=float, default=0.12,
                        help="stars per pixel of the prior (default: the paper's 0.12)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Pareto index of the prior's r fluxes (default: the paper's 0.5)")
    parser.add_argument("--density-range", type=float, nargs=2, default=None,
                        metavar=("LOW", "HIGH"),
                        help="draw each training image's stars per pixel log-uniformly "
                             "from this range (default: the prior's --mu)")
    parser.add_argument("--density-gradient", type=float, default=0.0,
                        help="largest change of the log density across a training image "
                             "(TrainingSettings.density_gradient; 0: uniform images)")
    parser.add_argument("--context-cells", type=int, default=0,
                        help="a context branch over cells of this many tiles (0: none), "
                             "so that the encoder reads the density around each tile")
    parser.add_argument("--count-score-weight", type=float, default=0.0,
                        help="weight of the block count score (TrainingSettings)")
    parser.add_argument("--init-from", metavar="MODEL",
                        help="start from this model's weights (a name or a file)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--final-learning-rate", type=float, default=None,
                        help="decay the rate (cosine) to this value at the last epoch")
    parser.add_argument("--decay-start", type=int, default=1,
                        help="first epoch of the decay (earlier epochs: --learning-rate)")
    parser.add_argument("--background-steps", type=int, default=3000,
                        help="steps of the background encoder's fit, after the catalog "
                             "encoder's (0: none)")
    parser.add_argument("--keep-background-encoder", action="store_true",
                        help="copy the background encoder of --init-from (with "
                             "--background-steps 0: fine-tune the catalog encoder only)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="of the network's convolutions in the training steps "
                             "(default float32; bfloat16 is faster on CPUs with AMX)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: chosen at each epoch, starnet.threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    image, _ = load_m2(border=3, psf=args.psf)
    prior = StarFieldPrior(mu=args.mu, f_min=1000.0, f_max=1e6, alpha=args.alpha,
                           bands=("r", "i"))
    deblender = StarNetDeblender.from_nddata(image, prior=prior, tile_size=args.tile_size,
                                             max_sources=args.max_sources,
                                             n_colors=args.n_colors,
                                             context_cells=args.context_cells,
                                             hidden=args.hidden, tile_hidden=args.tile_hidden,
                                             seed=args.seed)
    deblender.psf_variants = [load_m2(border=3, psf=name)[0].meta["psf"]
                              for name in args.psf_variants]
    if args.keep_background_encoder and not args.init_from:
        parser.error("--keep-background-encoder needs --init-from")
    if args.init_from:
        start = StarNetDeblender.from_name_or_path(args.init_from)
        if start.encoder.density_cells:
            parser.error(f"{args.init_from} has a density spread, which this script does not "
                         "train; start from the model without it")
        start_from(deblender.encoder, start.encoder)
        if args.keep_background_encoder:
            if start.background_encoder is None:
                parser.error(f"{args.init_from} has no background encoder to keep")
            deblender.background_encoder = start.background_encoder
            deblender.background_history = start.background_history
    settings = TrainingSettings(
        image_shape=(args.image_size, args.image_size), batch_size=args.batch_size,
        batches_per_epoch=args.batches_per_epoch, n_epochs=args.epochs,
        learning_rate=args.learning_rate, final_learning_rate=None,  # set per epoch below
        background_range=tuple(args.background_range),
        psf_variant_range=tuple(args.variant_range),
        density_range=None if args.density_range is None else tuple(args.density_range),
        density_gradient=args.density_gradient,
        count_score_weight=args.count_score_weight, seed=args.seed)
    Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # train epoch by epoch (resuming from the checkpoint) until the epochs or the time run out
    done = 0
    if Path(args.checkpoint).exists():
        done = len(torch.load(args.checkpoint, weights_only=True)["history"])
    # (the first call at an epoch already done loads the checkpoint and trains nothing)
    last = args.epochs if args.stop_after is None else min(args.stop_after, args.epochs)
    for epoch in range(max(done, 1), last + 1):
        settings.n_epochs = epoch
        settings.learning_rate = learning_rate(epoch, args)
        deblender.fit(settings=settings, checkpoint=args.checkpoint, progress=False,
                      precision=args.precision, threads=args.threads)
        row = deblender.training_history[-1]
        print(f"epoch {row['epoch']}: loss {row['train_loss']:.3f} / {row['val_loss']:.3f}, "
              f"F1 {row['val_f1']:.3f}, {row['images_per_second']:.1f} images/s, "
              f"rate {settings.learning_rate:.2e}", flush=True)
        if args.minutes is not None and time.time() - started > 60 * args.minutes:
            break
    deblender.provenance["trained_minutes"] = round((time.time() - started) / 60, 1)
    if args.background_steps:
        started = time.time()
        history = deblender.fit_background_encoder(n_steps=args.background_steps,
                                                   seed=args.seed, progress=False)
        print(f"background encoder: loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f} "
              f"in {args.background_steps} steps", flush=True)
        deblender.provenance["background_minutes"] = round((time.time() - started) / 60, 1)
    deblender.provenance["command"] = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    deblender.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")


def start_from(encoder, start):
    """Copy the weights of the encoder ``start`` into ``encoder``. A context branch that
    ``start`` lacks keeps its initial weights but for its last layer, set to zero: the
    new encoder begins as ``start`` and learns what the context adds. A ``start`` with
    more channels is narrowed to the encoder's (`narrowed_weights`: the channels that
    carry most are kept)."""
    state = start.state_dict()
    widths = [(e.config()["hidden"], e.config()["tile_hidden"]) for e in (start, encoder)]
    if widths[0] != widths[1]:
        if widths[1][0] > widths[0][0] or widths[1][1] > widths[0][1] or start.n_colors != 1:
            raise ValueError(f"a start model of {widths[0][0]} / {widths[0][1]} channels "
                             f"({start.n_colors} colours) cannot be narrowed to "
                             f"{widths[1][0]} / {widths[1][1]}: narrowing takes a model of "
                             "independent tiles at least as wide in both")
        state = narrowed_weights(state, *widths[0], *widths[1])
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    new = [name for name in missing if not name.startswith("context_")]
    if new or unexpected:
        raise ValueError(f"the start model's weights do not fit the encoder: missing {new}, "
                         f"unexpected {unexpected}")
    if missing:
        last = encoder.context_layers[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()


def learning_rate(epoch, args):
    """The rate of ``epoch``: constant, then a cosine from ``--decay-start`` to ``--epochs``."""
    if args.final_learning_rate is None or epoch < args.decay_start:
        return args.learning_rate
    progress = (epoch - args.decay_start) / max(args.epochs - args.decay_start, 1)
    return cosine_rate(progress, args.learning_rate, args.final_learning_rate)


if __name__ == "__main__":
    main()
