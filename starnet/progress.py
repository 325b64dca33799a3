"""Progress bars, the same for training and inference.

Every function of starnet that can show progress takes ``progress=True`` (show) or
``False`` (hide) and draws its bar with `progress_bar`: the epochs of
`~starnet.training.train_encoder`, the steps of
`~starnet.background.train_background_encoder` and of the wake phase
(`~starnet.wake.fit_psf_to_catalogs`), and the blocks and posterior draws of
`starnet.inference`, whose loops report ``progress(done, total)`` to
`progress_callback`.
"""

import contextlib

from tqdm.auto import tqdm

__all__ = ["progress_bar", "progress_callback"]


def progress_bar(iterable=None, *, enabled=True, description=None, delay=0.0):
    """A tqdm bar over ``iterable`` (or updated by hand) that is removed when it ends.

    Parameters
    ----------
    iterable : iterable, optional
        Iterated through the bar; without it, the bar is updated by hand.
    enabled : bool, optional
        Show the bar; when false the bar is silent (and still iterates).
    description : str, optional
        Shown before the bar.
    delay : float, optional
        Seconds before the bar appears, so that short work shows none.

    Returns
    -------
    bar : `tqdm.tqdm`
    """
    return tqdm(iterable, desc=description, disable=not enabled, leave=False, delay=delay)


@contextlib.contextmanager
def progress_callback(enabled, description, *, delay=2.0):
    """Context manager giving a callback ``update(done, total)`` that drives a
    `progress_bar` (shown when ``enabled``, after ``delay`` seconds)."""
    with progress_bar(enabled=enabled, description=description, delay=delay) as bar:
        def update(done, total):
            bar.total = total
            bar.update(done - bar.n)

        yield update
