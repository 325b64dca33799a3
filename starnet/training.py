"""Fitting the encoder by the expected forward KL on simulated images (paper eq. 21)."""

import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from astropy.table import QTable
from tqdm.auto import tqdm

from .denormals import zero_negligible_weights
from .devices import PRECISIONS, as_device, autocast
from .encoder import conditioning_map
from .posterior import side_correlations
from .matching import match_catalogs
from .model_files import read_checkpoint, write_checkpoint
from .prior import StarCatalogBatch, _seed_int, batch_to_table, catalog_table, prior_descriptor
from .progress import progress_bar
from .psf_family import PSFBank
from .simulate import add_noise
from .tiles import TileGrid, inside_image
from .training_settings import TrainingSettings
from .validation import (check_positive_int, check_range, check_training_settings, check_writable,
                         keep_finite)

__all__ = ["TrainingSettings", "SimulatedBatches", "TrainingBatch", "train_encoder",
           "cosine_rate", "block_count_score", "fit_density_spread", "fit_pair_correlations"]

# the name of each precision, for the history
_PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


class TrainingBatch(NamedTuple):
    """Simulated images, what the encoder is told about them, and their true catalogs."""

    images: torch.Tensor
    background: torch.Tensor
    catalogs: StarCatalogBatch
    mask: torch.Tensor = None
    psf: torch.Tensor = None
    prior: torch.Tensor = None

    def encoder_inputs(self, encoder):
        """Keyword arguments of ``encoder`` beside the images and background (the prior
        descriptors only for an encoder that reads them)."""
        prior = self.prior if encoder.prior_features else None
        return {"mask": self.mask, "psf": self.psf, "prior": prior}

    def to(self, device):
        """The same batch with the encoder's inputs on ``device`` (the catalogs stay)."""
        return self._replace(**{name: getattr(self, name).to(device) for name in
                                ("images", "background", "mask", "psf", "prior")
                                if getattr(self, name) is not None})


