"""The settings of a forward-KL fit (`starnet.training.train_encoder`), kept apart from
the training loop so that model files and checkpoints can check them without importing
it."""

from dataclasses import dataclass, asdict

from .validation import check_training_settings

__all__ = ["TrainingSettings"]


@dataclass
class TrainingSettings:
    """Settings of a forward-KL fit.

    Attributes
    ----------
    image_shape : tuple of int
        ``(rows, cols)`` of the simulated training images.
    batch_size : int
        Images per gradient step.
    batches_per_epoch : int
        Gradient steps per epoch.
    n_epochs : int
        Number of epochs (validation, history row and checkpoint after each).
    n_steps : int or None
        Gradient steps of the whole fit; when given, it replaces ``n_epochs *
        batches_per_epoch`` (the last epoch may be shorter).
    max_time : float or None
        Seconds of training (validation included); the fit ends after the step that
        passes it, and the learning rate decays over whichever of the steps and the time
        runs out first. A resumed fit counts the time of the epochs it resumes; given a
        larger budget, its rate continues the decay from where it stopped.
    learning_rate, weight_decay : float
        Settings of Adam with decoupled weight decay (`torch.optim.AdamW`; the reference
        M2 code used Adam with L2 decay, 1e-3 and 1e-5, which drives the weights of dead
        units into the denormal range, where a CPU is 100 times slower: see
        `starnet.denormals`). When training resumes from a checkpoint, the optimiser's
        state is restored but these settings are used.
    final_learning_rate : float or None
        The rate decays by a cosine (`cosine_rate`), step by step, from
        ``learning_rate`` to this at the end of the fit. On the M2 model the decay took
        the 90 % count coverage from 0.41 to 0.93 (docs/calibration.rst). ``None``
        keeps the rate constant.
    margin : float
        Stars are simulated this many pixels beyond the image edges too, so the encoder
        learns what light from outside looks like at the edges.
    n_validation : int
        Images of the fixed simulated validation set, scored at the end of each epoch.
    background_range : tuple of float
        Each training image's background is the model's background times a factor drawn
        uniformly from this range (``(1, 1)``: exactly the model's background). A range
        teaches the encoder to read the background from its input, so that the
        background of an image can be fitted after training (see
        `starnet.background.fit_background`).
    psf_variant_range : tuple of float
        With PSF variants (``StarNetDeblender.psf_variants``), each training image's
        star light, band by band, is ``R_0 + sum_k t_k (R_k - R_0)`` where ``R_0`` is
        rendered with the model's PSF, ``R_k`` with variant ``k`` and ``t_k`` is drawn
        uniformly from this range: the encoder learns to read stars through any PSF
        between them, so that a PSF error of that size is not taken for stars.
    density_range : tuple of float or None
        ``None``: every training image has the prior's ``mu`` stars per pixel. A range
        ``(low, high)``: each image's density is drawn log-uniformly from it, so that
        the encoder reads the local density from the pixels (as it reads the
        background) and a sparse field is not catalogued as if it were crowded.
    density_gradient : float
        0 (the default): each training image's density is uniform. Otherwise the
        largest change of the natural log of the density across an image's width: the
        density varies as ``exp(g . (x - centre))`` along a random direction, with
        ``|g| cols`` uniform from 0 to this and the image's mean density kept, so that
        an encoder with a context branch reads the density at each tile rather than
        the mean of its window (a cluster's core and outskirts).
    f_max_range, alpha_range : tuple of float or None
        ``None``: every training image's fluxes follow the prior's ``f_max`` and
        ``alpha``. Ranges: each image draws its upper flux (log-uniformly) and Pareto
        index (uniformly) from them, and an encoder that reads the prior
        (``reads_prior=True``) is told them, so that it learns to read any prior of
        that family (a model fitted with ranges warns when asked to read a prior
        outside them).
    count_score_weight : float
        Weight of a score of the star counts of blocks of tiles added to the forward KL
        (`block_count_score`): 0 (the default) fits the tiles alone. The tiles' forward
        KL makes each tile's count right on average over the training images, not the
        sum over a region under a given PSF and prior; the score rewards the posterior
        mean and variance of each block's count for matching the truth. Independent
        tiles only (``n_colors=1``).
    count_blocks : tuple of int
        Sides, in tiles, of the square blocks the count score is taken over (cut to the
        image: a side as large as the image scores the whole image).
    average_steps : int
        0 (the default): the fit ends with the weights of its last step. Otherwise the
        weights it validates and returns are an exponential moving average of the
        trained weights over about this many steps (their plain mean while fewer steps
        have been taken). Adam's steps make the network's count jitter from step to
        step, by a few per cent of the stars of an image even at small rates; the
        average takes the middle of that jitter instead of wherever the last step left
        it. May be changed when a fit resumes (the average then starts from the
        weights it resumes with).
    seed : int
        Seed of the training images and of the validation set (the network's initial
        weights are seeded by `~starnet.StarNetDeblender`).
    """

    image_shape: tuple = (64, 64)
    batch_size: int = 16
    batches_per_epoch: int = 50
    n_epochs: int = 10
    n_steps: int = None
    max_time: float = None
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    final_learning_rate: float = 1e-5
    margin: float = 6.0
    n_validation: int = 8
    background_range: tuple = (1.0, 1.0)
    psf_variant_range: tuple = (0.0, 0.0)
    density_range: tuple = None
    f_max_range: tuple = None
    alpha_range: tuple = None
    # A field added later must default to what fits did before it existed: checkpoints
    # written before it resume with its default (`starnet.model_files`).
    count_score_weight: float = 0.0
    count_blocks: tuple = (8, 32)
    average_steps: int = 0
    density_gradient: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in _PAIRS:                 # lists, as read back from JSON
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        check_training_settings(self)
        self.count_blocks = tuple(int(side) for side in self.count_blocks)
        self.count_score_weight = float(self.count_score_weight)
        self.density_gradient = float(self.density_gradient)

    def to_dict(self):
        """The settings as JSON-ready values (lists for tuples); ``TrainingSettings(**d)``
        reads them back."""
        settings = asdict(self)
        for name in _PAIRS:
            if settings[name] is not None:
                settings[name] = list(settings[name])
        return settings


#: The fields that hold tuples.
_PAIRS = ("image_shape", "background_range", "psf_variant_range", "density_range",
          "f_max_range", "alpha_range", "count_blocks")
