"""StarNetDeblender: catalogs with posterior uncertainties from images of crowded star fields."""

import contextlib
import dataclasses
import functools
import warnings

import numpy as np
import torch
from astropy import units as u
from astropy.nddata import NDData
from astropy.utils.decorators import deprecated_renamed_argument
from photutils.utils import NoDetectionsWarning

from .baselines import daophot_catalog
from .background import BackgroundEncoder, choose_background, train_background_encoder
from .catalogs import modal_table, samples_table
from .defects import FrameDefects
from .devices import as_device, as_precision, on_device
from .encoder import StarNetEncoder
from .grid_consensus import consensus_catalog
from .images import as_background, image_psfs, read_image
from .inference import chunk_tiles, count_pmfs, draw_catalogs, modal_catalog, prepare_image
from .model_files import describe_model, read_model
from .model_io import (bundled_model_path, bundled_models, deblender_arguments, model_path,
                       restore_deblender, write_deblender)
from .prior import PRIOR_FEATURES, StarFieldPrior, _seed_int
from .psf import as_psf, choose_stamp_size, psf_fwhm, psf_to_dict, stamp_light
from .psf_family import DESCRIPTOR_SIZE, PSFBank
from .simulate import StarFieldRenderer
from .tiles import TileGrid, choose_tile_size
from .training import (SimulatedBatches, TrainingSettings, fit_density_spread,
                       fit_pair_correlations, train_encoder)
from .threads import choose_threads, torch_threads
from .validation import check_draws_memory, check_image_meta, check_positive_int

__all__ = ["StarNetDeblender"]