class SimulatedBatches:
    """Draws (catalog, image) pairs from the generative model.

    Parameters
    ----------
    prior : `~starnet.StarFieldPrior`
    renderer : `~starnet.simulate.StarFieldRenderer` or `~starnet.psf_family.PSFBank`
        The PSFs: one renderer for every image, or a bank from which each image draws
        its member (and its width error); the encoder is then told each image's PSF
        descriptor (``TrainingBatch.psf``).
    background : `numpy.ndarray`, shape (n_bands,)
        Background per band, electrons.
    shape : tuple of int
        Image ``(rows, cols)``.
    margin : float
        Stars are drawn within ``margin`` pixels outside the image too.
    background_range : tuple of float
        Range of the uniform factor applied to the background of each image.
    variants : list of `~starnet.simulate.StarFieldRenderer`
        Renderers of other PSFs: each image's star light is moved towards (or away
        from) each variant's by a fraction drawn from ``variant_range``, per band.
    variant_range : tuple of float
        Range of those fractions.
    density_range : tuple of float, optional
        Range from which each image's stars per pixel are drawn log-uniformly
        (default: the prior's ``mu``).
    density_gradient : float
        Largest change of the natural log of the density across an image's width: each
        image's density varies as ``exp(g . (x - centre))`` along a random direction,
        with ``|g| cols`` uniform from 0 to this, its mean over the image kept (stars
        are drawn at the highest density and thinned), so that the encoder reads the
        local density rather than the image's.
    defects : `~starnet.defects.FrameDefects`, optional
        Saturation, bad columns, cosmic rays and edges added to each image, with their
        mask (``TrainingBatch.mask``).
    f_max_range, alpha_range : tuple of float, optional
        Ranges from which each image's upper flux (log-uniformly) and Pareto index
        (uniformly) are drawn in place of the prior's; each image's values are told to
        an encoder that reads the prior (``TrainingBatch.prior``,
        `starnet.prior.prior_descriptor`).
    """

    def __init__(self, prior, renderer, background, shape, *, margin=0.0,
                 background_range=(1.0, 1.0), variants=(), variant_range=(0.0, 0.0),
                 density_range=None, density_gradient=0.0, defects=None, f_max_range=None,
                 alpha_range=None):
        self.prior = prior
        self.renderer = renderer
        self.background = torch.as_tensor(np.asarray(background, dtype=np.float32))
        self.shape = tuple(shape)
        self.margin = margin
        self.background_range = tuple(background_range)
        self.variants = list(variants)
        self.variant_range = tuple(variant_range)
        self.density_range = (None if density_range is None
                              else check_range(density_range, "density_range", positive=True))
        if not (np.isfinite(density_gradient) and density_gradient >= 0):
            raise ValueError(f"density_gradient must be finite and >= 0, got {density_gradient}")
        self.density_gradient = float(density_gradient)
        self.defects = defects
        self.f_max_range = (None if f_max_range is None
                            else check_range(f_max_range, "f_max_range", positive=True))
        self.alpha_range = (None if alpha_range is None
                            else check_range(alpha_range, "alpha_range", positive=True))
        if self.f_max_range is not None and self.f_max_range[0] <= prior.f_min:
            raise ValueError(f"f_max_range must lie above the prior's f_min ({prior.f_min}), "
                             f"got {f_max_range}")
        if isinstance(renderer, PSFBank) and self.variants:
            raise ValueError("a PSFBank renders its own width errors; give no PSF variants")

    def draw(self, n_images, *, generator=None):
        """Return ``(images, backgrounds, catalogs)`` for ``n_images`` new images."""
        return tuple(self.draw_batch(n_images, generator=generator)[:3])

    def draw_batch(self, n_images, *, generator=None):
        """A `TrainingBatch` of ``n_images`` new images."""
        mu = None
        if self.density_range is not None:
            low, high = np.log(self.density_range)
            mu = torch.exp(low + (high - low) * torch.rand(n_images, generator=generator,
                                                           dtype=torch.float64))
        f_max = torch.full((n_images,), self.prior.f_max, dtype=torch.float64)
        if self.f_max_range is not None:
            low, high = np.log(self.f_max_range)
            f_max = torch.exp(low + (high - low) * torch.rand(n_images, generator=generator,
                                                              dtype=torch.float64))
        alpha = torch.full((n_images,), self.prior.alpha, dtype=torch.float64)
        if self.alpha_range is not None:
            low, high = self.alpha_range
            alpha = low + (high - low) * torch.rand(n_images, generator=generator,
                                                    dtype=torch.float64)
        catalogs = self._catalogs(n_images, mu, generator, f_max=f_max, alpha=alpha)
        psf = None
        if isinstance(self.renderer, PSFBank):
            members = torch.randint(len(self.renderer), (n_images,), generator=generator)
            errors = 2 * torch.rand(n_images, self.renderer.n_bands, generator=generator) - 1
            stars = self.renderer.render(catalogs.locs, catalogs.fluxes, catalogs.mask,
                                         self.shape, members=members, errors=errors)
            psf = self.renderer.descriptors[members]
        else:
            stars = self.renderer.render(catalogs.locs, catalogs.fluxes, catalogs.mask,
                                         self.shape)
        base = stars
        for variant in self.variants:
            low, high = self.variant_range
            fraction = low + (high - low) * torch.rand(n_images, stars.shape[1], 1, 1,
                                                       generator=generator)
            if not fraction.any():
                continue        # no light moves (a range of 0 to 0): skip the rendering
            other = variant.render(catalogs.locs, catalogs.fluxes, catalogs.mask, self.shape)
            stars = stars + fraction * (other - base)
        low, high = self.background_range
        scale = low + (high - low) * torch.rand(n_images, 1, 1, 1, generator=generator)
        background = (scale * self.background.reshape(1, -1, 1, 1)).expand_as(stars)
        images = add_noise((stars + background).clamp(min=0), generator=generator)
        mask = None
        if self.defects is not None:
            images, mask = self.defects.apply(images, generator=generator)
        return TrainingBatch(images, background, catalogs, mask, psf,
                             prior_descriptor(f_max, alpha))

    def _catalogs(self, n_images, mu, generator, *, f_max=None, alpha=None):
        """Catalogs at densities ``mu`` with upper fluxes ``f_max`` and Pareto indices
        ``alpha`` (None: the prior's), with a density gradient."""
        fluxes = {"f_max": f_max, "alpha": alpha}
        if not self.density_gradient:
            return self.prior.sample_batch(n_images, self.shape, margin=self.margin, mu=mu,
                                           generator=generator, **fluxes)
        rows, cols = self.shape
        strength = self.density_gradient / cols * torch.rand(n_images, generator=generator,
                                                             dtype=torch.float64)
        angle = 2 * np.pi * torch.rand(n_images, generator=generator, dtype=torch.float64)
        slope = strength[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        half = torch.tensor([cols / 2 + self.margin, rows / 2 + self.margin],
                            dtype=torch.float64)
        peak = (slope.abs() * half).sum(dim=1)                # log of the highest / mean
        # the mean of exp(g . u) over the box is the product of sinh(a) / a per axis
        a = (slope.abs() * half).clamp(min=1e-12)
        mean = torch.prod(torch.sinh(a) / a, dim=1)
        base = torch.as_tensor(self.prior.mu if mu is None else mu, dtype=torch.float64)
        catalogs = self.prior.sample_batch(
            n_images, self.shape, margin=self.margin,
            mu=base.expand(n_images) * torch.exp(peak) / mean, generator=generator, **fluxes)
        centre = torch.tensor([(cols - 1) / 2, (rows - 1) / 2], dtype=torch.float64)
        log_rate = ((catalogs.locs.double() - centre) * slope[:, None, :]).sum(dim=-1)
        keep = torch.rand(catalogs.mask.shape, generator=generator, dtype=torch.float64) \
            < torch.exp(log_rate - peak[:, None])
        mask = catalogs.mask & keep
        return StarCatalogBatch(locs=catalogs.locs * mask[..., None],
                                fluxes=catalogs.fluxes * mask[..., None], mask=mask)


def train_encoder(encoder, batches, settings, *, checkpoint=None, model_description=None,
                  progress=True, baselines=(), device=None, dtype=torch.float32):
    """Fit ``encoder`` by minimising the expected forward KL on simulated batches.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
        Trained in place.
    batches : `SimulatedBatches`
        The generative model.
    settings : `TrainingSettings`
    checkpoint : str or `~pathlib.Path`, optional
        File written atomically at the end of every epoch (network, optimiser, random
        state, history, settings and ``model_description``); when it exists, training
        resumes from it (see `starnet.model_files.read_checkpoint`: a checkpoint of
        other settings or another model is refused with a ValueError).
    model_description : dict, optional
        The generative model and architecture being fitted
        (`starnet.model_files.describe_model`), checked on resume when given.
    progress : bool
        Show a progress bar.
    baselines : sequence of callable, optional
        Each ``baseline(data, background)`` catalogs one validation image (arrays of
        shape (bands, rows, cols), electrons) with another method (photutils), as a
        table with ``x_fit``, ``y_fit`` and ``flux_<band>`` columns. The best of their
        F1 on the validation images, matched as the model's, is the ``baseline_f1``
        column, printed after each epoch; a fit that ends below it warns.
    device : None, str or `torch.device`, optional
        Where the network trains (`starnet.devices.as_device`: ``'cuda'`` for a GPU).
        Images are simulated on the CPU and moved there step by step; the encoder is
        back on the CPU when the fit ends, and checkpoints load on any machine.
    dtype : `torch.dtype`, optional
        Of the network's convolutions in the training steps
        (`starnet.devices.as_precision`; ``torch.bfloat16`` keeps the first convolution,
        the context branch and the heads in float32); the weights, the loss and the
        validation stay float32.

    Returns
    -------
    history : `~astropy.table.QTable`
        One row per epoch: ``epoch``, ``train_loss`` (with the count score, if any),
        ``val_loss`` (the forward KL alone), ``val_f1``, ``val_tpr``, ``val_ppv`` (these
        and the count columns of the averaged weights when ``settings.average_steps``
        is set), ``images_per_second`` (training steps only),
        ``seconds`` (wall time, validation included), ``steps``, the
        ``learning_rate`` of its last step, the number of training stars dropped
        because a tile held more than ``max_sources``, ``schedule_progress``, how far
        the rate's decay had gone (a resumed fit continues from it), and the
        ``precision`` of the epoch's steps (``'float32'`` or ``'bfloat16'``).
    """
    check_training_settings(settings)   # fields may have been changed since construction
    if settings.count_score_weight and encoder.n_colors != 1:
        raise ValueError("count_score_weight needs independent tiles (n_colors = 1): the "
                         f"count of a checkerboard encoder (n_colors = {encoder.n_colors}) "
                         "is not a sum of tile posteriors")
    if checkpoint is not None:
        check_writable(checkpoint, "checkpoint")
    grid = TileGrid(tile_size=encoder.tile_size, max_sources=encoder.max_sources)
    device = as_device(device)
    encoder.to(device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    validation = batches.draw_batch(settings.n_validation,
                                    generator=torch.Generator().manual_seed(settings.seed + 1))
    validation_inputs = validation.to(device)
    history = []
    average_state = None
    if checkpoint is not None and Path(checkpoint).exists():
        state = read_checkpoint(checkpoint, settings=settings, model=model_description)
        encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history = state["history"]
        average_state = state.get("average")
        for row in history:    # rows of checkpoints written before these columns
            row.setdefault("steps", settings.batches_per_epoch)
            row.setdefault("learning_rate", float("nan"))
            row.setdefault("val_count_bias", float("nan"))
            row.setdefault("val_coverage", float("nan"))
            row.setdefault("baseline_f1", float("nan"))
            row.setdefault("schedule_progress", float("nan"))
            row.setdefault("precision", "float32")
    # a resumed fit has the checkpoint's validation images (read_checkpoint refuses other
    # settings or another model): their baselines' F1 is known, and costs seconds to redo
    known = [row["baseline_f1"] for row in history if math.isfinite(row["baseline_f1"])]
    if baselines and known:
        baseline_f1 = known[-1]
    else:
        baseline_f1 = max((_baseline_f1(baseline, validation, batches.prior.bands)
                           for baseline in baselines), default=float("nan"))
    for group in optimizer.param_groups:  # the settings, also when resuming (an Adam
        group["weight_decay"] = settings.weight_decay  # checkpoint would restore L2 decay)
        group["decoupled_weight_decay"] = True
    schedule = _Schedule(settings, history)
    average = (_WeightAverage(encoder, settings.average_steps, average_state)
               if settings.average_steps else None)
    if progress and schedule.note:
        tqdm.write(schedule.note)
    while not schedule.finished():
        encoder.train()
        started = time.perf_counter()
        losses, dropped = [], 0
        n_steps = schedule.steps_in_next_epoch()
        steps = progress_bar(range(n_steps), enabled=progress,
                             description=f"epoch {len(history) + 1}")
        for step in steps:
            rate = schedule.rate(step, time.perf_counter() - started)
            for group in optimizer.param_groups:
                group["lr"] = rate
            batch = batches.draw_batch(settings.batch_size, generator=generator)
            tiles = grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes,
                                  batch.catalogs.mask, batch.images.shape[-2:])
            batch, tiles = batch.to(device), tiles.to(device)
            with keep_finite(encoder, f"epoch {len(history) + 1}, step {step + 1}",
                             settings.learning_rate) as check:
                loss = check(_training_loss(encoder, batch, tiles, generator, settings,
                                            dtype))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if average is not None:
                average.update(encoder)
            losses.append(loss.item())
            dropped += tiles.n_dropped
            steps.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{rate:.1e}")
            if schedule.out_of_time(time.perf_counter() - started):
                break
        training_seconds = time.perf_counter() - started
        with average.applied(encoder) if average is not None else nullcontext():
            scores = _validate(encoder, grid, validation, validation_inputs,
                               batches.prior.bands)
        row = {"epoch": len(history) + 1, "train_loss": float(np.mean(losses)), **scores,
               "images_per_second": len(losses) * settings.batch_size / training_seconds,
               "seconds": time.perf_counter() - started, "steps": len(losses),
               "learning_rate": rate, "dropped_stars": dropped, "baseline_f1": baseline_f1,
               "precision": _PRECISION_NAMES[dtype]}
        history.append(row)
        schedule.record(row)
        if progress:
            steps.write(f"epoch {row['epoch']}: train loss {row['train_loss']:.3f}, "
                        f"validation loss {row['val_loss']:.3f}, F1 {row['val_f1']:.3f}"
                        + ("" if np.isnan(baseline_f1) else f" (photutils {baseline_f1:.3f})")
                        + ", "
                        f"count bias {row['val_count_bias']:+.1%}, 90 % count interval "
                        f"covers {row['val_coverage']:.0%}, "
                        f"{row['images_per_second']:.1f} images/s, rate {rate:.1e}")
        if checkpoint is not None:
            state = {"encoder": encoder.state_dict(), "optimizer": optimizer.state_dict(),
                     "generator": generator.get_state(), "history": history}
            if average is not None:
                state["average"] = average.state()
            write_checkpoint(checkpoint, state, settings=settings, model=model_description)
    if average is not None:
        encoder.load_state_dict(average.weights)
    encoder.eval()
    encoder.to("cpu")
    zero_negligible_weights(encoder)
    if history and history[-1]["val_f1"] < baseline_f1:
        warnings.warn(f"after {sum(row['steps'] for row in history)} steps the model's "
                      f"validation F1 ({history[-1]['val_f1']:.3f}) is below photutils' on "
                      f"the same images ({baseline_f1:.3f}): train longer (fit again with "
                      "the same checkpoint and a larger budget) before trusting it",
                      UserWarning)
    return QTable(rows=history, names=list(history[0])) if history else QTable()


class _WeightAverage:
    """Exponential moving average of an encoder's weights over about ``steps`` steps
    (`TrainingSettings.average_steps`); the plain mean of the steps so far while there
    are fewer. ``state`` resumes one from a checkpoint (`state`)."""

    def __init__(self, encoder, steps, state=None):
        self.steps = steps
        current = encoder.state_dict()
        if state is None:
            self.weights = {name: value.detach().clone() for name, value in current.items()}
            self.updates = 0
        else:
            self.weights = {name: state["weights"][name].to(value.device).clone()
                            for name, value in current.items()}
            self.updates = int(state["updates"])

    @torch.no_grad()
    def update(self, encoder):
        """Take in the encoder's weights after a step."""
        self.updates += 1
        weight = max(1.0 / self.steps, 1.0 / self.updates)
        for name, value in encoder.state_dict().items():
            if value.is_floating_point():
                self.weights[name].lerp_(value, weight)
            else:
                self.weights[name].copy_(value)

    @contextmanager
    def applied(self, encoder):
        """The encoder with the averaged weights, its own back on exit."""
        own = {name: value.clone() for name, value in encoder.state_dict().items()}
        encoder.load_state_dict(self.weights)
        try:
            yield encoder
        finally:
            encoder.load_state_dict(own)

    def state(self):
        """What a checkpoint keeps (on the CPU)."""
        return {"weights": {name: value.cpu() for name, value in self.weights.items()},
                "updates": self.updates}


class _Schedule:
    """Budget (steps and time) and learning rate of a fit, resumed from ``history``.

    The rate follows the fraction of the budget used. A fit stopped before the end of
    its budget and resumed with a larger one would use a smaller fraction than when it
    stopped, and the rate would rise again; instead it continues from the fraction it
    had reached (``schedule_progress`` of the last history row) and decays over what the
    new budget adds. A fit that had ended its decay starts a new one from the rate at
    the fraction the new budget makes used (a warm restart), as if it had been given
    that budget from the start; ``note`` says so.
    """

    def __init__(self, settings, history):
        self.settings = settings
        self.total_steps = settings.n_steps or settings.n_epochs * settings.batches_per_epoch
        # histories written before rows counted their steps held whole epochs
        self.steps_done = sum(row.get("steps", settings.batches_per_epoch) for row in history)
        self.seconds_done = sum(row["seconds"] for row in history)
        reached = history[-1].get("schedule_progress", 0.0) if history else 0.0
        used = self._used(0, 0.0)
        self.resumed = (reached, used) if used < reached < 1.0 else None
        self.note = None
        if self.resumed is not None:
            self.note = (f"resuming {reached:.0%} through the rate's decay; it continues over "
                         "the larger budget")
        elif reached >= 1.0 and used < 1.0 and settings.final_learning_rate is not None:
            self.note = (f"the checkpoint's fit had ended its rate's decay; the larger budget "
                         f"({used:.0%} used) restarts it at {self.rate(0, 0.0):.2g}")

    def _used(self, step, seconds):
        """Fraction of the budget used, steps or time, whichever is further."""
        used = (self.steps_done + step) / self.total_steps
        if self.settings.max_time is not None:
            used = max(used, (self.seconds_done + seconds) / self.settings.max_time)
        return min(used, 1.0)

    def progress(self, step, seconds):
        """Progress of the rate's decay (0 to 1) at ``step`` and ``seconds`` into the
        current epoch."""
        used = self._used(step, seconds)
        if self.resumed is None:
            return used
        reached, start = self.resumed
        return min(reached + (1.0 - reached) * (used - start) / (1.0 - start), 1.0)

    def rate(self, step, seconds):
        settings = self.settings
        if settings.final_learning_rate is None:
            return settings.learning_rate
        return cosine_rate(self.progress(step, seconds), settings.learning_rate,
                           settings.final_learning_rate)

    def steps_in_next_epoch(self):
        return min(self.settings.batches_per_epoch, self.total_steps - self.steps_done)

    def out_of_time(self, seconds):
        max_time = self.settings.max_time
        return max_time is not None and self.seconds_done + seconds >= max_time

    def finished(self):
        return self.steps_done >= self.total_steps or self.out_of_time(0.0)

    def record(self, row):
        self.steps_done += row["steps"]
        self.seconds_done += row["seconds"]
        row["schedule_progress"] = self.progress(0, 0.0)


def cosine_rate(progress, initial, final):
    """Learning rate at ``progress`` (0 to 1) of a cosine decay from ``initial`` to ``final``.

    >>> cosine_rate(0.5, 1e-3, 1e-5)
    0.000505
    """
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * progress))


