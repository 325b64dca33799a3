"""The wake phase: fit the PSF and the background to an image under posterior catalogs.

The encoder is fitted to images simulated with a PSF and a background; the wake phase
checks those against a real image. It maximises the expected log-likelihood

    E_q(z | x) [log p(x | z, PSF, background)]

over the parameters of the SDSS power-law PSF of each band and a factor on the
background of each band, with the catalogs ``z`` drawn from the deblender's posterior
and held fixed (the paper's reference code did this before its best M2 result).
`expected_log_likelihood` scores any PSF (a PSF image too) the same way, so that
candidate PSFs can be compared on an image's own pixels.
"""

import math

import numpy as np
import torch
from astropy import units as u
from astropy.table import QTable
from astropy.utils.decorators import deprecated_renamed_argument

from .images import as_background
from .matching import position_columns
from .prior import _seed_int
from .progress import progress_bar
from .psf import PowerLawPSF
from .simulate import StarFieldRenderer

__all__ = ["WakeFit", "fit_psf", "fit_psf_to_catalogs", "expected_log_likelihood"]

_SHAPE = ("sigma1", "sigma2", "sigmap", "beta", "b", "p0")
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(3)


class WakeFit:
    """Result of `fit_psf`.

    Attributes
    ----------
    psfs : list of `~starnet.psf.PowerLawPSF`
        The fitted PSF of each band.
    background_scale : `numpy.ndarray`
        The fitted factor on the image's background, per band.
    history : `~astropy.table.QTable`
        ``step`` and ``log_likelihood`` (expected, per pixel, for the draw of that step).
    log_likelihood : dict
        Expected log-likelihood per pixel over all draws, ``'start'`` and ``'fitted'``.
    """

    def __init__(self, psfs, background_scale, history, log_likelihood):
        self.psfs = psfs
        self.background_scale = background_scale
        self.history = history
        self.log_likelihood = log_likelihood

    def __repr__(self):
        shapes = "; ".join(
            ", ".join(f"{name} {getattr(psf, name).value:.3g}" for name in _SHAPE)
            for psf in self.psfs)
        return (f"<WakeFit PSF [{shapes}], background x {np.round(self.background_scale, 3)}, "
                f"log-likelihood per pixel {self.log_likelihood['start']:.4f} -> "
                f"{self.log_likelihood['fitted']:.4f}>")


def _draws(samples, bands):
    """Per posterior draw: positions (n, 2) and fluxes (n, bands) as float64 tensors."""
    index = np.asarray(samples["sample"])
    xcol, ycol = position_columns(samples, "samples")
    x, y = np.asarray(samples[xcol], dtype=float), np.asarray(samples[ycol], dtype=float)
    flux = np.stack([u.Quantity(samples[f"flux_{b}"], u.electron).value for b in bands],
                    axis=-1)
    draws = []
    for k in range(int(index.max()) + 1 if len(index) else 0):
        mine = index == k
        draws.append((torch.from_numpy(np.stack([x[mine], y[mine]], axis=-1)),
                      torch.from_numpy(flux[mine])))
    return draws


def _power_law(r2, params):
    """Unnormalised power-law profile at squared radius ``r2`` (torch)."""
    sigma1, sigma2, sigmap, beta, b, p0 = params
    return (torch.exp(-0.5 * r2 / sigma1 ** 2) + b * torch.exp(-0.5 * r2 / sigma2 ** 2)
            + p0 * (1 + r2 / (beta * sigmap ** 2)) ** (-0.5 * beta))


def _render_power_law(locs, fluxes, params, shape, stamp_size):
    """Star light of one band through a power-law PSF, differentiable in ``params``.

    Each star's stamp is integrated over pixels (3 x 3 Gauss-Legendre) and normalised
    to unit sum, as `~starnet.simulate.StarFieldRenderer` does.
    """
    rows, cols = shape
    half = stamp_size // 2
    centre = torch.round(locs)
    offset = locs - centre                                      # (n, 2): dx, dy
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    nodes = torch.from_numpy(_NODES / 2)
    weights = torch.from_numpy(np.outer(_WEIGHTS, _WEIGHTS) / 4).reshape(-1)
    # (n, K, K, q, q) squared radii at the quadrature points of every stamp pixel
    u = grid[None, None, :, None, None] + nodes[None, None, None, None, :] \
        - offset[:, 0, None, None, None, None]
    v = grid[None, :, None, None, None] + nodes[None, None, None, :, None] \
        - offset[:, 1, None, None, None, None]
    r2 = (u ** 2 + v ** 2).reshape(len(locs), stamp_size, stamp_size, -1)
    stamps = (_power_law(r2, params) * weights).sum(-1)
    stamps = stamps / stamps.sum(dim=(1, 2), keepdim=True)
    canvas = (rows + 2 * half, cols + 2 * half)
    row = centre[:, 1].long()[:, None, None] + grid.long()[None, :, None] + half
    col = centre[:, 0].long()[:, None, None] + grid.long()[None, None, :] + half
    inside = (row >= 0) & (row < canvas[0]) & (col >= 0) & (col < canvas[1])
    values = (stamps * fluxes[:, None, None])[inside]
    flat = torch.zeros(canvas[0] * canvas[1], dtype=torch.float64).index_add(
        0, (row * canvas[1] + col)[inside], values)
    return flat.reshape(canvas)[half:half + rows, half:half + cols]


