"""Train the PSF-, mask- and density-aware SDSS model (r and i bands).

One encoder for every SDSS field: it reads each band's PSF (`starnet.psf_family`), a
mask of missing pixels (`starnet.defects`) and, through its context branch, the local
density of stars. Training images draw

- a PSF pair from a bank: the power laws of the fields of run 2583 camcol 2 in the
  bundled photoField (``--holdout`` fields left out for testing), SDSS's KL PSF of field
  136 at random frame positions, and circular Gaussian and Moffat profiles of FWHM 2 to
  6 pixels (other surveys); the i PSF blurred by the resampling onto the r pixels at a
  random pixel fraction, as `starnet.datasets.load_sdss_frame` makes it; each rendered
  with a width error of up to ``--width-error`` that the encoder is not told;
- a density log-uniform in ``--density-range`` with a gradient across the image;
- a flux distribution: a Pareto index uniform in ``--alpha-range`` and an upper flux
  log-uniform in ``--f-max-range``, both told to the encoder (which reads the prior: the
  count of a crowded field follows the bright end of the prior, docs/sdss_model.rst);
- saturation at a random full well with bleed trails (none in a fraction
  ``--unsaturated-fraction`` of the images), bad columns, cosmic rays and chip edges,
  masked;
- the M2 sky times a factor in ``--background-range``.

Run (the command is recorded in the model's metadata; training resumes from
``--checkpoint``)::

    python scripts/train_sdss.py --steps 60000 --output starnet/models/sdss.pt

``--init`` starts from the weights of a model file (new inputs start at zero weight).
``--steps`` fixes the schedule (cosine decay of the rate over the steps); with
``--stop-after-minutes`` the run stops after the epoch that passes that time and a
later run with the same arguments resumes the schedule where it stopped.
"""

import argparse
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from astropy.table import QTable
from photutils.psf import CircularGaussianPRF, MoffatPSF

from starnet import StarFieldPrior, StarNetDeblender
from starnet.datasets import load_m2
from starnet.datasets.sdss import resampled_psf
from starnet.defects import FrameDefects
from starnet.devices import PRECISIONS, as_precision
from starnet.encoder import StarNetEncoder
from starnet.model_files import checkpoint_weights
from starnet.psf import kl_psf_from_psfield, psf_fwhm
from starnet.prior import PRIOR_FEATURES
from starnet.psf_family import DESCRIPTOR_SIZE, PSFBank, photofield_psfs
from starnet.training import SimulatedBatches, TrainingSettings, cosine_rate, train_encoder

SDSS = files("starnet") / "datasets" / "data" / "sdss"