def block_count_score(count_probs, counts, block, *, floor=0.25, spread=None,
                      pair_correlation=None):
    """Dawid-Sebastiani score of the star counts of square blocks of tiles, per tile.

    The posterior of independent tiles gives each block's count a mean ``m`` and a
    variance ``v`` (sums over its tiles); the score of a true count ``n`` is ``(n -
    m)**2 / (v + floor) + log(v + floor)``. Its expectation is smallest when ``m`` is the
    posterior mean of ``n`` and ``v`` its variance less ``floor`` (``floor`` keeps the
    score finite for blocks that are surely empty, at the cost of rewarding variances
    ``floor`` too small). Divided by the tiles of a block, so that blocks of any size
    weigh like the tiles' forward KL (per tile). With ``spread``, the tiles of an image
    share a log-density offset of that standard deviation
    (`starnet.posterior.density_mixture`), which adds about ``(spread v)**2`` to ``v``.
    With ``pair_correlation``, twice the covariances of the side pairs inside each block
    (`starnet.posterior.pair_covariance`) are added to that.

    Parameters
    ----------
    count_probs : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, max_sources + 1)
        Each tile's probabilities of 0 .. max_sources stars.
    counts : `torch.Tensor`, shape (n_images, tile_rows, tile_cols)
        The true number of stars of each tile.
    block : int
        Side of the blocks in tiles, cut to the grid's rows and columns (a side as large
        as the grid scores the whole image). The blocks tile the grid from its top-left
        corner; tiles beyond the last whole block are left out.
    floor : float
        Added to the variance; positive.
    spread : `torch.Tensor`, shape (n_images,) or that of the grid of blocks, optional
        Standard deviation of the log-density offset shared by each image's tiles, or
        by each block's (default: none).
    pair_correlation : `torch.Tensor`, shape (n_images, tile_rows, tile_cols, 2), optional
        Correlation of each tile's count with its right and lower neighbour's (default:
        none).

    Returns
    -------
    `torch.Tensor`
        A scalar: the score averaged over the blocks and images, divided by the number
        of tiles in a block.

    Examples
    --------
    Sixteen tiles, each with one star or none at even odds (a block's count has mean 8
    and variance 4), and a true count of 8, then 16:

    >>> import torch
    >>> from starnet.training import block_count_score
    >>> probs = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(1, 4, 4, 4)
    >>> counts = torch.arange(16).reshape(1, 4, 4) % 2
    >>> round(16 * float(block_count_score(probs, counts, 4, floor=1e-9)), 4)   # log 4
    1.3863
    >>> round(16 * float(block_count_score(probs, counts * 0 + 1, 4, floor=1e-9)), 4)
    17.3863
    """
    if not floor > 0:
        raise ValueError(f"floor must be positive, got {floor!r}")
    kernel = (min(block, count_probs.shape[1]), min(block, count_probs.shape[2]))
    k = torch.arange(count_probs.shape[-1], dtype=count_probs.dtype, device=count_probs.device)
    mean = count_probs @ k
    variance = count_probs @ (k * k) - mean * mean

    def block_sums(x):
        return torch.nn.functional.avg_pool2d(x[:, None], kernel)[:, 0] * (kernel[0] * kernel[1])

    m, v = block_sums(mean), block_sums(variance)
    if spread is not None:
        spread = spread[:, None, None] if spread.ndim == 1 else spread
        v = v + (spread * v) ** 2
    if pair_correlation is not None:
        v = v + 2 * block_sums(_pair_covariances(variance, pair_correlation, kernel))
    n = block_sums(counts.to(mean.dtype))
    return ((n - m) ** 2 / (v + floor) + torch.log(v + floor)).mean() / (kernel[0] * kernel[1])


