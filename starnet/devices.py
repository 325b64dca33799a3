"""Where the network runs: the CPU (the default) or a GPU.

Only the network's calls move (`starnet.inference.encode` and
`~starnet.inference.encode_blocks`): the encoder goes to the device for the length of a
call (`on_device`), the image's tensors go with it, and each block's posterior comes
back to the CPU, where the catalogs, count pmfs and tables are made. The background
network and training stay on the CPU.
"""

from contextlib import contextmanager

import torch

__all__ = ["as_device", "on_device"]


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