def _negative_log_likelihood(data, expected):
    """Per-pixel mean of -log Normal(data; expected, expected), without the constant."""
    expected = expected.clamp(min=1e-3)
    return (0.5 * (data - expected) ** 2 / expected + 0.5 * torch.log(expected)).mean()


def _to_raw(psf):
    values = [float(getattr(psf, name).value) for name in _SHAPE]
    sigma1, sigma2, sigmap, beta, b, p0 = values
    return [math.log(sigma1), math.log(sigma2), math.log(sigmap), math.log(beta - 2),
            math.log(max(b, 1e-8)), math.log(max(p0, 1e-8))]


def _from_raw(raw):
    s1, s2, sp, beta, b, p0 = (torch.exp(r) for r in raw)
    return (s1, s2, sp, beta + 2, b, p0)


def fit_psf(deblender, nddata, *, psf=None, n_samples=8, seed=0, **kwargs):
    """Fit the power-law PSF and the background of an image under posterior catalogs.

    ``n_samples`` catalogs are drawn from the deblender's posterior for the image and
    held fixed; `fit_psf_to_catalogs` does the rest (keyword arguments go to it).

    Parameters
    ----------
    deblender : `~starnet.StarNetDeblender`
    nddata : `~astropy.nddata.NDData`
        The image, as for the deblender.
    psf : list of `~starnet.psf.PowerLawPSF`, optional
        Starting PSFs, one per band (default: the deblender's PSFs if they are power
        laws, else the image's ``meta['psf']``).
    n_samples : int, optional
        Posterior catalogs drawn.
    seed : int, optional
        Seed of the posterior draws and of their order in the fit.

    Returns
    -------
    `WakeFit`

    Examples
    --------
    >>> from starnet import StarNetDeblender
    >>> from starnet.datasets import load_m2
    >>> from starnet.wake import fit_psf
    >>> image, _ = load_m2(border=3)
    >>> fit = fit_psf(StarNetDeblender.pretrained("sdss-m2-powerlaw"), image,
    ...               n_steps=2)   # doctest: +SKIP
    """
    start = _starting_psfs(deblender.bands, nddata,
                           deblender.psfs if psf is None and all(
                               isinstance(p, PowerLawPSF) for p in deblender.psfs) else psf)
    samples = deblender.sample(nddata, n_samples=n_samples, seed=seed, background="given")
    return fit_psf_to_catalogs(nddata, samples, psf=start, seed=seed, **kwargs)