class StarNetDeblender:
    """Probabilistic cataloger of crowded star fields (StarNet).

    A convolutional encoder maps an image to a variational posterior over catalogs,
    tile by tile. It is fitted by the expected forward KL on images simulated from the
    generative model (prior, PSF, background): see `fit`. Calling the deblender on an
    image returns its modal catalog; `sample` draws whole catalogs from the posterior.

    Parameters
    ----------
    prior : `~starnet.StarFieldPrior`
        Prior over catalogs; its band names are the bands the model expects.
    psf : PSF or list of PSF
        One PSF per band (or one for all bands).
    background : float or sequence of float
        Background per band in electrons per pixel, used to simulate training images.
    tile_size : int, optional
        Side of a tile in pixels (paper for M2: 2). Default: from the narrowest PSF's
        FWHM and the prior's density (`starnet.tiles.choose_tile_size`: tiles no wider
        than the PSF that hold at most half a star on average).
    max_sources : int, optional
        Largest number of stars per tile (paper: 3).
    stamp_size : int, optional
        Width of the PSF stamp used to render training images; the light beyond it is
        put inside it. Default: the smallest odd width from 25 to 41 pixels that holds
        99.5 % of every band's light (`starnet.psf.choose_stamp_size`). A stamp that
        holds less than 99 % is reported by a warning when the model is fitted.
    hidden, tile_hidden : int, optional
        Width of the encoder (channels at pixel and at tile resolution).
    n_colors : {1, 2, 4}, optional
        Checkerboard colours: 1 gives the paper's independent tiles; 2 or 4 decide the
        tiles colour by colour, each seeing its decided neighbours, which removes the
        double counting of stars on tile boundaries (see
        `~starnet.encoder.StarNetEncoder`).
    reads_psf : bool, optional
        The encoder reads the image's PSFs (``meta['psf']``, a
        `~photutils.psf.GriddedPSFModel` where the PSF varies over the image) through
        their descriptors (`starnet.psf_family`), so that one model serves any PSF of
        its training family; ``psf`` is then the PSF it is trained with by `fit`.
    reads_mask : bool, optional
        The encoder reads the mask of missing pixels (masked, non-finite or saturated:
        ``meta['saturation']``), so that they widen the posterior instead of reading
        as empty sky; `fit` then adds saturated stars, bad columns, cosmic rays and
        edges to the training images (`starnet.defects.FrameDefects`).
    reads_prior : bool, optional
        The encoder is told the upper flux and Pareto index of ``prior``
        (`starnet.prior.prior_descriptor`), so that one model counts the faint stars of a
        crowded field under the flux distribution a user declares: change ``prior``
        (within the family the model was trained over) and the posterior follows.
    context_cells : int, optional
        Side in tiles of the cells of the encoder's context branch, which tells each
        tile the density of stars around it (0: none; see
        `~starnet.encoder.StarNetEncoder`).
    density_cells : int, optional
        Side in tiles of the cells whose tiles share an unknown log-density offset, whose
        spread a head of the encoder learns (0: independent tiles): the count intervals
        of crowded regions then hold the uncertainty of the density that the tiles read
        from the same light (`~starnet.posterior.TiledPosterior`). `fit` trains it with
        the block count score; `fit_density_spread` adds it to a trained model.
    pair_correlations : bool, optional
        A head of the encoder gives the correlation of each tile's count with its
        neighbours' (a star on a tile boundary is claimed in part by both), by which the
        count posterior of a region is narrowed (`~starnet.posterior.contract_counts`);
        `fit_pair_correlations` adds it to a trained model.
    count_tail : bool, optional
        Count a tile's top count as ``max_sources`` or more in the count posterior, the
        stars beyond following a Poisson tail at the density of the tile's density cell
        (`~starnet.posterior.poisson_tail`; needs ``density_cells``): crowded tiles hold
        more stars than the catalog can place. It adds no weights: set
        ``deblender.encoder.count_tail`` on a trained model.
    seed : int, optional
        Seed of the encoder's initial weights.

    Examples
    --------
    >>> from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
    >>> psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    >>> prior = StarFieldPrior(mu=0.02, bands=["r"])
    >>> deblender = StarNetDeblender(prior=prior, psf=psf, background=[686.0])
    >>> history = deblender.fit(n_epochs=1, batches_per_epoch=2, batch_size=2,
    ...                         image_shape=(24, 24), progress=False)
    >>> image, truth = simulate_starfield((24, 24), prior=prior, psf=psf,
    ...                                   background=686.0, seed=2)
    >>> catalog = deblender(image)
    >>> catalog.colnames[:5]
    ['id', 'x_fit', 'y_fit', 'x_err', 'y_err']
    """

    def __init__(self, *, prior, psf, background, tile_size=None, max_sources=3,
                 stamp_size=None,
                 hidden=32, tile_hidden=128, n_colors=1, reads_psf=False, reads_mask=False,
                 reads_prior=False, context_cells=0, density_cells=0,
                 pair_correlations=False, count_tail=False, seed=0):
        self.prior = prior
        psfs = list(psf) if isinstance(psf, (list, tuple)) else [psf] * prior.n_bands
        if len(psfs) != prior.n_bands:
            raise ValueError(f"got {len(psfs)} PSFs for the {prior.n_bands} bands {prior.bands}")
        self.psfs = [as_psf(p) for p in psfs]
        for p in self.psfs:   # a model that cannot be saved is refused before training
            psf_to_dict(p)
        background = as_background(background, prior.n_bands)
        if background.ndim != 1:
            raise ValueError("the training background must be one value per band; "
                             "images may carry background maps")
        self.background = background
        if tile_size is None:
            tile_size = choose_tile_size(min(psf_fwhm(p) for p in self.psfs), prior.mu)
        self.grid = TileGrid(tile_size=tile_size, max_sources=max_sources)
        if stamp_size is None:
            stamp_size = choose_stamp_size(self.psfs, largest=41)
        self.stamp_size = int(stamp_size)
        with torch.random.fork_rng():
            torch.manual_seed(_seed_int(seed))
            self.encoder = StarNetEncoder(n_bands=prior.n_bands, tile_size=tile_size,
                                          max_sources=max_sources, hidden=hidden,
                                          tile_hidden=tile_hidden, n_colors=n_colors,
                                          mask_channel=reads_mask,
                                          psf_features=DESCRIPTOR_SIZE if reads_psf else 0,
                                          prior_features=PRIOR_FEATURES if reads_prior else 0,
                                          context_cells=context_cells,
                                          density_cells=density_cells,
                                          pair_correlations=pair_correlations,
                                          count_tail=count_tail)
        self.encoder.eval()
        self.training_settings = None
        self.training_history = None
        #: `~starnet.background.BackgroundEncoder` behind `~starnet.background.fit_background`
        #: (see `fit_background_encoder`), or None.
        self.background_encoder = None
        self.background_history = None
        #: Other PSFs (each a list of one PSF per band) between which training images
        #: are rendered, with ``psf_variant_range`` of the training settings (see
        #: `~starnet.training.TrainingSettings`), so that the model tolerates a PSF
        #: error of that size.
        self.psf_variants = []
        #: Free-form record saved with the model (e.g. the command that trained it).
        self.provenance = {}
        #: Images larger than this many pixels on a side are encoded in square chunks of
        #: this size (with a halo, so the result is the same), to bound memory.
        self.chunk_size = 256
        #: Posterior draws behind the star-count summary of a checkerboard model.
        self.n_count_samples = 200
        self._cached_renderer = None
        self._cached_fwhm = None

    @classmethod
    def from_nddata(cls, nddata, *, prior=None, **kwargs):
        """A deblender for images like ``nddata``: bands, PSFs and background from it.

        The new deblender is untrained: `fit` trains it on images simulated from the
        prior, the image's PSFs and its background.

        Parameters
        ----------
        nddata : `~astropy.nddata.NDData`
            An image of the kind to catalog, as `__call__` takes it; a background map is
            reduced to its median per band for training (in electrons, as
            `starnet.images.read_image` reads it).
        prior : `~starnet.StarFieldPrior`, optional
            Prior over catalogs, in the image's bands; by default the paper's M2 prior
            (`starnet.prior_estimate.estimate_prior` fits one to the image).
        **kwargs
            Further arguments of `StarNetDeblender` (``tile_size``, ``max_sources``,
            ``seed`` ...).

        Returns
        -------
        deblender : `StarNetDeblender`

        Examples
        --------
        >>> from starnet import PowerLawPSF, StarNetDeblender, simulate_starfield
        >>> psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
        >>> image, _ = simulate_starfield((32, 32), psf=psf, background=[686.0, 1123.0],
        ...                               seed=0)
        >>> deblender = StarNetDeblender.from_nddata(image, max_sources=2)
        >>> print(deblender.bands, deblender.background, deblender.grid.max_sources)
        ['r', 'i'] [ 686. 1123.] 2
        """
        meta = check_image_meta(nddata)
        prior = StarFieldPrior(bands=meta["bands"]) if prior is None else prior
        if list(prior.bands) != list(meta["bands"]):
            raise ValueError(f"the prior's bands {prior.bands} differ from the image's "
                             f"bands {meta['bands']}")
        background = read_image(nddata, prior.bands).background
        background = np.median(background.reshape(prior.n_bands, -1), axis=1)
        return cls(prior=prior, psf=image_psfs(nddata, prior.n_bands),
                   background=background.astype(float), **kwargs)

    @property
    def bands(self):
        """Band names the model expects, in order."""
        return list(self.prior.bands)

    # ------------------------------------------------------------------ training
    def fit(self, *, settings=None, checkpoint=None, progress=True, threads=None,
            device=None, precision=None, compare_photutils=True, **kwargs):
        """Fit the encoder by the expected forward KL on images simulated from the model.

        The learning rate decays by a cosine from ``learning_rate`` to
        ``final_learning_rate`` over the fit's budget: ``n_epochs`` (of
        ``batches_per_epoch`` steps), ``n_steps`` or ``max_time`` seconds, whichever
        runs out first (see `~starnet.training.TrainingSettings`).

        Parameters
        ----------
        settings : `~starnet.training.TrainingSettings`, optional
            All training settings; keyword arguments override single fields
            (e.g. ``max_time=600`` for ten minutes, ``n_steps=2000``).
        checkpoint : str or path, optional
            Written (atomically) every epoch; training resumes from it when it exists.
            It records the model and the settings, and refuses to resume another
            model or other settings: only the budget (``n_epochs``, ``n_steps``,
            ``max_time``) and the rates (``learning_rate``, ``final_learning_rate``,
            ``weight_decay``) may change.
        progress : bool, optional
            Show a progress bar.
        threads : int, optional
            CPU threads of torch; default: the cores other processes leave free when
            the fit starts (`starnet.threads.choose_threads`: on a 2-core machine with
            one core busy, one thread trains faster than two).
        device : str or `torch.device`, optional
            Where the network trains: ``'cpu'`` (the default), ``'cuda'`` for a GPU
            (an error where torch sees none) or ``'auto'``. The images are simulated on
            the CPU; the trained encoder is back on the CPU at the end, and a
            checkpoint written on a GPU resumes on a CPU and the other way round.
        precision : {None, 'float32', 'bfloat16'}, optional
            Of the network's convolutions in the training steps (the default: float32).
            ``'bfloat16'`` trains faster where the hardware computes in bfloat16 (CPUs
            with AMX or AVX512-BF16, recent GPUs; it warns elsewhere, where it is
            slower), with the weights, the loss and the validation in float32 and the
            same layers kept in float32 as in a ``precision='bfloat16'`` call
            (:ref:`bfloat16`).
        compare_photutils : bool, optional
            Catalog the validation images with photutils' DAOPHOT-like pipeline
            (`starnet.baselines.daophot_catalog`, detection thresholds of 3 and 8 sky
            sigmas) once, and report the better F1 beside the model's (the
            ``baseline_f1`` column; a fit that ends below it warns). Only for models
            that are told neither the PSF nor a mask.

        Returns
        -------
        history : `~astropy.table.QTable`
            Loss, validation F1 (and photutils' on the same images), count calibration,
            throughput, steps and rate per epoch (also kept as ``training_history``).

        Examples
        --------
        Two minutes of training, in epochs of 50 steps (``deblender`` as in the class
        example)::

            history = deblender.fit(max_time=120, n_epochs=1000, checkpoint="fit.ckpt")
            print(history["seconds"].sum(), history["val_f1"][-1])
        """
        # a missing GPU or an unknown precision fails before anything is simulated
        dtype = as_precision(precision, as_device(device))
        settings = settings or TrainingSettings()
        unknown = [key for key in kwargs if not hasattr(settings, key)]
        if unknown:
            raise TypeError(f"unknown training settings {unknown}")
        settings = dataclasses.replace(settings, **kwargs)
        if self.encoder.density_cells and not settings.count_score_weight:
            warnings.warn("this encoder has a density spread, which only the block count "
                          "score trains: with count_score_weight=0 it keeps its initial "
                          "value (set count_score_weight, or use fit_density_spread)",
                          UserWarning)
        if self.encoder.pair_correlations:
            warnings.warn("this encoder has pair correlations, which fit trains only through "
                          "the block count score at its floor of 0.25, too strong for them: fit "
                          "them afterwards with fit_pair_correlations", UserWarning)
        _check_stamp_light(self.psfs, self.stamp_size, self.bands)
        batches = self._batches(settings.image_shape, settings)
        baselines = []
        if compare_photutils and not (self.encoder.psf_features or self.encoder.mask_channel):
            baselines = [functools.partial(self._photutils_catalog, threshold=threshold)
                         for threshold in (3.0, 8.0)]
        with torch_threads(choose_threads(threads)):
            history = train_encoder(self.encoder, batches, settings, checkpoint=checkpoint,
                                    model_description=describe_model(self),
                                    progress=progress, baselines=baselines, device=device,
                                    dtype=dtype)
        self.training_settings = settings
        self.training_history = history
        return history

    def _photutils_catalog(self, data, background, *, threshold):
        """photutils' DAOPHOT-like catalog of one image (arrays in electrons) of this
        model's bands, PSFs and ``background`` (one value per band), detected above
        ``threshold`` sky sigmas."""
        image = NDData(data, unit=u.electron, meta={"bands": self.bands, "psf": self.psfs,
                                                    "background": list(background)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoDetectionsWarning)
            return daophot_catalog(image, band=self.bands[0], threshold=threshold)

    def fit_background_encoder(self, *, n_steps=2000, batch_size=16, image_shape=(64, 64),
                               seed=0, progress=True, **kwargs):
        """Fit the network that estimates an image's background factor from its pixels.

        Images are simulated as for `fit`, with backgrounds scaled by factors drawn from
        the ``background_range`` of the training settings (so `fit` comes first, with a
        range).

        Parameters
        ----------
        n_steps, batch_size : int, optional
            Gradient steps, and simulated images per step.
        image_shape : tuple of int, optional
            ``(rows, cols)`` of the simulated images.
        seed : int, optional
            Seed of the network's initial weights and of the images.
        progress : bool, optional
            Show a progress bar.
        **kwargs
            Further arguments of `~starnet.background.train_background_encoder`.

        Returns
        -------
        history : `~astropy.table.QTable`
            Loss against step (also kept as ``background_history``).
        """
        check_positive_int(n_steps, "n_steps")    # before an untrained encoder is attached
        check_positive_int(batch_size, "batch_size")
        settings = self.training_settings
        if settings is None or not settings.background_range[0] < settings.background_range[1]:
            raise ValueError("the background can be estimated only by a model trained over a "
                             "range of backgrounds: fit(background_range=(low, high)) first")
        batches = self._batches(image_shape, settings)
        if self.background_encoder is None:
            with torch.random.fork_rng():
                torch.manual_seed(_seed_int(seed))
                self.background_encoder = BackgroundEncoder(n_bands=self.prior.n_bands)
        self.background_history = train_background_encoder(
            self.background_encoder, batches, n_steps=n_steps, batch_size=batch_size,
            seed=seed, progress=progress, **kwargs)
        return self.background_history

    def fit_density_spread(self, *, density_cells=32, n_steps=2000, batch_size=16, seed=0,
                           progress=True, **kwargs):
        """Give a trained encoder a density spread, fitted with the rest of it frozen.

        The encoder is rebuilt with ``density_cells`` (its weights kept) and only the
        spread head is trained, by `~starnet.training.fit_density_spread` on images of
        one cell simulated as for `fit` (its training settings), so that what the model
        says about each tile is unchanged and its count intervals widen by the
        uncertainty of the density that a cell's tiles share.

        Parameters
        ----------
        density_cells : int, optional
            Side in tiles of the cells that share a log-density offset.
        n_steps, batch_size : int, optional
            Gradient steps, and simulated images per step.
        seed : int, optional
            Seed of the simulated images.
        progress : bool, optional
            Show a progress bar.
        **kwargs
            Further arguments of `~starnet.training.fit_density_spread`.

        Returns
        -------
        history : `~astropy.table.QTable`
            Score and mean spread against step.
        """
        check_positive_int(density_cells, "density_cells")
        encoder, settings = self._with_new_head("fit_density_spread", "spread_head",
                                                density_cells=density_cells)
        side = density_cells * self.grid.tile_size
        batches = self._batches((side, side), settings)
        history = fit_density_spread(encoder, batches, n_steps=n_steps, batch_size=batch_size,
                                     seed=seed, progress=progress, **kwargs)
        self.encoder = encoder.eval()
        return history

    def fit_pair_correlations(self, *, image_side=64, n_steps=2000, batch_size=16, seed=0,
                              progress=True, **kwargs):
        """Give a trained encoder pair correlations, fitted with the rest of it frozen.

        The encoder is rebuilt with ``pair_correlations`` (its weights kept) and only the
        pair head is trained, by `~starnet.training.fit_pair_correlations` on images
        simulated as for `fit` (its training settings): each tile's posterior is
        unchanged, and the count posterior of a region narrows by the anticorrelation
        of neighbouring tiles that share a star on their boundary.

        Parameters
        ----------
        image_side : int, optional
            Side in pixels of the simulated images.
        n_steps, batch_size : int, optional
            Gradient steps, and simulated images per step.
        seed : int, optional
            Seed of the simulated images.
        progress : bool, optional
            Show a progress bar.
        **kwargs
            Further arguments of `~starnet.training.fit_pair_correlations`.

        Returns
        -------
        history : `~astropy.table.QTable`
            Score and mean correlation against step.
        """
        check_positive_int(image_side, "image_side")
        encoder, settings = self._with_new_head("fit_pair_correlations", "pair_head",
                                                pair_correlations=True)
        batches = self._batches((image_side, image_side), settings)
        history = fit_pair_correlations(encoder, batches, n_steps=n_steps,
                                        batch_size=batch_size, seed=seed, progress=progress,
                                        **kwargs)
        self.encoder = encoder.eval()
        return history

    def _with_new_head(self, method, head, **change):
        """A copy of the encoder with ``change`` to its architecture, which adds the
        module ``head`` (its other weights kept), and the training settings."""
        settings = self.training_settings
        if settings is None:
            raise ValueError(f"{method} needs a trained model (fit first): the head is "
                             "fitted on the frozen network with its training settings")
        encoder = StarNetEncoder(**dict(self.encoder.config(), **change))
        missing, unexpected = encoder.load_state_dict(self.encoder.state_dict(), strict=False)
        if unexpected or any(not name.startswith(head + ".") for name in missing):
            raise ValueError(f"cannot add {head} to this encoder: only the {head}.* weights "
                             f"may be new (missing {missing}, unexpected {unexpected})")
        return encoder, settings

    def _batches(self, shape, settings):
        """The simulated training images of ``shape`` for ``settings``: for an encoder
        that reads the PSF, through a bank of the model's PSF and its variants, each
        told to the encoder; for one that reads the mask, with frame defects."""
        defects = FrameDefects() if self.encoder.mask_channel else None
        if self.encoder.psf_features:
            bank = PSFBank([self.psfs, *self.psf_variants], stamp_size=self.stamp_size)
            return SimulatedBatches(self.prior, bank, self.background, shape,
                                    margin=settings.margin,
                                    background_range=settings.background_range,
                                    density_range=settings.density_range,
                                    density_gradient=settings.density_gradient, defects=defects,
                                    f_max_range=settings.f_max_range,
                                    alpha_range=settings.alpha_range)
        variants = [StarFieldRenderer(psfs, stamp_size=self.stamp_size)
                    for psfs in self.psf_variants]
        return SimulatedBatches(self.prior, self._renderer(), self.background, shape,
                                margin=settings.margin,
                                background_range=settings.background_range,
                                variants=variants, variant_range=settings.psf_variant_range,
                                density_range=settings.density_range,
                                density_gradient=settings.density_gradient, defects=defects,
                                f_max_range=settings.f_max_range,
                                alpha_range=settings.alpha_range)

    # --------------------------------------------------------------- persistence
    def save(self, path, *, overwrite=False):
        """Save the model: network weights (tensors only) and JSON metadata, in one file.

        The file loads with ``torch.load(path, weights_only=True)``; no code is
        pickled. It is written atomically, with a checksum of the weights and no
        denormal numbers (`starnet.model_io`).

        Parameters
        ----------
        path : str or path-like
            The file to write (by convention ``.pt``); `load` reads it back.
        overwrite : bool, optional
            Replace an existing file.

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        """
        write_deblender(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path):
        """Load a model written by `save`, verified first (`starnet.model_io`).

        Parameters
        ----------
        path : str or path-like
            The model file.

        Returns
        -------
        deblender : `StarNetDeblender`
            The model with its training settings, history and ``provenance``.

        Raises
        ------
        ValueError
            If the file is not a starnet model, or its weights do not match their
            checksum, are not finite or do not fit the network of its metadata.

        Examples
        --------
        >>> import os, tempfile
        >>> from starnet import StarNetDeblender
        >>> deblender = StarNetDeblender.pretrained("sdss-m2")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "model.pt")
        ...     deblender.save(path)
        ...     copy = StarNetDeblender.load(path)
        >>> print(copy.bands, copy.training_settings.n_epochs)
        ['r', 'i'] 100
        """
        metadata, state = read_model(path)
        deblender = cls(**deblender_arguments(metadata))
        restore_deblender(deblender, metadata, state)
        return deblender

    @classmethod
    def pretrained(cls, name="sdss-m2"):
        """Load a model shipped with the package.

        Parameters
        ----------
        name : str, optional
            One of `available`: ``'sdss-m2'`` (the M2 field of SDSS run 2583, camcol 2,
            field 136, bands r and i, KL PSF, trained over star densities from 0.001 to
            0.3 per pixel that vary across each image, read with a context branch),
            ``'sdss-m2-powerlaw'`` (the same field with the psField power-law PSF, at
            0.12 stars per pixel) or ``'sdss'`` (any field of the run: it reads the PSF
            of ``meta['psf']``, the mask and the prior; docs page "One model for every
            SDSS field").

        Returns
        -------
        deblender : `StarNetDeblender`

        Raises
        ------
        ValueError
            If no model of that name is shipped.

        Examples
        --------
        >>> from starnet import StarNetDeblender
        >>> print(StarNetDeblender.available())
        ['sdss', 'sdss-m2', 'sdss-m2-powerlaw']
        >>> deblender = StarNetDeblender.pretrained("sdss-m2")
        >>> print(deblender.bands, deblender.prior.mu, deblender.training_settings.density_range)
        ['r', 'i'] 0.12 (0.001, 0.3)
        """
        return cls.load(bundled_model_path(name))

    @classmethod
    def from_name_or_path(cls, model):
        """A deblender from a pretrained model's name, a saved model file, or a deblender.

        Parameters
        ----------
        model : str, path-like or `StarNetDeblender`
            A file written by `save`, the name of a model of `available`, or a deblender
            (returned as it is).

        Returns
        -------
        deblender : `StarNetDeblender`

        Raises
        ------
        FileNotFoundError
            If ``model`` is neither a file nor the name of a pretrained model.
        """
        if isinstance(model, cls):
            return model
        return cls.load(model_path(model))

    @staticmethod
    def available():
        """Names of the pretrained models shipped with the package.

        Returns
        -------
        names : list of str
            The names `pretrained` takes, sorted.
        """
        return bundled_models()

    # ----------------------------------------------------------------- inference
    @deprecated_renamed_argument("progress_bar", "progress", "0.1")
    def __call__(self, nddata, *, background=None, progress=True, threads=None,
                 device=None, precision=None, grid_consensus=False):
        """Modal catalog of an image.

        Parameters
        ----------
        nddata : `~astropy.nddata.NDData`
            ``data`` (bands, rows, cols) including the background, in electrons or a unit
            that converts to them (`starnet.images`); ``meta['bands']``,
            ``meta['psf']`` (or the NDData's ``psf``) and ``meta['background']`` as
            produced by `~starnet.simulate_starfield` or
            `starnet.datasets.load_sdss_frame`; an ``uncertainty`` is taken as the total
            noise (`starnet.images.read_image`). Masked or non-finite pixels are
            replaced by the background (with a warning).
        background : {None, 'fit', 'given'}, optional
            'fit': estimate the background from the pixels
            (`starnet.background.fit_background`, one factor for the image, or a map
            smoothed over 64 pixels on images larger than 256 pixels), 'given': use
            ``meta['background']`` as it is. Default: 'fit' when the model has a
            background encoder (the bundled ones do), else 'given'. On M2 the fit gives
            F1 0.57 against 0.46 with the SDSS sky (docs/m2.rst).
        progress : bool, optional
            Show a progress bar (tqdm) over the blocks of an image larger than
            ``chunk_size`` pixels on a side, when the work lasts more than 2 seconds
            (``progress_bar``: its deprecated name).
        threads : int, optional
            CPU threads of torch for this call. Default: one for images under 512 x 512
            pixels, else the cores of this process that other processes leave free
            (`starnet.threads.choose_threads`; on a busy machine fewer threads are much
            faster than torch's default of every core).
        device : str or `torch.device`, optional
            Where the network runs: ``'cpu'`` (default), ``'cuda'`` (a GPU, which
            must be there: a clear error otherwise) or ``'auto'`` (a GPU when torch
            sees one, else the CPU); the catalog is made on the CPU
            (`starnet.devices`).
        precision : {None, 'float32', 'bfloat16'}, optional
            Of the network's convolutions: float32 (default), or bfloat16, faster on a
            CPU with AMX or AVX512-BF16 and on GPUs (a warning elsewhere, where it is
            slower) and slightly less exact (docs/scaling.rst gives both); models of
            independent tiles only.
        grid_consensus : bool, optional
            Read the image on every placement of the tile grid by whole pixels
            (``tile_size**2`` grids, as many times the network's work) and keep the stars
            that at least half of the grids find, at their mean position and flux
            (`starnet.grid_consensus`): the catalog no longer moves with the grid and is
            better where stars blend (one-to-one F1 0.57 -> 0.60 on the M2 cut-out;
            docs/calibration.rst, "The catalog the grids agree on"). The count posterior
            in ``meta`` is the unshifted grid's. Models of independent tiles only.

        Returns
        -------
        catalog : `~astropy.table.QTable`
            One row per star of the modal catalog (the most probable count in each tile,
            with the modes of the positions and fluxes), sorted by tile (with
            ``grid_consensus``, by the tile of the star's mean position):

            * ``id``: 1-based index;
            * ``x_fit``, ``y_fit``: position in pixels (x = column, y = row);
            * ``x_err``, ``y_err``: posterior standard deviations of the position;
            * ``flux_<band>``, ``flux_<band>_err``: flux (the median of its log-normal
              posterior) and its posterior standard deviation, electrons;
            * ``flux_<band>_q05``, ``flux_<band>_q95``: the 5 and 95 % posterior
              quantiles of the flux, electrons (a 90 % interval, where the standard
              deviation of a faint star's log-normal flux is of no use as an error bar);
            * ``mag_<band>``, ``mag_<band>_err``: magnitude and its posterior standard
              deviation; ``22.5 - 2.5 log10(flux / nelec_per_nmgy)`` when
              ``meta['nelec_per_nmgy']`` gives the calibration, otherwise the
              instrumental magnitude ``-2.5 log10(flux / electron)``;
            * ``detection_prob``: posterior probability that the tile holds at least as
              many stars as this star's rank by flux in the tile (for a model with a
              density spread, given no density offset);
            * ``flags``: integer bit flags, 0 = none: 1 ``edge``, 2 ``bad_pixels``, 4
              ``low_detection``, 8 ``blend``, 16 ``saturated`` (the flux is then a lower
              limit, and ``flux_<band>_q05`` at most the light recorded in the band's
              saturated pixels within one FWHM, if any;
              `starnet.catalogs.CATALOG_FLAGS` says what
              each means, with the FWHM of the model's widest PSF and the window of
              ``receptive_field`` pixels the network sees for a tile;
              `starnet.catalogs.decode_flags` names them);
            * ``n_grids`` (with ``grid_consensus``): the number of shifted grids that
              found the star; positions, fluxes, their errors and ``detection_prob``
              are then the means over the grids that found it (fluxes in log);
            * ``sky_centroid`` when the image has a WCS.

            ``meta`` holds the posterior of the total number of stars in the image
            (``n_stars_mean``, ``n_stars_q05``, ``n_stars_q95``; for a checkerboard
            model, given the modal catalogs of the tiles decided before each tile,
            which is cheap for any image size: `count_posterior` samples the full
            posterior instead), the background used (``background``: its median per
            band, electrons; ``background_source``: 'fitted' or 'given';
            ``background_fit``: the fitted factor, or None), the model settings and the
            package version.
        """
        catalog = consensus_catalog if grid_consensus else modal_catalog
        with self._running(nddata, threads, device, precision) as dtype:
            nddata = choose_background(self, nddata, background)
            inputs = self._prepare(nddata)
            rows, offset, pmf = catalog(self.encoder, inputs, chunk_tiles=self._chunks(inputs),
                                        progress=progress, dtype=dtype)
        meta = inputs.meta
        del inputs
        return modal_table(rows, offset, pmf, nddata=nddata, meta=meta, bands=self.bands,
                           tile_size=self.grid.tile_size, max_sources=self.grid.max_sources,
                           padding=(self.encoder.receptive_field - self.grid.tile_size) // 2,
                           fwhm=self._largest_fwhm())

    @deprecated_renamed_argument("progress_bar", "progress", "0.1")
    def count_posterior(self, nddata, *, region=None, background=None, progress=True,
                        threads=None, device=None, precision=None):
        """Posterior probabilities of the number of stars in the image or in regions of it.

        Parameters
        ----------
        nddata : `~astropy.nddata.NDData`
            The image, as for `__call__`.
        region : array of bool, shape (rows, cols) or (n_regions, rows, cols), optional
            Pixels of a region, or of several (the image is encoded once for all);
            default: the whole image. The stars of a tile count when the region holds
            the tile's central pixel (for an even ``tile_size``, the one above and left
            of the centre), so a boundary is resolved to a tile and regions that
            partition the image partition its stars.
        background : {None, 'fit', 'given'}, optional
            As for `__call__`.
        progress : bool, optional
            As for `__call__`.
        threads, device, precision : optional
            As for `__call__`.

        Returns
        -------
        pmf : `numpy.ndarray`, or a list of them (one per region)
            ``pmf[k]`` = q(N = k): exact for independent tiles (for a model with a
            density spread, mixed over each cell's density offset; for one with pair
            correlations, contracted by the covariances of the region's neighbouring
            tiles, `~starnet.posterior.contract_counts`; for one with a count tail,
            with the stars beyond ``max_sources`` per tile,
            `~starnet.posterior.poisson_tail`), the frequencies of
            ``n_count_samples`` posterior draws for a checkerboard model.

        Examples
        --------
        The count in the left and right halves of an image (``deblender`` and
        ``image`` as in the class example)::

            left = np.zeros(image.data.shape[1:], bool)
            left[:, : left.shape[1] // 2] = True
            pmf_left, pmf_right = deblender.count_posterior(image, region=[left, ~left])

        The mean and 90 % interval of the number of stars in a simulated M2-like image:

        >>> import numpy as np
        >>> from starnet import StarNetDeblender, simulate_starfield
        >>> deblender = StarNetDeblender.pretrained("sdss-m2")
        >>> image, truth = simulate_starfield((40, 40), psf=deblender.psfs,
        ...                                   background=deblender.background, seed=1)
        >>> pmf = deblender.count_posterior(image, background="given")  # simulated: exact
        >>> cdf = np.cumsum(pmf)
        >>> print(f"{np.dot(np.arange(len(pmf)), pmf):.1f} ({np.searchsorted(cdf, 0.05)}, "
        ...       f"{np.searchsorted(cdf, 0.95)}); true {len(truth)}")
        153.4 (142, 165); true 164
        """
        region = None if region is None else np.asarray(region)
        single = region is None or region.ndim == 2
        with self._running(nddata, threads, device, precision) as dtype:
            inputs = self._prepare(choose_background(self, nddata, background))
            pmfs = count_pmfs(self.encoder, inputs,
                              None if region is None else region[None] if single else region,
                              chunk_tiles=self._chunks(inputs), progress=progress,
                              n_samples=self.n_count_samples, dtype=dtype)
        return pmfs[0] if single else pmfs

    def render(self, catalog, shape):
        """Star light of a catalog through the model's PSFs.

        Parameters
        ----------
        catalog : `~astropy.table.QTable`
            ``x_fit``, ``y_fit`` (or ``x``, ``y``) in pixels and ``flux_<band>`` in
            electrons for the model's bands: a catalog of `__call__` or of `sample`, or a
            true catalog.
        shape : tuple of int
            ``(rows, cols)`` of the image.

        Returns
        -------
        light : `numpy.ndarray`, shape (bands, rows, cols)
            Expected star light in electrons, without the background:
            ``image.data - deblender.render(catalog, shape)`` minus the background is the
            residual image.

        Examples
        --------
        A noise-free simulated image is the background plus the light of its true
        catalog:

        >>> import numpy as np
        >>> from starnet import StarNetDeblender, simulate_starfield
        >>> deblender = StarNetDeblender.pretrained("sdss-m2")
        >>> image, truth = simulate_starfield((20, 20), psf=deblender.psfs, noise=None,
        ...                                   background=deblender.background, seed=0)
        >>> light = deblender.render(truth, (20, 20))
        >>> print(light.shape, np.allclose(image.data, light + deblender.background[:, None, None]))
        (2, 20, 20) True
        """
        pairs = [("x_fit", "y_fit"), ("x", "y")]
        positions = next((pair for pair in pairs if set(pair) <= set(catalog.colnames)), None)
        flux_names = [f"flux_{band}" for band in self.bands]
        lacking = [name for name in flux_names if name not in catalog.colnames]
        if positions is None or lacking:
            lacking = ([] if positions else ["x_fit, y_fit (or x, y)"]) + lacking
            raise ValueError(f"render needs the positions x_fit, y_fit (or x, y) in pixels "
                             f"and the fluxes {', '.join(flux_names)} in electrons (the "
                             f"model's bands); the catalog lacks {', '.join(lacking)} (its "
                             f"columns: {', '.join(catalog.colnames)})")
        x, y = (catalog[name] for name in positions)
        locs = torch.tensor(np.stack([np.asarray(x), np.asarray(y)], axis=-1),
                            dtype=torch.float32).reshape(1, -1, 2)
        fluxes = torch.tensor(np.stack([u.Quantity(catalog[name], u.electron).value
                                        for name in flux_names], axis=-1),
                              dtype=torch.float32).reshape(1, -1, len(self.bands))
        mask = torch.ones(locs.shape[:2], dtype=torch.bool)
        return self._renderer().render(locs, fluxes, mask, tuple(shape))[0].double().numpy()

    def _largest_fwhm(self):
        """The largest FWHM of the model's PSFs (pixels), measured once."""
        if self._cached_fwhm is None:
            self._cached_fwhm = max(psf_fwhm(psf) for psf in self.psfs)
        return self._cached_fwhm

    def _renderer(self):
        if self._cached_renderer is None:
            self._cached_renderer = StarFieldRenderer(self.psfs, stamp_size=self.stamp_size)
        return self._cached_renderer

    @deprecated_renamed_argument("progress_bar", "progress", "0.1")
    def sample(self, nddata, *, n_samples=100, seed=None, background=None, progress=True,
               threads=None, device=None, precision=None):
        """Whole catalogs drawn from the posterior.

        The tiles are drawn independently (given their cells' density offsets, for a
        model with a density spread): for a model with pair correlations, the numbers of
        stars of the draws vary more than `count_posterior` says, which holds the
        anticorrelation of neighbouring tiles that share a star. A draw places at most
        ``max_sources`` stars per tile: for a model with a count tail, the draws hold
        fewer stars than `count_posterior` (by the stars beyond, 0.3 % at M2's density
        of 0.12 stars per pixel, 1.3 % at 0.2).

        Parameters
        ----------
        nddata : `~astropy.nddata.NDData`
            The image, as for `__call__`.
        n_samples : int, optional
            Number of catalogs to draw.
        seed : int, optional
            Seed of the draws; the same seed gives the same catalogs.
        background : {None, 'fit', 'given'}, optional
            As for `__call__`.
        progress : bool, optional
            Show the progress of the encoding (as for `__call__`) and of the draws.
        threads, device, precision : optional
            As for `__call__`.

        Returns
        -------
        samples : `~astropy.table.QTable`
            Columns ``sample`` (0-based draw index), ``x_fit``, ``y_fit`` (pixels, as
            in the catalog) and ``flux_<band>`` (electrons) for every star of every
            draw.

        Examples
        --------
        The number of stars in each of 50 catalogs drawn for a simulated image:

        >>> import numpy as np
        >>> from starnet import StarNetDeblender, simulate_starfield
        >>> deblender = StarNetDeblender.pretrained("sdss-m2")
        >>> image, truth = simulate_starfield((40, 40), psf=deblender.psfs,
        ...                                   background=deblender.background, seed=1)
        >>> samples = deblender.sample(image, n_samples=50, seed=0, background="given")
        >>> counts = np.bincount(samples["sample"], minlength=50)
        >>> print(f"{counts.mean():.1f} {counts.min()} {counts.max()}; true {len(truth)}")
        153.9 146 167; true 164
        """
        n_samples = check_positive_int(n_samples, "n_samples")
        check_draws_memory(n_samples, np.shape(nddata.data), tile_size=self.grid.tile_size,
                           max_sources=self.grid.max_sources, n_bands=len(self.bands))
        with self._running(nddata, threads, device, precision) as dtype:
            inputs = self._prepare(choose_background(self, nddata, background))
            catalogs = draw_catalogs(self.encoder, inputs, n_samples,
                                     generator=torch.Generator().manual_seed(_seed_int(seed)),
                                     chunk_tiles=self._chunks(inputs), progress=progress,
                                     dtype=dtype)
        return samples_table(catalogs, bands=self.bands, seed=seed)

    @contextlib.contextmanager
    def _running(self, nddata, threads, device, precision):
        """The torch threads of a call on ``nddata`` (`starnet.threads`), with the
        encoder on ``device``; yields the dtype of ``precision`` (`starnet.devices`)."""
        if as_device(device).type != "cpu" and self.encoder.n_colors != 1:
            raise ValueError("device= runs models of independent tiles (n_colors=1) on a "
                             "GPU; this checkerboard model runs on the CPU only")
        dtype = as_precision(precision, device)
        if dtype != torch.float32 and self.encoder.n_colors != 1:
            raise ValueError(f"precision={precision!r} runs models of independent tiles "
                             "(n_colors=1); this checkerboard model runs in float32 only")
        n_pixels = np.size(nddata.data)
        with torch_threads(choose_threads(threads, n_pixels=n_pixels)), \
                on_device(self.encoder, device):
            yield dtype

    def _prepare(self, nddata):
        """The encoder's input (`starnet.inference.prepare_image`) of an image."""
        if self.encoder.prior_features:
            self._check_prior_family()
        return prepare_image(nddata, bands=self.bands, psfs=self.psfs,
                             stamp_size=self.stamp_size, encoder=self.encoder, prior=self.prior)

    def _check_prior_family(self):
        """Warn when the prior told to a prior-reading encoder lies outside the family it
        was trained over (``f_max_range``, ``alpha_range`` of its training settings, or
        of its provenance for a model trained by a script)."""
        settings = self.training_settings
        for name, value in (("f_max", self.prior.f_max), ("alpha", self.prior.alpha)):
            trained = None if settings is None else getattr(settings, f"{name}_range")
            low, high = trained or self.provenance.get(f"{name}_range", (value, value))
            if not low * 0.999 <= value <= high * 1.001:
                warnings.warn(f"the prior's {name} ({value:g}) is outside the range the "
                              f"model was trained over ({low:g} to {high:g}); its posterior "
                              "there is an extrapolation", UserWarning)

    def _chunks(self, inputs):
        """Side in tiles of the blocks in which ``inputs`` are encoded, or None."""
        return chunk_tiles(inputs.shape, chunk_size=self.chunk_size,
                           tile_size=self.grid.tile_size)


def _check_stamp_light(psfs, stamp_size, bands):
    """Warn when the training stamp leaves out more than 1 % of a band's light."""
    for band, psf in zip(bands, psfs):
        held = stamp_light(psf, stamp_size)
        if held < 0.99:
            warnings.warn(f"the {stamp_size}-pixel PSF stamp holds {held:.1%} of the light "
                          f"of band {band}'s PSF; training images put the rest inside the "
                          "stamp (give a larger odd stamp_size to keep more of the wings)",
                          UserWarning)
