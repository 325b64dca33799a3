"""Deblenders in model files, and the models bundled in ``starnet/models``.

`write_deblender` writes what `~starnet.StarNetDeblender.save` saves: the network
weights and JSON metadata (the generative model, the architecture, the training
settings and history, the provenance, and a background encoder if there is one) in one
file (`starnet.model_files`), written atomically (an interrupted save leaves the
previous file intact) with a checksum of the weights. `~starnet.StarNetDeblender.load`
reads it back only when the checksum matches, the weights are finite and fit the
network of the metadata, builds a deblender from `deblender_arguments` and fills it in
with `restore_deblender`. Negligible weights are set to zero when a model is saved and
when it is loaded, so that the file and the networks hold no denormal numbers, which
slow a CPU down 10-20 times (`starnet.denormals`; files written before `save` did so
run at full speed too).

`bundled_models` names the models shipped with the package; `bundled_model_path`
and `model_path` find their files (`~starnet.StarNetDeblender.pretrained`,
`~starnet.StarNetDeblender.from_name_or_path`).
"""

from importlib import resources
from pathlib import Path

import numpy as np
from astropy.table import QTable

from . import __version__
from .background import BackgroundEncoder
from .denormals import zero_negligible_weights
from .model_files import describe_model, read_encoder_inputs, write_model
from .prior import StarFieldPrior
from .psf import as_psf, psf_from_dict
from .training import TrainingSettings

__all__ = ["write_deblender", "deblender_arguments", "restore_deblender", "bundled_models",
           "bundled_model_path", "model_path"]


def write_deblender(deblender, path, *, overwrite=False):
    """Write a deblender's model file: `~starnet.StarNetDeblender.save`, whose
    arguments (``path``, ``overwrite``) and errors these are.

    Negligible weights are set to zero first (`starnet.denormals`).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    for network in (deblender.encoder, deblender.background_encoder):
        if network is not None:
            zero_negligible_weights(network)
    metadata = {
        "starnet_version": __version__, **describe_model(deblender),
        "training_settings": (deblender.training_settings.to_dict()
                              if deblender.training_settings is not None else None),
        "training_history": (_table_to_lists(deblender.training_history)
                             if deblender.training_history is not None else None),
        "provenance": deblender.provenance,
    }
    state = {"weights": deblender.encoder.state_dict()}
    if deblender.background_encoder is not None:
        metadata["background_encoder"] = {
            "cell_size": deblender.background_encoder.cell_size,
            "hidden": deblender.background_encoder.hidden,
            "history": _table_to_lists(deblender.background_history)}
        state["background_weights"] = deblender.background_encoder.state_dict()
    write_model(path, metadata, state, overwrite=overwrite)


def deblender_arguments(metadata):
    """Arguments of `~starnet.StarNetDeblender` for the model a file describes.

    Parameters
    ----------
    metadata : dict
        From `starnet.model_files.read_model`.

    Returns
    -------
    dict
    """
    return dict(prior=StarFieldPrior.from_dict(metadata["prior"]),
                psf=[psf_from_dict(p) for p in metadata["psf"]],
                background=metadata["background"], tile_size=metadata["tile_size"],
                max_sources=metadata["max_sources"], stamp_size=metadata["stamp_size"],
                hidden=metadata["hidden"], tile_hidden=metadata["tile_hidden"],
                n_colors=metadata.get("n_colors", 1), **read_encoder_inputs(metadata))


def restore_deblender(deblender, metadata, state):
    """Give a new deblender the weights, settings and history of its model file.

    Negligible weights are set to zero (`starnet.denormals`).

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
        Built from `deblender_arguments` of ``metadata``; changed in place.
    metadata, state : dict
        From `starnet.model_files.read_model`.
    """
    deblender.encoder.log_flux_offset = metadata.get("log_flux_offset",
                                                     deblender.encoder.log_flux_offset)
    deblender.encoder.load_state_dict(state["weights"])
    zero_negligible_weights(deblender.encoder)
    if metadata["training_settings"] is not None:
        deblender.training_settings = TrainingSettings(**metadata["training_settings"])
    deblender.provenance = metadata.get("provenance", {})
    deblender.psf_variants = [[as_psf(psf_from_dict(p)) for p in psfs]
                              for psfs in metadata.get("psf_variants", [])]
    if "background_encoder" in metadata:
        options = metadata["background_encoder"]
        deblender.background_encoder = BackgroundEncoder(
            n_bands=deblender.prior.n_bands, cell_size=options["cell_size"],
            hidden=options["hidden"])
        deblender.background_encoder.load_state_dict(state["background_weights"])
        zero_negligible_weights(deblender.background_encoder)
        deblender.background_encoder.eval()
        deblender.background_history = _lists_to_table(options["history"])
    if metadata["training_history"] is not None:
        deblender.training_history = _lists_to_table(metadata["training_history"])


def bundled_models():
    """Names of the models shipped with the package.

    Returns
    -------
    names : list of str
        Sorted.
    """
    folder = resources.files("starnet") / "models"
    if not folder.is_dir():
        return []
    return sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".pt"))


def bundled_model_path(name):
    """The file of a bundled model.

    Parameters
    ----------
    name : str
        One of `bundled_models`.

    Returns
    -------
    path : path-like

    Raises
    ------
    ValueError
        If no model of that name is shipped.
    """
    available = bundled_models()
    if name not in available:
        raise ValueError(f"no pretrained model {name!r}; available: {available}")
    return resources.files("starnet") / "models" / f"{name}.pt"


def model_path(model):
    """The file of a model given by a path or by the name of a bundled model.

    Parameters
    ----------
    model : str or path-like
        A model file, or one of `bundled_models`.

    Returns
    -------
    path : str or path-like

    Raises
    ------
    FileNotFoundError
        If ``model`` is neither a file nor the name of a bundled model.
    """
    if Path(str(model)).is_file():
        return model
    available = bundled_models()
    if str(model) in available:
        return bundled_model_path(str(model))
    raise FileNotFoundError(f"model {str(model)!r} is neither a model file nor a "
                            f"pretrained model (pretrained: {available})")


# history columns that count things: whole numbers, also in files that stored them as floats
_COUNT_COLUMNS = ("epoch", "steps", "dropped_stars")


def _table_to_lists(table):
    """A table of numbers as a JSON-ready dict of lists (ints stay ints), column by column."""
    return {name: [v.item() if isinstance(v, np.generic) else v for v in table[name]]
            for name in table.colnames}


def _lists_to_table(columns):
    """The history table of `_table_to_lists`'s dict, with whole-number counts as ints."""
    table = QTable(columns)
    for name in _COUNT_COLUMNS:
        if name in table.colnames and np.all(np.mod(table[name], 1) == 0):
            table[name] = np.asarray(table[name], dtype=np.int64)
    return table