def holdout_fields(psfs):
    """Fields kept out of training: the narrowest, the median and the widest r PSF, and
    every tenth field."""
    fields = sorted(psfs)
    order = sorted(fields, key=lambda f: psf_fwhm(psfs[f][0]))
    return sorted({order[0], order[len(order) // 2], order[-1], *fields[5::10]})


def psf_members(*, n_kl, n_analytic, seed):
    """The bank's PSF pairs (r, i)."""
    rng = np.random.default_rng(seed)
    power_laws = photofield_psfs(SDSS / "photoField-002583-2.fits", ("r", "i"))
    held = holdout_fields(power_laws)
    members = []
    for field, (r, i) in power_laws.items():
        if field not in held:
            members.append((r, resampled_psf(i, *rng.uniform(0, 1, 2))))
    psfield = SDSS / "psField-002583-2-0136.fit"
    for _ in range(n_kl):
        row, col = rng.uniform(0, 1489), rng.uniform(0, 2048)
        r = kl_psf_from_psfield(psfield, band="r", row=row, col=col)
        i = kl_psf_from_psfield(psfield, band="i", row=row, col=col)
        members.append((r, resampled_psf(i, *rng.uniform(0, 1, 2))))
    for k in range(n_analytic):
        fwhm = rng.uniform(2.0, 6.0)
        ratio = rng.uniform(0.9, 1.05)          # i vs r seeing
        if k % 2:
            members.append(tuple(CircularGaussianPRF(fwhm=fwhm * s) for s in (1.0, ratio)))
        else:
            beta = rng.uniform(2.5, 5.0)
            members.append(tuple(MoffatPSF(alpha=_moffat_alpha(fwhm * s, beta), beta=beta)
                                 for s in (1.0, ratio)))
    return members, held


def _moffat_alpha(fwhm, beta):
    """photutils' Moffat core width for a FWHM: FWHM = 2 alpha sqrt(2^(1/beta) - 1)."""
    return fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))


def simulated_batches(args, prior, sky):
    """The training images: PSFs from the bank of `psf_members`, M2's sky, defects."""
    members, _ = psf_members(n_kl=args.n_kl, n_analytic=args.n_analytic, seed=args.seed)
    bank = PSFBank(members, width_error=args.width_error)
    return SimulatedBatches(
        prior, bank, sky, (args.image_size,) * 2, margin=6.0,
        background_range=tuple(args.background_range),
        density_range=tuple(args.density_range), density_gradient=args.density_gradient,
        defects=None if args.no_defects else FrameDefects(
            unsaturated_probability=args.unsaturated_fraction),
        f_max_range=tuple(args.f_max_range), alpha_range=tuple(args.alpha_range))


def warm_start(encoder, path):
    """Copy the weights of the model file ``path`` into ``encoder``: tensors of equal
    shape whole; a first layer with fewer inputs into its leading input channels, the
    others left at zero (so the new inputs enter as training needs them). A wider
    model is narrowed first (`narrowed_weights`)."""
    source = StarNetDeblender.load(path).encoder
    encoder.log_flux_offset = source.log_flux_offset
    state = source.state_dict()
    if _widths(source) != _widths(encoder):
        state = narrowed_weights(state, *_widths(source), *_widths(encoder))
    own = encoder.state_dict()
    for name, tensor in state.items():
        if name not in own:     # a head this encoder lacks (the density spread)
            continue
        target = own[name]
        if target.shape == tensor.shape:
            target.copy_(tensor)
        elif target.ndim == 4 and target.shape[0] == tensor.shape[0] \
                and target.shape[2:] == tensor.shape[2:] and target.shape[1] > tensor.shape[1]:
            target.zero_()
            target[:, :tensor.shape[1]] = tensor
        else:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the encoder "
                             f"{tuple(target.shape)}")
    encoder.load_state_dict(own)


def _widths(encoder):
    """``(hidden, tile_hidden)`` of ``encoder``."""
    return encoder.config()["hidden"], encoder.config()["tile_hidden"]