def block_spread(posterior, block):
    """The spread of the log-density offset of each square block of ``block`` tiles (as
    `block_count_score` cuts them), such that ``v + (spread v)**2`` is the variance of
    the block's count under ``posterior`` (``v``: the sum of its tiles' variances).

    The cells' offsets are independent, so a block gains ``(s_c v_c)**2`` from each cell
    ``c`` it overlaps (``s_c``: the cell's spread; ``v_c``: the variance of the block's
    tiles in it); a block inside one cell takes that cell's spread.

    Parameters
    ----------
    posterior : `~starnet.posterior.TiledPosterior`
        With a density spread.
    block : int
        Side of the blocks in tiles.

    Returns
    -------
    `torch.Tensor`, shape (n_images, block_rows, block_cols)
        0 for a block whose count is certain.
    """
    probs = posterior.count_probs
    n = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    variance = probs @ (n * n) - (probs @ n) ** 2
    rows, cols = variance.shape[1:]
    kernel = (min(block, rows), min(block, cols))
    shape = (rows // kernel[0], cols // kernel[1])
    cell = posterior.density_cells
    # a grid fine enough that each of its squares lies in one block and one cell
    fine = (math.gcd(kernel[0], cell), math.gcd(kernel[1], cell))
    area = variance[:, None, :shape[0] * kernel[0], :shape[1] * kernel[1]]
    sums = torch.nn.functional.avg_pool2d(area, fine)[:, 0] * (fine[0] * fine[1])
    spreads = posterior.cell_spread()
    r = torch.arange(sums.shape[1], device=sums.device) * fine[0]
    c = torch.arange(sums.shape[2], device=sums.device) * fine[1]
    # the index of each fine square's (block, cell) pair
    pair = (((r // kernel[0])[:, None] * shape[1] + (c // kernel[1])[None, :])
            * spreads[0].numel() + (r // cell)[:, None] * spreads.shape[2]
            + (c // cell)[None, :])
    by_pair = sums.new_zeros(sums.shape[0], shape[0] * shape[1] * spreads[0].numel())
    by_pair.index_add_(1, pair.reshape(-1), sums.reshape(sums.shape[0], -1))
    by_pair = by_pair.reshape(sums.shape[0], shape[0] * shape[1], -1)
    extra = ((spreads.reshape(sums.shape[0], 1, -1) * by_pair) ** 2).sum(-1)
    total = by_pair.sum(-1)
    spread = torch.where(total > 0, extra.clamp(min=1e-30).sqrt() / total.clamp(min=1e-30),
                         0.0)
    return spread.reshape(sums.shape[0], *shape)


def _pair_covariances(variance, pair_correlation, kernel):
    """Each tile's covariances with its right and lower neighbours (summed), where the
    neighbour lies in the same block of ``kernel`` tiles, shape (n, rows, cols)."""
    sd = (variance.clamp(min=0) + 1e-12).sqrt()     # finite gradients at a certain tile
    out = torch.zeros_like(variance)
    cols = torch.arange(variance.shape[2] - 1, device=variance.device)
    rows = torch.arange(variance.shape[1] - 1, device=variance.device)
    same_col_block = ((cols + 1) % kernel[1] != 0).to(variance.dtype)
    same_row_block = ((rows + 1) % kernel[0] != 0).to(variance.dtype)
    out[:, :, :-1] += pair_correlation[:, :, :-1, 0] * sd[:, :, :-1] * sd[:, :, 1:] \
        * same_col_block
    out[:, :-1, :] += pair_correlation[:, :-1, :, 1] * sd[:, :-1, :] * sd[:, 1:, :] \
        * same_row_block[:, None]
    return out


def _count_scores(posterior, counts, blocks, *, floor=0.25):
    """Sum of the `block_count_score` of ``counts`` for each side in ``blocks``, with the
    posterior's density spread and pair correlations where it has them."""
    return sum(block_count_score(posterior.count_probs, counts, block, floor=floor,
                                 spread=None if posterior.spread is None
                                 else block_spread(posterior, block),
                                 pair_correlation=None if posterior.pair_weights is None
                                 else side_correlations(posterior.pair_weights))
               for block in blocks)


def fit_density_spread(encoder, batches, *, n_steps=2000, batch_size=16, blocks=(16, 32),
                       learning_rate=3e-3, seed=0, progress=True):
    """Fit the spread head of ``encoder`` with the rest of it frozen.

    The spread head (`~starnet.encoder.StarNetEncoder` with ``density_cells``) is fitted
    by the `block_count_score` of the counts of blocks of ``blocks`` tiles (with the
    spread) on simulated images; every other weight is left as it is, so that what the
    encoder says about each tile does not change.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
        With ``density_cells``; its spread head is trained in place.
    batches : `SimulatedBatches`
        The generative model; images of one density cell each suit best.
    n_steps, batch_size : int
        Gradient steps, and images per step.
    blocks : tuple of int
        Sides in tiles of the scored blocks.
    learning_rate : float
        Adam's rate.
    seed : int
        Seed of the simulated images.
    progress : bool
        Show a progress bar.

    Returns
    -------
    history : `~astropy.table.QTable`
        One row per tenth of the steps: ``step``, ``score`` (mean over those steps),
        ``spread`` (mean of the cells' spreads over them) and ``seconds``.
    """
    if not encoder.density_cells:
        raise ValueError("this encoder has no density spread (build it with density_cells)")
    return _fit_count_head(encoder, encoder.spread_head, batches, "spread",
                           lambda q: q.cell_spread().mean().item(), n_steps=n_steps,
                           batch_size=batch_size, blocks=blocks, floor=0.25,
                           learning_rate=learning_rate, seed=seed, progress=progress)


def fit_pair_correlations(encoder, batches, *, n_steps=2000, batch_size=16,
                          blocks=(4, 8, 16, 32), floor=0.01, learning_rate=3e-3, seed=0,
                          progress=True):
    """Fit the pair-correlation head of ``encoder`` with the rest of it frozen.

    The head (`~starnet.encoder.StarNetEncoder` with ``pair_correlations``) is fitted by
    the `block_count_score` of the counts of blocks of ``blocks`` tiles (with the
    density spread, if any, and the pair covariances inside each block) on simulated
    images; every other weight is left as it is, so that each tile's posterior does not
    change. The score is lowest at a block variance ``floor`` below the true one, so
    the ``floor`` is much smaller than the spread's: with 0.05 and blocks from 2 tiles
    the correlations came out too strong (intervals too narrow at 0.01-0.04 stars per
    pixel; docs/calibration.rst).

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
        With ``pair_correlations``; its pair head is trained in place.
    batches : `SimulatedBatches`
        The generative model.
    n_steps, batch_size : int
        Gradient steps, and images per step.
    blocks : tuple of int
        Sides in tiles of the scored blocks.
    floor : float
        Added to the blocks' variances (`block_count_score`).
    learning_rate : float
        Adam's rate.
    seed : int
        Seed of the simulated images.
    progress : bool
        Show a progress bar.

    Returns
    -------
    history : `~astropy.table.QTable`
        One row per tenth of the steps: ``step``, ``score`` (mean over those steps),
        ``correlation`` (the side pairs' covariances over the tiles' variances, summed
        over the images) and ``seconds``.
    """
    if not encoder.pair_correlations:
        raise ValueError("this encoder has no pair-correlation head (build it with "
                         "pair_correlations=True)")

    def weighted_correlation(posterior):
        variance = posterior.count_variance
        covariance = _pair_covariances(variance, side_correlations(posterior.pair_weights),
                                       variance.shape[1:])
        return float(covariance.sum() / variance.sum().clamp(min=1e-12))

    return _fit_count_head(encoder, encoder.pair_head, batches, "correlation",
                           weighted_correlation, n_steps=n_steps, batch_size=batch_size,
                           blocks=blocks, floor=floor, learning_rate=learning_rate,
                           seed=seed, progress=progress)


def _fit_count_head(encoder, head, batches, name, summary, *, n_steps, batch_size, blocks,
                    floor, learning_rate, seed, progress):
    """Fit ``head`` of ``encoder`` (all other weights frozen) by the block count scores;
    ``summary(posterior)`` is recorded as column ``name`` of the history."""
    n_steps = check_positive_int(n_steps, "n_steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    grid = TileGrid(tile_size=encoder.tile_size, max_sources=encoder.max_sources)
    fitted = {id(p) for p in head.parameters()}
    trainable = [(p, p.requires_grad) for p in encoder.parameters()]
    for parameter, _ in trainable:
        parameter.requires_grad_(id(parameter) in fitted)
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(_seed_int(seed))
    encoder.eval()
    history, scores, summaries, started = [], [], [], time.perf_counter()
    report_every = max(n_steps // 10, 1)
    try:
        for step in progress_bar(range(1, n_steps + 1), enabled=progress):
            batch = batches.draw_batch(batch_size, generator=generator)
            tiles = grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes,
                                  batch.catalogs.mask, batch.images.shape[-2:])
            with torch.no_grad():
                features = encoder.tile_layers(encoder.features(
                    batch.images, batch.background, **batch.encoder_inputs(encoder)))
            posterior = encoder._to_posterior(encoder._heads(features))
            score = _count_scores(posterior, tiles.counts, blocks, floor=floor)
            optimizer.zero_grad()
            score.backward()
            optimizer.step()
            scores.append(score.item())
            with torch.no_grad():
                summaries.append(summary(posterior))
            if step % report_every == 0 or step == n_steps:
                history.append({"step": step, "score": float(np.mean(scores)),
                                name: float(np.mean(summaries)),
                                "seconds": time.perf_counter() - started})
                scores, summaries = [], []
    finally:
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
    return QTable(rows=history, names=["step", "score", name, "seconds"])


def _training_loss(encoder, batch, tiles, generator, settings, dtype=torch.float32):
    """Mean of ``-log q`` over the tiles that are scored in this step, plus
    ``settings.count_score_weight`` times the `block_count_score` of each of
    ``settings.count_blocks`` (independent tiles only).

    With a checkerboard encoder each image draws a colour ``c``; the true catalogs of
    tiles of colours below ``c`` are shown to the encoder (teacher forcing) and the
    other tiles are scored. The decided set never depends on the truth, so every
    conditional ``q(z_t | x, z_decided)`` is fitted by the forward KL.

    The network runs with its convolutions in ``dtype`` (`starnet.devices.autocast`:
    bfloat16 keeps the first convolution, the context branch and the heads in float32);
    the loss is float32.
    """
    with autocast(dtype, batch.images.device):
        features = encoder.features(batch.images, batch.background,
                                    **batch.encoder_inputs(encoder))
    if encoder.n_colors == 1:
        with autocast(dtype, batch.images.device):
            posterior = encoder.tile_posterior(features)
        loss = -posterior.log_prob(tiles).mean()
        if settings.count_score_weight:
            loss = loss + settings.count_score_weight * _count_scores(
                posterior, tiles.counts, settings.count_blocks)
        return loss
    first = torch.randint(encoder.n_colors, (batch.images.shape[0], 1, 1), generator=generator,
                          device=generator.device)
    decided = encoder.tile_colors(features.shape[-2:], features.device)[None] \
        < first.to(features.device)
    conditioning = conditioning_map(tiles, decided, encoder.log_flux_offset)
    with autocast(dtype, batch.images.device):
        posterior = encoder.tile_posterior(features, conditioning)
    log_prob = posterior.log_prob(tiles)
    scored = ~decided
    return -(log_prob * scored).sum() / scored.sum()


def _pooled_f1(estimates, validation, bands):
    """F1 of catalogs (one table per validation image) against the validation truth,
    over all their stars inside the images."""
    catalogs = validation.catalogs
    truth_mask = catalogs.mask & inside_image(catalogs.locs, validation.images.shape[-2:])
    matched_true = matched_est = n_true = n_est = 0
    for i, estimate in enumerate(estimates):
        truth = batch_to_table(catalogs, i, bands, mask=truth_mask[i])
        match = match_catalogs(estimate, truth, band=bands[0])
        matched_true += match.n_matched_true
        matched_est += match.n_matched_estimated
        n_true += match.n_true
        n_est += match.n_estimated
    tpr = matched_true / max(n_true, 1)
    ppv = matched_est / max(n_est, 1)
    return (2 * tpr * ppv / (tpr + ppv) if tpr + ppv > 0 else 0.0), tpr, ppv


def _baseline_f1(baseline, validation, bands):
    """F1 of ``baseline`` on the validation images (see `train_encoder`)."""
    images = validation.images.numpy().astype(float)
    background = validation.background.numpy()
    estimates = [baseline(images[i], background[i].reshape(len(bands), -1).mean(axis=1))
                 for i in range(len(images))]
    return _pooled_f1(estimates, validation, bands)[0]


@torch.no_grad()
def _validate(encoder, grid, validation, inputs, bands):
    """Validation loss and detection F1 of the modal catalogs against the truth
    (``validation``), the encoder reading ``inputs`` (the same batch on its device)."""
    encoder.eval()
    images, catalogs = validation.images, validation.catalogs
    tiles = grid.to_tiles(catalogs.locs, catalogs.fluxes, catalogs.mask, images.shape[-2:])
    features = encoder.features(inputs.images, inputs.background,
                                **inputs.encoder_inputs(encoder))
    loss = -encoder.joint_log_prob(features, tiles.to(features.device)).mean().item()
    _, mode = encoder.decide(features, lambda q: q.mode())
    locs, fluxes, mask = grid.from_tiles(mode.to("cpu"))
    mask = mask & inside_image(locs, images.shape[-2:])
    f1, tpr, ppv = _pooled_f1([catalog_table(locs[i][mask[i]], fluxes[i][mask[i]], bands)
                               for i in range(images.shape[0])], validation, bands)
    encoder.train()
    return {"val_loss": loss, "val_f1": f1, "val_tpr": tpr, "val_ppv": ppv,
            **_count_calibration(encoder, features, tiles)}


def _count_calibration(encoder, features, tiles):
    """Relative bias of the posterior mean number of stars in the validation images, and
    the fraction of them whose 90 % interval holds the true (tiled) number; NaN for a
    checkerboard model, whose count pmf is not that of independent tiles."""
    if encoder.n_colors != 1:
        return {"val_count_bias": float("nan"), "val_coverage": float("nan")}
    posterior = encoder.tile_posterior(features).to("cpu")
    posterior.count_tail = False    # the truth of training tiles stops at max_sources too
    pmfs = [posterior.image(i).count_pmf() for i in range(features.shape[0])]
    return count_calibration(pmfs, tiles.counts.sum(dim=(1, 2)).numpy())


def count_calibration(pmfs, true):
    """Bias and 90 % coverage of count posteriors.

    Parameters
    ----------
    pmfs : sequence of `numpy.ndarray`
        Each image's count pmf (``pmf[k]`` = q(N = k)), such as
        `starnet.posterior.TiledPosterior.count_pmf`'s.
    true : `numpy.ndarray` of int, shape (n_images,)
        The true number of stars of each image.

    Returns
    -------
    dict
        ``val_count_bias``: (sum of the posterior means - sum of ``true``) / sum of
        ``true``; ``val_coverage``: the fraction of images whose 90 % interval (5 to
        95 % quantiles) holds ``true``.

    Examples
    --------
    >>> import numpy as np
    >>> from starnet.posterior import count_distribution
    >>> from starnet.training import count_calibration
    >>> pmf = count_distribution(np.tile([0.5, 0.5], (100, 1)))    # 50 stars expected
    >>> calibration = count_calibration([pmf], np.array([50]))
    >>> abs(calibration["val_count_bias"]) < 1e-9, calibration["val_coverage"]
    (True, 1.0)
    >>> count_calibration([pmf], np.array([70]))["val_coverage"]    # 50 +- 5
    0.0
    """
    means, covered = [], []
    for pmf, n in zip(pmfs, true):
        if np.ndim(pmf) != 1:
            raise ValueError(f"count_calibration takes one count pmf per image (1-D), got an "
                             f"array of shape {np.shape(pmf)}")
        cdf = np.cumsum(pmf)
        means.append(np.dot(np.arange(len(pmf)), pmf))
        covered.append(np.searchsorted(cdf, 0.05) <= n <= np.searchsorted(cdf, 0.95))
    return {"val_count_bias": float((np.sum(means) - true.sum()) / max(true.sum(), 1)),
            "val_coverage": float(np.mean(covered))}
