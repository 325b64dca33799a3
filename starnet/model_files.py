"""Model files and training checkpoints: written atomically, verified when read.

* `write_atomically` writes a file in full or not at all: an interrupted save leaves the
  previous file as it was, and no partial file behind.
* A model file (`write_model`, `read_model`) carries a SHA-256 checksum of its weights
  and one of its metadata (which hold the first, so together they cover the whole
  file's content); it is read only when both match, its metadata have the keys and
  types of a model's, the weights are finite and their shapes are those of the
  network its metadata describes (checked before that network is built, so a
  corrupted size cannot make it allocate gigabytes). Files written before the
  checksums existed (before the metadata one, or both) are read without them.
* A checkpoint (`write_checkpoint`, `read_checkpoint`) carries the training settings and
  the description of the model (`describe_model`); resuming with another model or other
  settings is refused, since the checkpoint's history would then describe a training
  that did not happen.

Every file is read with ``torch.load(..., weights_only=True)``: no code is unpickled.
"""

import errno
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from .background import BackgroundEncoder
from .encoder import StarNetEncoder
from .psf_family import DESCRIPTOR_SIZE
from .prior import PRIOR_FEATURES, StarFieldPrior
from .psf import psf_from_dict, psf_to_dict
from .training_settings import TrainingSettings

__all__ = ["write_atomically", "describe_model", "encoder_inputs", "read_encoder_inputs",
           "weights_checksum", "metadata_checksum", "write_model", "read_model",
           "write_checkpoint", "read_checkpoint"]

_MODEL_FORMAT = "starnet-deblender-1"
_CHECKPOINT_FORMAT = "starnet-checkpoint-1"
# training settings that may change when training resumes from a checkpoint
_RESUMABLE = ("learning_rate", "weight_decay", "n_epochs", "n_steps", "max_time",
              "final_learning_rate", "average_steps")
_SIZES = ("tile_size", "max_sources", "stamp_size", "hidden", "tile_hidden")
#: The keys of a model file's metadata and their JSON types (None: null allowed);
#: those after ``tile_hidden`` may be missing from files of older versions.
_METADATA = {"format": str, "starnet_version": str, "prior": dict, "psf": list,
             "background": list, "tile_size": int, "max_sources": int, "stamp_size": int,
             "hidden": int, "tile_hidden": int, "training_settings": (dict, None),
             "training_history": (dict, None), "psf_variants": list, "n_colors": int,
             "log_flux_offset": (int, float), "provenance": dict, "background_encoder": dict,
             "encoder_inputs": dict, "weights_sha256": str, "sha256": str}
_OPTIONAL = ("psf_variants", "n_colors", "log_flux_offset", "provenance",
             "background_encoder", "encoder_inputs", "weights_sha256", "sha256")
#: What an encoder reads beside the pixels (`encoder_inputs`), with the defaults of a
#: model file without them.
_INPUTS = {"reads_psf": False, "reads_mask": False, "reads_prior": False, "context_cells": 0,
           "density_cells": 0, "pair_correlations": False, "count_tail": False}