def narrowed_weights(state, hidden, tile_hidden, new_hidden, new_tile_hidden):
    """The weights of an encoder (``state``) narrowed to ``new_hidden`` pixel and
    ``new_tile_hidden`` tile channels, to fine-tune a leaner network from a trained one.

    Each layer keeps the channels that carry most: the product of the norm of the
    filter that makes a channel and of the weights that read it. The PSF and prior
    modulation keeps the scales and shifts of the channels kept, and the context branch
    its outputs onto the tile channels kept.
    """
    w = dict(state)
    pixel, tile = "pixel_layers.", "tile_layers."

    def keep(producer, consumer, n):
        score = (w[producer].flatten(1).norm(dim=1)
                 * w[consumer].transpose(0, 1).flatten(1).norm(dim=1))
        return score.argsort(descending=True)[:n].sort().values

    chain = [pixel + "0", pixel + "2", pixel + "4", pixel + "6", tile + "0", tile + "2",
             tile + "4", "head"]
    sizes = [new_hidden] * 3 + [new_tile_hidden] * 4
    kept = [keep(chain[k] + ".weight", chain[k + 1] + ".weight", sizes[k])
            for k in range(len(sizes))]
    for k, layer in enumerate(chain):
        rows = kept[k] if k < len(kept) else slice(None)
        weight = w[layer + ".weight"][rows]
        w[layer + ".weight"] = weight if k == 0 else weight[:, kept[k - 1]]
        w[layer + ".bias"] = w[layer + ".bias"][rows]
    first, tiles = kept[0], kept[3]
    if "psf_embedding.2.weight" in w:      # scale and shift of layer 0's and layer 6's channels
        rows = torch.cat([first, hidden + first, 2 * hidden + tiles,
                          2 * hidden + tile_hidden + tiles])
        for name in ("psf_embedding.2.weight", "psf_embedding.2.bias"):
            w[name] = w[name][rows]
    if "context_layers.6.weight" in w:
        for name in ("context_layers.6.weight", "context_layers.6.bias"):
            w[name] = w[name][tiles]
    return w


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="starnet/models/sdss.pt")
    parser.add_argument("--checkpoint", default="scripts/checkpoints/sdss.ckpt")
    parser.add_argument("--steps", type=int, default=60000)
    parser.add_argument("--batches-per-epoch", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--tile-hidden", type=int, default=64)
    parser.add_argument("--context-cells", type=int, default=4,
                        help="tiles per side of the context cells (0: no context branch)")
    parser.add_argument("--density-cells", type=int, default=0,
                        help="side in tiles of the cells that share a density offset, whose "
                             "spread a head learns through the count score (0: none)")
    parser.add_argument("--density-range", type=float, nargs=2, default=(0.001, 0.3))
    parser.add_argument("--density-gradient", type=float, default=1.0)
    parser.add_argument("--f-max", type=float, default=1e6,
                        help="the upper flux of the model's declared prior")
    parser.add_argument("--f-max-range", type=float, nargs=2, default=(3e5, 2e7))
    parser.add_argument("--alpha-range", type=float, nargs=2, default=(0.35, 0.75))
    parser.add_argument("--init", default=None,
                        help="a model file whose weights the training starts from")
    parser.add_argument("--background-range", type=float, nargs=2, default=(0.5, 2.0))
    parser.add_argument("--width-error", type=float, default=0.03)
    parser.add_argument("--n-kl", type=int, default=48)
    parser.add_argument("--n-analytic", type=int, default=64)
    parser.add_argument("--no-defects", action="store_true")
    parser.add_argument("--unsaturated-fraction", type=float, default=0.0,
                        help="fraction of the images left unsaturated (FrameDefects)")
    parser.add_argument("--count-score-weight", type=float, default=0.0,
                        help="weight of the block count score (TrainingSettings)")
    parser.add_argument("--count-blocks", type=int, nargs="+",
                        default=list(TrainingSettings.count_blocks),
                        help="sides in tiles of the blocks the count score is taken over")
    parser.add_argument("--average-steps", type=int, default=0,
                        help="average the weights over about this many steps "
                             "(TrainingSettings.average_steps)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--final-learning-rate", type=float, default=2e-5)
    parser.add_argument("--stop-after-minutes", type=float, default=None)
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="of the network's convolutions in the training steps "
                             "(default float32; bfloat16 is faster on CPUs with AMX)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    started = time.time()
    fields = photofield_psfs(SDSS / "photoField-002583-2.fits", ("r", "i"))
    held = holdout_fields(fields)
    n_members = len(fields) - len(held) + args.n_kl + args.n_analytic   # psf_members'
    image, _ = load_m2(border=3)
    sky = np.median(np.asarray(image.meta["background"]).reshape(2, -1), axis=1)
    prior = StarFieldPrior(mu=0.12, f_min=1000.0, f_max=args.f_max, alpha=0.5,
                           bands=("r", "i"))
    batches = None
    torch.manual_seed(args.seed)
    encoder = StarNetEncoder(n_bands=2, hidden=args.hidden, tile_hidden=args.tile_hidden,
                             mask_channel=True, psf_features=DESCRIPTOR_SIZE,
                             prior_features=PRIOR_FEATURES, context_cells=args.context_cells,
                             density_cells=args.density_cells)
    if args.init and not Path(args.checkpoint).exists():
        warm_start(encoder, args.init)
    settings = TrainingSettings(
        image_shape=(args.image_size,) * 2, batch_size=args.batch_size,
        batches_per_epoch=args.batches_per_epoch, n_steps=args.steps,
        learning_rate=args.learning_rate, final_learning_rate=args.final_learning_rate,
        margin=6.0, n_validation=64, background_range=tuple(args.background_range),
        density_range=tuple(args.density_range), count_score_weight=args.count_score_weight,
        count_blocks=tuple(args.count_blocks), average_steps=args.average_steps,
        seed=args.seed)
    Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    description = {"script": "train_sdss", "encoder": encoder.config(),
                   "prior": prior.to_dict(), "bank_members": n_members,
                   "width_error": args.width_error, "holdout_fields": held,
                   "f_max_range": list(args.f_max_range), "alpha_range": list(args.alpha_range),
                   "density_range": list(args.density_range), "init": args.init,
                   "unsaturated_fraction": args.unsaturated_fraction}
    total_steps = args.steps
    while True:
        done = 0
        if Path(args.checkpoint).exists():
            done = sum(row["steps"] for row in
                       torch.load(args.checkpoint, weights_only=True)["history"])
        if done >= total_steps:
            break
        if batches is None:
            batches = simulated_batches(args, prior, sky)
            print(f"PSF bank: {len(batches.renderer)} members in "
                  f"{time.time() - started:.0f} s (fields held out: {held})", flush=True)
        # one epoch more than the checkpoint holds, on the schedule of all the steps
        settings.n_steps = min(done + args.batches_per_epoch, total_steps)
        settings.final_learning_rate = None
        # the rate of this epoch on the cosine decay over all the steps
        settings.learning_rate = cosine_rate(done / total_steps, args.learning_rate,
                                             args.final_learning_rate)
        history = train_encoder(encoder, batches, settings, checkpoint=args.checkpoint,
                                model_description=description, progress=False,
                                dtype=as_precision(args.precision))
        row = history[-1]
        print(f"epoch {row['epoch']}: steps {done + row['steps']}, loss {row['train_loss']:.3f}"
              f" / {row['val_loss']:.3f}, F1 {row['val_f1']:.3f}, "
              f"{row['images_per_second']:.1f} images/s, rate {settings.learning_rate:.2e}",
              flush=True)
        if args.stop_after_minutes and time.time() - started > 60 * args.stop_after_minutes:
            print("stopped on time; run again to resume", flush=True)
            return
    print(f"trained {total_steps} steps; writing {args.output}", flush=True)
    checkpoint = torch.load(args.checkpoint, weights_only=True)
    encoder.load_state_dict(checkpoint_weights(checkpoint))
    settings.n_steps, settings.learning_rate = total_steps, args.learning_rate
    settings.final_learning_rate = args.final_learning_rate
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    write_model_file(encoder, image.meta["psf"], prior, sky, settings, checkpoint["history"],
                     dict(description, command=command), args.output,
                     overwrite=args.overwrite)


def write_model_file(encoder, psfs, prior, sky, settings, history, provenance, path, *,
                     overwrite):
    """The package's model file of the trained ``encoder``: a `StarNetDeblender` whose
    PSF and background (those `fit` would train with) are M2's, with the background
    encoder of the bundled ``sdss-m2`` (trained on images of the same bands and sky)."""
    config = encoder.config()
    deblender = StarNetDeblender(
        prior=prior, psf=psfs, background=sky, tile_size=config["tile_size"],
        max_sources=config["max_sources"], hidden=config["hidden"],
        tile_hidden=config["tile_hidden"], reads_psf=True, reads_mask=True, reads_prior=True,
        context_cells=config.get("context_cells", 0),
        density_cells=config.get("density_cells", 0))
    deblender.encoder.load_state_dict(encoder.state_dict())
    deblender.encoder.log_flux_offset = encoder.log_flux_offset
    deblender.training_settings = settings
    counts = ("epoch", "steps", "dropped_stars")      # kept as numbers in the checkpoint
    deblender.training_history = QTable({
        name: [int(row[name]) if name in counts else row.get(name, np.nan) for row in history]
        for name in history[0]})
    specialist = StarNetDeblender.pretrained("sdss-m2")
    deblender.background_encoder = specialist.background_encoder
    deblender.background_history = specialist.background_history
    deblender.provenance = dict(provenance, background_encoder="that of sdss-m2")
    deblender.save(path, overwrite=overwrite)


if __name__ == "__main__":
    main()
