"""Where the network runs, the CPU (the default) or a GPU, and in which precision.

Only the network's calls move (`starnet.inference.encode` and
`~starnet.inference.encode_blocks`): the encoder goes to the device for the length of a
call (`on_device`), the image's tensors go with it, and each block's posterior comes
back to the CPU, where the catalogs, count pmfs and tables are made. The background
network stays on the CPU; a fit (`starnet.training.train_encoder`) trains the encoder
on the device and simulates its images on the CPU.

``precision='bfloat16'`` runs the network's convolutions in bfloat16 (`autocast`; the
first convolution, the context branch and the heads stay float32,
``starnet.encoder._in_float32``): faster where the hardware
computes in bfloat16 (x86 CPUs with AMX or AVX512-BF16, recent GPUs), slower elsewhere
(`as_precision` warns where torch has no bfloat16 kernels), and a slightly different
posterior (docs/scaling.rst). In a fit it applies to the training steps only
(docs/training.rst).
"""

import warnings
from contextlib import contextmanager, nullcontext

import torch

__all__ = ["PRECISIONS", "as_device", "as_precision", "autocast", "on_device"]

#: The precisions the network runs in, by name.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def as_device(device):
    """The `torch.device` that ``device`` names, checked to be usable.

    Parameters
    ----------
    device : None, str or `torch.device`
        None or ``'cpu'``: the CPU; ``'cuda'`` or ``'cuda:N'``: a GPU, which must be
        there; ``'auto'``: a GPU when torch sees one, else the CPU.

    Returns
    -------
    `torch.device`

    Raises
    ------
    ValueError
        If ``device`` names no device, or a kind other than the CPU or CUDA.
    RuntimeError
        If it names a GPU that torch cannot use.

    Examples
    --------
    >>> from starnet.devices import as_device
    >>> as_device(None), as_device("cpu")
    (device(type='cpu'), device(type='cpu'))
    """
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or 'auto', got "
                         f"{device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"starnet runs on the CPU or a CUDA GPU, not on {device.type!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU "
                               "(torch.cuda.is_available() is False: no GPU, no driver, or "
                               "a CPU-only torch); use device='cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} asked for, but torch sees "
                               f"{torch.cuda.device_count()} CUDA GPU(s)")
    return device


@contextmanager
def on_device(network, device):
    """``network`` on ``device`` (`as_device`) for the block, back on the CPU after it.

    Parameters
    ----------
    network : `torch.nn.Module`
    device : None, str or `torch.device`

    Examples
    --------
    >>> import torch
    >>> from starnet.devices import on_device
    >>> layer = torch.nn.Linear(2, 2)
    >>> with on_device(layer, "cpu"):
    ...     print(layer.weight.device)
    cpu
    """
    device = as_device(device)
    if device.type == "cpu":
        yield network
        return
    network.to(device)
    try:
        yield network
    finally:
        network.to("cpu")


def as_precision(precision, device=None):
    """The dtype of the network's convolutions that ``precision`` names, checked.

    Parameters
    ----------
    precision : None or str
        None or ``'float32'`` (the default), or ``'bfloat16'``.
    device : None, str or `torch.device`, optional
        Where the network runs (`as_device`): bfloat16 on hardware without it warns.

    Returns
    -------
    `torch.dtype`

    Raises
    ------
    ValueError
        If ``precision`` is none of `PRECISIONS`.

    Examples
    --------
    >>> from starnet.devices import as_precision
    >>> as_precision(None), as_precision("bfloat16")
    (torch.float32, torch.bfloat16)
    """
    if precision is None:
        return torch.float32
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))} "
                         f"(or None: float32), got {precision!r}")
    dtype = PRECISIONS[precision]
    device = as_device(device)
    if dtype == torch.bfloat16 and not _computes_bfloat16(device):
        hardware = ("this GPU" if device.type == "cuda"
                    else "this CPU (it has neither AMX nor AVX512-BF16)")
        warnings.warn(f"precision='bfloat16': {hardware} does not compute in bfloat16, so "
                      "the network runs slower than in float32", UserWarning, stacklevel=2)
    return dtype


def _computes_bfloat16(device):
    """Whether ``device`` has bfloat16 arithmetic (a fast ``autocast`` to bfloat16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch's oneDNN kernels need AVX512 and emulate bfloat16 without AMX or AVX512-BF16:
    # 3 times slower than float32 on an AVX512 core, 6 times with AVX2 only (the 1000 x
    # 1000 M2 cut-out, docs/scaling.rst); these are private functions of torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and (torch.cpu._is_avx512_bf16_supported()
                         or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):
        return False


def autocast(dtype, device):
    """The context in which the network runs in ``dtype`` (from `as_precision`) on
    ``device``: ``torch.autocast`` for bfloat16, nothing for float32.

    Examples
    --------
    >>> import torch
    >>> from starnet.devices import autocast
    >>> with autocast(torch.bfloat16, "cpu"):
    ...     print(torch.nn.Linear(2, 2)(torch.ones(2)).dtype)
    torch.bfloat16
    """
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(as_device(device).type, dtype=dtype)