@deprecated_renamed_argument("progress_bar", "progress", "0.1")
def fit_psf_to_catalogs(nddata, samples, *, psf=None, n_steps=200, learning_rate=0.02,
                        fit_background=True, stamp_size=25, seed=0, progress=False):
    """Fit power-law PSFs and background factors to an image, given catalogs.

    The PSF parameters of each band (``sigma1``, ``sigma2``, ``sigmap``, ``beta``,
    ``b``, ``p0``) and a factor on each band's background maximise the mean over the
    catalogs of the log-likelihood of the image (Normal(lambda, lambda) noise) by
    stochastic gradient ascent (Adam on the logarithms), one catalog per step. Each
    star is rendered through a stamp integrated over pixels and normalised to unit
    sum, as in training.

    Parameters
    ----------
    nddata : `~astropy.nddata.NDData`
        ``data`` (bands, rows, cols) in electrons with ``meta['bands']`` and
        ``meta['background']``.
    samples : `~astropy.table.QTable`
        Catalogs with columns ``sample`` (which catalog), ``x_fit``, ``y_fit`` (or
        other position columns, see `~starnet.matching.POSITION_COLUMNS`) and
        ``flux_<band>`` (electrons), as from `~starnet.StarNetDeblender.sample`.
    psf : list of `~starnet.psf.PowerLawPSF`, optional
        Starting PSFs, one per band (default: the image's ``meta['psf']``).
    n_steps : int, optional
    learning_rate : float, optional
    fit_background : bool, optional
        Also fit a factor on each band's background.
    stamp_size : int, optional
        Width of the rendered stamps.
    seed : int, optional
        Seed of the order in which catalogs are used.
    progress : bool, optional
        Show a progress bar (``progress_bar``: its deprecated name).

    Returns
    -------
    `WakeFit`
    """
    bands = list(nddata.meta["bands"])
    start = _starting_psfs(bands, nddata, psf)
    data, background = _image_tensors(nddata, len(bands))
    draws = _draws(samples, bands)
    raw = [torch.tensor(_to_raw(p), dtype=torch.float64, requires_grad=True) for p in start]
    log_scale = torch.zeros(len(bands), dtype=torch.float64, requires_grad=fit_background)
    optimizer = torch.optim.Adam(raw + ([log_scale] if fit_background else []),
                                 lr=learning_rate)
    shape = tuple(data.shape[1:])

    def loss_of(locs, fluxes):
        total = 0.0
        for b in range(len(bands)):
            stars = _render_power_law(locs, fluxes[:, b], _from_raw(raw[b]), shape, stamp_size)
            total = total + _negative_log_likelihood(
                data[b], background[b] * torch.exp(log_scale[b]) + stars)
        return total / len(bands)

    rows = []
    order = np.random.default_rng(_seed_int(seed)).integers(len(draws), size=n_steps)
    for step, k in enumerate(progress_bar(order, enabled=progress, description="wake phase")):
        loss = loss_of(*draws[k])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows.append({"step": step + 1, "log_likelihood": -loss.item()})
    fitted = [PowerLawPSF(**{name: float(value) for name, value in
                             zip(_SHAPE, _from_raw(r.detach()))}) for r in raw]
    scale = torch.exp(log_scale.detach()).numpy()
    log_likelihood = {
        "start": expected_log_likelihood(nddata, samples, psf=start, stamp_size=stamp_size),
        "fitted": expected_log_likelihood(nddata, samples, psf=fitted, background_scale=scale,
                                          stamp_size=stamp_size)}
    return WakeFit(fitted, scale, QTable(rows=rows), log_likelihood)


def _image_tensors(nddata, n_bands):
    """The image and its background map as float64 tensors (bands, rows, cols)."""
    data = np.asarray(nddata.data, dtype=np.float64)
    if data.ndim != 3 or data.shape[0] != n_bands or not np.all(np.isfinite(data)):
        raise ValueError(f"expected a finite image of shape ({n_bands}, rows, cols); got "
                         f"shape {data.shape}")
    background = as_background(nddata.meta["background"], n_bands, data.shape[1:])
    background = np.broadcast_to(background.reshape(n_bands, *(
        (1, 1) if background.ndim == 1 else background.shape[1:])), data.shape)
    return torch.from_numpy(data), torch.from_numpy(np.array(background, dtype=np.float64))


def _starting_psfs(bands, nddata, psf):
    psf = nddata.meta.get("psf") if psf is None else psf
    psf = list(psf) if isinstance(psf, (list, tuple)) else [psf] * len(bands)
    if len(psf) != len(bands) or not all(isinstance(p, PowerLawPSF) for p in psf):
        raise ValueError("the wake phase fits SDSS power-law PSFs: pass psf=[PowerLawPSF, "
                         f"...] with one per band {bands} to start from (e.g. "
                         "PowerLawPSF.from_psfield)")
    return psf


def expected_log_likelihood(nddata, samples, *, psf, background_scale=1.0, stamp_size=25):
    """Mean log-likelihood per pixel of an image under catalogs and a PSF.

    With posterior catalogs, the expected log-likelihood that the wake phase maximises;
    any PSF can be scored (a PSF image too), so candidate PSFs can be compared on an
    image's own pixels.

    Parameters
    ----------
    nddata : `~astropy.nddata.NDData`
        The image, with ``meta['bands']`` and ``meta['background']``.
    samples : `~astropy.table.QTable`
        Catalogs, as for `fit_psf_to_catalogs`.
    psf : list
        One PSF per band (anything `~starnet.psf.as_psf` accepts), rendered as in
        training (`~starnet.simulate.StarFieldRenderer`).
    background_scale : float or array, optional
        Factor on the image's background, per band.
    stamp_size : int, optional

    Returns
    -------
    float
        Mean over catalogs and pixels of ``log Normal(x; lambda, lambda)`` without the
        ``-log(2 pi) / 2`` constant.
    """
    bands = list(nddata.meta["bands"])
    data, background = _image_tensors(nddata, len(bands))
    scale = torch.tensor(np.broadcast_to(background_scale, (len(bands),)),
                         dtype=torch.float64).reshape(-1, 1, 1)
    renderer = StarFieldRenderer(psf, stamp_size=stamp_size)
    values = []
    for locs, fluxes in _draws(samples, bands):
        stars = renderer.render(locs[None].float(), fluxes[None].float(),
                                torch.ones(1, len(locs), dtype=torch.bool),
                                tuple(data.shape[1:]))[0].double()
        values.append(-float(_negative_log_likelihood(data, background * scale + stars)))
    return float(np.mean(values))