def write_atomically(path, write, *, overwrite=True):
    """Write a file in full or not at all.

    ``write(file)`` writes into a temporary file of the same folder,
    ``.<name>.<pid>.<random>.tmp``, which is flushed to disk and then renamed onto
    ``path`` (`os.replace`, atomic) or, without ``overwrite``, linked to it (`os.link`,
    which fails if ``path`` exists, so that of several processes writing a new file at
    once exactly one succeeds). If anything fails (an exception, a full disk, a
    file-size limit, Ctrl-C), the temporary file is removed and ``path`` keeps its
    previous contents. A process killed outright (SIGKILL, a power cut) cannot clean
    up: ``path`` is still intact, and the temporary file is left behind, named after
    ``path`` and the process id that wrote it, for the user to delete.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The file to write.
    write : callable
        Called with the open binary file.
    overwrite : bool, optional
        Replace ``path`` if it exists; otherwise raise FileExistsError, checked
        atomically when the finished file is put in place.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from starnet.model_files import write_atomically
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "numbers.pt"
    ...     write_atomically(path, lambda file: torch.save({"x": torch.arange(3)}, file))
    ...     print(torch.load(path, weights_only=True)["x"].tolist())
    [0, 1, 2]
    """
    path = Path(path)
    if not overwrite and path.exists():   # early, before the work; checked again below
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open, unlike tempfile, gives the file the permissions of an ordinary new file
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            with os.fdopen(descriptor, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            raise _failed_write(path, error) from error
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists (written by another process "
                                      "meanwhile); pass overwrite=True to replace it") from None
            temporary.unlink()
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _saver(contents):
    """A ``write(file)`` for `write_atomically` that saves ``contents`` with torch,
    whose C++ writer reports a failed write (a full disk, a file-size limit) as a
    RuntimeError ('enforce fail at inline_container.cc'): raised as an OSError."""
    def write(file):
        try:
            torch.save(contents, file)
        except RuntimeError as error:
            if "inline_container" not in str(error):
                raise
            raise OSError(errno.EIO, f"torch could not write the file ({error})") from error
    return write


def _failed_write(path, error):
    """The OSError for a write of ``path`` that failed with ``error``, naming the likely
    cause."""
    return OSError(error.errno, f"writing {path} failed (is the disk full, or the file "
                                f"larger than the system allows? {error.strerror or error}); "
                                "the previous file, if any, is unchanged")


def _sync_folder(folder):
    """Make a rename in ``folder`` durable (POSIX only: Windows cannot open a folder)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def describe_model(deblender):
    """The generative model and network architecture of a deblender, as JSON values.

    The model file's metadata holds it, and so does a training checkpoint, which is
    resumed only by a deblender with the same description.

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`, str or path
        A deblender, or a model file (read with `read_model`; the description is
        taken from its metadata).

    Examples
    --------
    >>> from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender
    >>> from starnet.model_files import describe_model
    >>> psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    >>> deblender = StarNetDeblender(prior=StarFieldPrior(bands=["r"]), psf=psf,
    ...                              background=[686.0], hidden=8)
    >>> description = describe_model(deblender)
    >>> description["background"], description["hidden"]
    ([686.0], 8)

    A model file:

    >>> from importlib import resources
    >>> describe_model(resources.files("starnet") / "models" / "sdss-m2.pt")["tile_size"]
    2
    """
    if isinstance(deblender, (str, os.PathLike)) or hasattr(deblender, "read_bytes"):
        metadata, _ = read_model(deblender)
        keys = ("prior", "psf", "background", "psf_variants", "tile_size", "max_sources",
                "stamp_size", "hidden", "tile_hidden", "n_colors", "log_flux_offset",
                "encoder_inputs")
        description = {key: metadata[key] for key in keys if key in metadata}
        if "encoder_inputs" in description:     # with the defaults of inputs added since
            description["encoder_inputs"] = {
                key: value for key, value in read_encoder_inputs(metadata).items()
                if key not in ("density_cells", "pair_correlations", "count_tail")
                or value}
        return description
    encoder = deblender.encoder
    description = {
        "prior": deblender.prior.to_dict(), "psf": [psf_to_dict(p) for p in deblender.psfs],
        "background": [float(b) for b in deblender.background],
        "psf_variants": [[psf_to_dict(p) for p in psfs] for psfs in deblender.psf_variants],
        "tile_size": deblender.grid.tile_size, "max_sources": deblender.grid.max_sources,
        "stamp_size": deblender.stamp_size, "hidden": encoder.pixel_layers[0].out_channels,
        "tile_hidden": encoder.head.in_channels, "n_colors": encoder.n_colors,
        "log_flux_offset": encoder.log_flux_offset,
    }
    inputs = encoder_inputs(encoder)
    if dict(_INPUTS, **inputs) != _INPUTS:  # files of pixel-only models stay as they were
        description["encoder_inputs"] = inputs
    return description


def encoder_inputs(encoder):
    """What ``encoder`` reads beside the pixels, as the `~starnet.StarNetDeblender`
    arguments ``reads_psf``, ``reads_mask``, ``reads_prior``, ``context_cells`` and
    (where it has a density spread) ``density_cells`` and (where it has them)
    ``pair_correlations`` and ``count_tail``.

    Returns
    -------
    dict
    """
    inputs = {"reads_psf": bool(encoder.psf_features), "reads_mask": encoder.mask_channel,
              "reads_prior": bool(encoder.prior_features),
              "context_cells": encoder.context_cells}
    if encoder.density_cells:   # added later: earlier models' descriptions stay as they were
        inputs["density_cells"] = encoder.density_cells
    if encoder.pair_correlations:
        inputs["pair_correlations"] = True
    if encoder.count_tail:
        inputs["count_tail"] = True
    return inputs


def weights_checksum(state):
    """SHA-256 (hex) of the tensors of ``state``, a dict of state dicts.

    The state dicts are taken in the order of their sorted names and their tensors in
    state-dict order; each contributes its name, dtype, shape and bytes (in logical
    order, whatever its memory layout).

    Examples
    --------
    >>> import torch
    >>> from starnet.model_files import weights_checksum
    >>> one = {"weights": {"w": torch.zeros(2)}}
    >>> weights_checksum(one) == weights_checksum({"weights": {"w": torch.zeros(2)}})
    True
    >>> weights_checksum(one) == weights_checksum({"weights": {"w": torch.ones(2)}})
    False
    """
    digest = hashlib.sha256()
    for group in sorted(state):
        for name, tensor in state[group].items():
            digest.update(f"{group}/{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1)
                          .view(torch.uint8).numpy())
    return digest.hexdigest()


def metadata_checksum(metadata):
    """SHA-256 (hex) of a model file's metadata, all but their ``sha256`` key.

    The metadata hold the checksum of the weights (`weights_checksum`), so this one
    covers the whole content of the file.

    Examples
    --------
    >>> from starnet.model_files import metadata_checksum
    >>> metadata_checksum({"a": 1, "b": [2]}) == metadata_checksum({"b": [2], "a": 1})
    True
    >>> metadata_checksum({"a": 1}) == metadata_checksum({"a": 1.5})
    False
    """
    text = json.dumps({key: value for key, value in metadata.items() if key != "sha256"},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_model(path, metadata, state, *, overwrite=True):
    """Write a model file atomically: ``metadata`` (JSON) with its format and the
    checksum of the weights, and ``state`` (``{"weights": state_dict, ...}``).

    `starnet.StarNetDeblender.save` builds the metadata and the state. Without
    ``overwrite``, an existing ``path`` (even one written meanwhile by another
    process) raises FileExistsError (`write_atomically`).
    """
    metadata = {"format": _MODEL_FORMAT, **metadata, "weights_sha256": weights_checksum(state)}
    metadata["sha256"] = metadata_checksum(metadata)
    contents = {"metadata": json.dumps(metadata), **state}
    write_atomically(path, _saver(contents), overwrite=overwrite)


def read_model(path):
    """Read and verify a model file written by `write_model`.

    Returns
    -------
    metadata : dict
    state : dict
        ``"weights"`` (the encoder's state dict) and, if the model has one,
        ``"background_weights"``.

    Raises
    ------
    ValueError
        If the file is not a starnet model file (empty, truncated, not a torch file,
        a pickle that needs code to run, another torch file), if its weights or its
        metadata do not match their checksums, if its metadata lack a key, hold an
        unknown one or one of the wrong type, or if its weights are not finite or do
        not have the shapes its metadata imply. Files written before checksums
        existed are accepted without them.

    Examples
    --------
    >>> from importlib import resources
    >>> from starnet.model_files import read_model
    >>> metadata, state = read_model(resources.files("starnet") / "models" / "sdss-m2.pt")
    >>> metadata["tile_size"], sorted(state)
    (2, ['background_weights', 'weights'])
    """
    contents = _load(path, "a starnet model file written by StarNetDeblender.save")
    if not isinstance(contents, dict) or not isinstance(contents.get("metadata"), str):
        raise ValueError(f"{path} is not a starnet model file: it holds no metadata "
                         "(expected a file written by StarNetDeblender.save)")
    metadata = _parse_metadata(path, contents["metadata"])
    if metadata.get("format") != _MODEL_FORMAT:
        raise ValueError(f"{path} is not a starnet model file (format "
                         f"{metadata.get('format')!r}, expected {_MODEL_FORMAT!r})")
    state = {key: contents[key] for key in ("weights", "background_weights") if key in contents}
    _check_tensors(path, state)
    expected = metadata.get("weights_sha256")
    if expected is not None and weights_checksum(state) != expected:
        raise ValueError(f"{path} is corrupted: checksum of the weights does not match the "
                         "one saved with them")
    if "sha256" in metadata and metadata_checksum(metadata) != metadata["sha256"]:
        raise ValueError(f"{path} is corrupted or was edited: the checksum of its metadata "
                         "does not match the one saved with them (a model file is written "
                         "by StarNetDeblender.save only; change a model in Python and save "
                         "it again)")
    _check_metadata(path, metadata)
    _check_finite(path, state)
    _check_shapes(path, metadata, state)
    return metadata, state


def write_checkpoint(path, state, *, settings, model=None):
    """Write a training checkpoint atomically, with the settings and model it is for.

    Parameters
    ----------
    path : str or `~pathlib.Path`
    state : dict
        ``encoder``, ``optimizer``, ``generator`` and ``history``, and ``average`` for a
        fit that averages its weights (``TrainingSettings.average_steps``).
    settings : `~starnet.training.TrainingSettings`
    model : dict, optional
        `describe_model` of the deblender being trained.
    """
    metadata = {"format": _CHECKPOINT_FORMAT, "training_settings": settings.to_dict(),
                "model": model}
    contents = {"metadata": json.dumps(metadata), **state}
    write_atomically(path, _saver(contents))


def read_checkpoint(path, *, settings, model=None):
    """Read a checkpoint to resume training with ``settings`` for ``model``.

    Only the budget (``n_epochs``, not below its number of epochs, ``n_steps``,
    ``max_time``) and the rates (``learning_rate``, ``final_learning_rate``,
    ``weight_decay``) may differ from the checkpoint's settings; its model
    description must equal ``model`` (when both are known). A checkpoint written before
    checkpoints carried their settings is resumed with a warning.

    Returns
    -------
    state : dict
        ``encoder``, ``optimizer``, ``generator`` and ``history``.

    Raises
    ------
    ValueError
        If the file is not a checkpoint, if it was written for another model or other
        settings, or if it holds more epochs than ``settings.n_epochs``.

    Examples
    --------
    `starnet.StarNetDeblender.fit` writes and reads checkpoints; here, one resumed
    with a new rate and more epochs (``deblender`` as in the class example)::

        deblender.fit(n_epochs=1, checkpoint="fit.ckpt", learning_rate=1e-3)
        deblender.fit(n_epochs=2, checkpoint="fit.ckpt", learning_rate=1e-4)
    """
    contents = _load(path, "a starnet training checkpoint")
    needed = ("encoder", "optimizer", "generator", "history")
    if not isinstance(contents, dict) or not all(key in contents for key in needed):
        raise ValueError(f"{path} is not a starnet training checkpoint (expected a file "
                         f"with {list(needed)}, as written by StarNetDeblender.fit)")
    if "metadata" in contents:
        _check_resume(path, _parse_metadata(path, contents["metadata"]), settings, model)
    else:
        warnings.warn(f"{path} was written by an older starnet and holds no training "
                      "settings: it is resumed without checking that it was made for this "
                      "model and these settings", UserWarning)
    done = len(contents["history"])
    if settings.n_steps is None and settings.n_epochs < done:
        raise ValueError(f"checkpoint {path} already holds {done} epochs but n_epochs is "
                         f"{settings.n_epochs}: ask for at least {done} epochs, or use a new "
                         "checkpoint path")
    return contents


def checkpoint_weights(state):
    """The network weights a fit would end with if it stopped at checkpoint ``state``
    (as `read_checkpoint` or ``torch.load`` returns it): the averaged weights of a fit
    that averages them (``TrainingSettings.average_steps``), else the last step's."""
    return state["average"]["weights"] if state.get("average") else state["encoder"]


def _check_resume(path, metadata, settings, model):
    """Refuse to resume from a checkpoint made for another model or other settings."""
    stored = metadata.get("training_settings") or {}
    current = _as_json(settings.to_dict())
    if stored:       # a setting added since the checkpoint was written: its default,
        # which is what fits did before it (a rule of TrainingSettings)
        stored = {**_as_json(TrainingSettings().to_dict()), **stored}
    differ = [f"training setting {key!r} ({stored.get(key)!r} in the checkpoint, "
              f"{current.get(key)!r} now)"
              for key in sorted(set(stored) | set(current))
              if key not in _RESUMABLE and stored.get(key) != current.get(key)]
    if model is not None and metadata.get("model") is not None:
        model, stored_model = _as_json(model), metadata["model"]
        differ += [f"model {key!r}" for key in sorted(set(model) | set(stored_model))
                   if model.get(key) != stored_model.get(key)]
    if differ:
        raise ValueError(f"checkpoint {path} was written for another training: "
                         f"{'; '.join(differ)} differ. Only {list(_RESUMABLE)} may "
                         "change on resume: use a new checkpoint path")


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _load(path, expected):
    """``torch.load(path, weights_only=True)``, any failure to parse as a ValueError (a
    missing or unreadable file raises as `open` does)."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty, expected {expected}")
        try:
            return torch.load(file, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as error:
            needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if needs is None:  # torch's weights-only unpickler wraps every failure
                raise _unreadable(path, expected, error) from error
            raise ValueError(f"{path} is not {expected}: it holds Python objects other than "
                             f"tensors and plain values, which only running code from the "
                             f"file ({needs[1]}) could build (refused)") from error
        except Exception as error:  # torch raises many kinds, OSError for a truncated file
            raise _unreadable(path, expected, error) from error


def _unreadable(path, expected, error):
    """The ValueError for a file that torch cannot parse, with the first line of its
    reason (after the weights-only unpickler's advice to load unsafely, if any)."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return ValueError(f"{path} is not {expected} (it may be truncated or corrupted): "
                      f"torch.load fails with {type(error).__name__} {reason}".rstrip())


def _parse_metadata(path, text):
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupted: its metadata is not valid JSON "
                         f"({error})") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} is corrupted: its metadata is not a JSON object")
    return metadata


def _check_metadata(path, metadata):
    """Check the keys and JSON types of a model file's metadata, and that its prior,
    PSFs and background describe a model (`StarFieldPrior.from_dict`,
    `~starnet.psf.psf_from_dict`)."""
    unknown = sorted(set(metadata) - set(_METADATA))
    missing = [key for key in _METADATA if key not in metadata and key not in _OPTIONAL]
    wrong = []
    for key, kinds in _METADATA.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = metadata.get(key)
        if key in metadata and not (
                (value is None and None in kinds)
                or (isinstance(value, tuple(k for k in kinds if k is not None))
                    and not isinstance(value, bool))):
            names = " or ".join("null" if k is None else k.__name__ for k in kinds)
            wrong.append(f"{key!r} is {type(value).__name__}, expected {names}")
    if unknown or missing or wrong:
        problems = ([f"unknown keys {unknown}"] if unknown else []) + (
            [f"missing keys {missing}"] if missing else []) + wrong
        raise ValueError(f"{path} is not a valid starnet model file: its metadata "
                         f"{'; '.join(problems)}")
    try:
        prior = StarFieldPrior.from_dict(metadata["prior"])
        for psf in metadata["psf"] + [p for ps in metadata.get("psf_variants", []) for p in ps]:
            psf_from_dict(psf)
        background = [float(b) for b in metadata["background"]]
        if len(metadata["psf"]) != prior.n_bands or len(background) != prior.n_bands:
            raise ValueError(f"{len(metadata['psf'])} PSFs and {len(background)} "
                             f"backgrounds for the {prior.n_bands} bands {prior.bands}")
        if not all(math.isfinite(b) and b > 0 for b in background):
            raise ValueError(f"background {background} is not positive and finite")
        if metadata["training_settings"] is not None:
            settings = dict(metadata["training_settings"])
            unknown = sorted(set(settings) - {f.name for f in fields(TrainingSettings)})
            if unknown:
                raise ValueError(f"unknown training settings {unknown}")
            TrainingSettings(**settings)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path} is not a valid starnet model file: its metadata do not "
                         f"describe a model ({type(error).__name__}: {error})") from error


def read_encoder_inputs(metadata):
    """The ``encoder_inputs`` of a model file's metadata, checked, with defaults for a
    file without them (`encoder_inputs`)."""
    inputs = dict(_INPUTS, **metadata.get("encoder_inputs", {}))
    unknown = sorted(set(inputs) - set(_INPUTS))
    if unknown:
        raise ValueError(f"unknown encoder inputs {unknown}; expected some of {list(_INPUTS)}")
    for key in ("reads_psf", "reads_mask", "reads_prior", "pair_correlations", "count_tail"):
        if not isinstance(inputs[key], bool):
            raise ValueError(f"encoder input {key!r} must be true or false, got {inputs[key]!r}")
    for key in ("context_cells", "density_cells"):
        cells = inputs[key]
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 0:
            raise ValueError(f"encoder input {key!r} must be an integer >= 0, got {cells!r}")
    return inputs


def _check_tensors(path, state):
    if "weights" not in state:
        raise ValueError(f"{path} holds no encoder weights (expected a file written by "
                         "StarNetDeblender.save)")
    for group, tensors in state.items():
        if not isinstance(tensors, dict) or not all(
                isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{path} is corrupted: {group!r} is not a dict of tensors")


def _check_finite(path, state):
    for group, tensors in state.items():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path} is corrupted: {group} {name!r} holds non-finite "
                                 "values (NaN or infinity)")


def _check_shapes(path, metadata, state):
    """Compare the stored tensors' shapes with those of the networks the metadata
    describes, built on the meta device (no memory is allocated)."""
    expected = _expected_shapes(path, metadata)
    problems = [f"{group} missing" for group in expected if group not in state]
    problems += [f"unexpected {group}" for group in state if group not in expected]
    for group in set(expected) & set(state):
        shapes = {name: tuple(t.shape) for name, t in state[group].items()}
        for name in expected[group].keys() | shapes.keys():
            want, have = expected[group].get(name), shapes.get(name)
            if want != have:
                problems.append(f"{group} {name!r} has shape {have} in the file, {want} by "
                                "the metadata")
    if problems:
        sizes = ", ".join(f"{key}={metadata[key]}" for key in _SIZES)
        raise ValueError(f"{path} is corrupted: its weights are not those of the network "
                         f"its metadata describes ({sizes}): {'; '.join(sorted(problems))}")


def _expected_shapes(path, metadata):
    """Shapes of the state dicts of the networks that ``metadata`` describes."""
    try:
        n_bands = len(metadata["prior"]["bands"])
        sizes = {key: metadata[key] for key in _SIZES}
        sizes["n_colors"] = metadata.get("n_colors", 1)
        options = metadata.get("background_encoder")
        if options is not None:
            sizes.update(cell_size=options["cell_size"], background_hidden=options["hidden"])
        wrong = {key: value for key, value in sizes.items()
                 if isinstance(value, bool) or not isinstance(value, int) or value < 1}
        if wrong:
            raise ValueError(f"sizes must be positive integers, got {wrong}")
        inputs = read_encoder_inputs(metadata)
        with torch.device("meta"):
            networks = {"weights": StarNetEncoder(
                n_bands=n_bands, tile_size=sizes["tile_size"],
                max_sources=sizes["max_sources"], hidden=sizes["hidden"],
                tile_hidden=sizes["tile_hidden"], n_colors=sizes["n_colors"],
                mask_channel=inputs["reads_mask"],
                psf_features=DESCRIPTOR_SIZE if inputs["reads_psf"] else 0,
                prior_features=PRIOR_FEATURES if inputs["reads_prior"] else 0,
                context_cells=inputs["context_cells"],
                density_cells=inputs["density_cells"],
                pair_correlations=inputs["pair_correlations"],
                count_tail=inputs["count_tail"])}
            if options is not None:
                networks["background_weights"] = BackgroundEncoder(
                    n_bands=n_bands, cell_size=sizes["cell_size"],
                    hidden=sizes["background_hidden"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is corrupted: its metadata does not describe a starnet "
                         f"network ({type(error).__name__}: {error})") from error
    return {group: {name: tuple(t.shape) for name, t in network.state_dict().items()}
            for group, network in networks.items()}
