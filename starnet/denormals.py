"""Keeping float32 denormal numbers out of the networks.

x86 arithmetic on denormal (subnormal) floats is about a hundred times slower than on
normal ones. A network trained with Adam and L2 weight decay collects weights that have
shrunk towards zero through the denormal range (the first bundled model had 25,341 of
them and ran 10-20x slower on a CPU). Three guards keep them out:

* training uses decoupled weight decay (`torch.optim.AdamW`), which cannot pull a weight
  without gradient below the normal range in any realistic number of steps;
* `zero_negligible_weights` sets weights far below their tensor's largest to exactly zero
  when a model is saved, loaded or trained;
* `flush_denormals` sets flush-to-zero for the calling thread during inference. torch
  offers no way to set it for the worker threads of a thread pool that already exists
  (threads created later inherit it), so the weights are the real guard.
"""

import contextlib

import torch

__all__ = ["zero_negligible_weights", "count_denormals", "flush_denormals"]

#: Weights smaller than this fraction of their tensor's largest weight are set to zero:
#: 2**-46 (about 1.4e-14), the square of float32's relative precision, so such a weight
#: cannot change a float32 sum that its tensor's other weights contribute to.
NEGLIGIBLE = 2.0 ** -46


def zero_negligible_weights(module):
    """Set to zero the parameters and buffers of ``module`` that are negligible.

    A value is negligible when it is a float32 denormal or smaller than `NEGLIGIBLE`
    times the largest absolute value of its tensor. The network's output is unchanged to
    float32 precision.

    Returns
    -------
    int
        Number of values set to zero.

    Examples
    --------
    >>> import torch
    >>> from starnet.denormals import count_denormals, zero_negligible_weights
    >>> layer = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, 1e-40], [0.5, 1e-20]]))
    >>> count_denormals(layer)
    1
    >>> zero_negligible_weights(layer)
    2
    >>> count_denormals(layer)
    0
    """
    zeroed = 0
    with torch.no_grad():
        for tensor in _float_tensors(module):
            size = tensor.abs()
            negligible = (size < torch.finfo(tensor.dtype).tiny) | (
                size < NEGLIGIBLE * size.max())
            negligible &= size > 0
            zeroed += int(negligible.sum())
            tensor.masked_fill_(negligible, 0.0)
    return zeroed


def count_denormals(module):
    """Number of denormal values among the parameters and buffers of ``module``."""
    total = 0
    for tensor in _float_tensors(module):
        size = tensor.detach().abs()
        total += int(((size > 0) & (size < torch.finfo(tensor.dtype).tiny)).sum())
    return total


def _float_tensors(module):
    tensors = list(module.parameters()) + list(module.buffers())
    return [t for t in tensors if t.is_floating_point()]


def _flushing():
    """Whether the calling thread flushes denormals to zero (probed: no getter exists)."""
    tiny = torch.tensor([torch.finfo(torch.float32).tiny / 4])
    return bool((tiny * 1.0 == 0).item())


@contextlib.contextmanager
def flush_denormals():
    """Flush denormals to zero on the calling thread inside the block, then restore.

    Examples
    --------
    >>> import torch
    >>> from starnet.denormals import flush_denormals
    >>> with flush_denormals():
    ...     print(torch.tensor([1e-40]) * 1.0)
    tensor([0.])
    """
    before = _flushing()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(before)
