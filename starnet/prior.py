"""The prior over catalogs of stars: a marked Poisson point process."""

from dataclasses import dataclass

import numpy as np
import torch
from astropy import units as u
from astropy.table import QTable

from .validation import check_seed

__all__ = ["StarFieldPrior", "StarCatalogBatch", "PRIOR_FEATURES", "prior_descriptor"]

#: Numbers of `prior_descriptor`: what an encoder that reads the prior is told of it.
PRIOR_FEATURES = 2


def prior_descriptor(f_max, alpha):
    """What an encoder that reads the prior is told of the flux distribution it assumes.

    The bright end of the Pareto flux distribution sets how many faint stars each
    visible one implies, so a count in a crowded field follows it (docs/sdss_model.rst).
    The descriptor is ``(log10(f_max) - 6, 4 (alpha - 0.5))``, of order one over the
    priors of SDSS fields.

    Parameters
    ----------
    f_max : float or `torch.Tensor`, shape (n_images,)
        Largest flux of the reference band, electrons.
    alpha : float or `torch.Tensor`, shape (n_images,)
        Pareto index.

    Returns
    -------
    `torch.Tensor`, shape (n_images, PRIOR_FEATURES) (n_images = 1 for numbers)

    Examples
    --------
    >>> from starnet.prior import prior_descriptor
    >>> prior_descriptor(1e6, 0.5)
    tensor([[0., 0.]])
    """
    f_max = torch.as_tensor(f_max, dtype=torch.float64).reshape(-1)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    f_max, alpha = torch.broadcast_tensors(f_max, alpha)
    return torch.stack([torch.log10(f_max) - 6.0, 4.0 * (alpha - 0.5)], dim=1).float()


@dataclass
class StarCatalogBatch:
    """A batch of catalogs stored as padded tensors.

    Attributes
    ----------
    locs : `torch.Tensor`, shape (n_images, max_stars, 2)
        Star positions ``(x, y)`` in pixels (x = column, y = row; the centre of
        the first pixel is ``(0, 0)``).
    fluxes : `torch.Tensor`, shape (n_images, max_stars, n_bands)
        Fluxes in electrons.
    mask : `torch.Tensor` of bool, shape (n_images, max_stars)
        `True` where a slot holds a star; padded slots have zero flux.
    """

    locs: torch.Tensor
    fluxes: torch.Tensor
    mask: torch.Tensor

    @property
    def n_stars(self):
        """Number of stars in each catalog, shape (n_images,)."""
        return self.mask.sum(dim=1)


class StarFieldPrior:
    r"""Prior over star catalogs: Poisson count, uniform positions, Pareto fluxes, normal colours.

    A catalog of an image of ``rows x cols`` pixels has
    :math:`N \sim \mathrm{Poisson}(\mu \cdot \mathrm{rows} \cdot \mathrm{cols})` stars at
    positions uniform over the image. The flux in the first (reference) band follows a
    Pareto distribution with index ``alpha`` above ``f_min``, truncated at ``f_max``:
    :math:`p(f) \propto f^{-\alpha - 1}`, :math:`f_{min} \le f \le f_{max}`. The flux in
    band :math:`b > 1` is :math:`f_b = f_1 \, 10^{c_b / 2.5}` with colour
    :math:`c_b = m_1 - m_b \sim \mathrm{Normal}(\mathrm{color\_mean}_b,
    \mathrm{color\_sd}_b^2)`.

    Parameters
    ----------
    mu : float, optional
        Mean number of stars per pixel (M2: 0.12).
    f_min, f_max : float, optional
        Flux range in the reference band, electrons.
    alpha : float, optional
        Pareto index of the reference-band flux distribution.
    color_mean, color_sd : float or sequence of float, optional
        Mean and standard deviation of each colour :math:`c_b` (one value, or one per
        band after the first).
    bands : sequence of str, optional
        Band names; the first is the reference band.

    Examples
    --------
    >>> from starnet import StarFieldPrior
    >>> prior = StarFieldPrior(mu=0.12, bands=("r", "i"))
    >>> catalog = prior.sample((50, 50), seed=1)
    >>> catalog.colnames
    ['x', 'y', 'flux_r', 'flux_i']
    >>> print(f"{prior.expected_count((50, 50)):.0f}")
    300
    """

    def __init__(self, *, mu=0.12, f_min=1000.0, f_max=1e6, alpha=0.5, color_mean=0.0,
                 color_sd=1.0, bands=("r", "i")):
        if isinstance(bands, str) or not isinstance(bands, (list, tuple, np.ndarray)) \
                or not all(isinstance(band, str) for band in bands):
            raise TypeError(f"bands must be a list of band names, e.g. ['r', 'i'], got "
                            f"{bands!r}")
        bands = [str(band) for band in bands]
        if len(bands) == 0 or len(set(bands)) != len(bands):
            raise ValueError(f"bands must be a non-empty list of distinct names, got {bands}")
        if not mu > 0:
            raise ValueError(f"mu (stars per pixel) must be positive, got {mu}")
        if not 0 < f_min < f_max:
            raise ValueError(f"need 0 < f_min < f_max, got f_min={f_min}, f_max={f_max}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        n_colors = len(bands) - 1
        self.color_mean = self._per_color(color_mean, n_colors, "color_mean")
        self.color_sd = self._per_color(color_sd, n_colors, "color_sd")
        if any(sd < 0 for sd in self.color_sd):
            raise ValueError(f"color_sd must be non-negative, got {self.color_sd}")
        self.mu = float(mu)
        self.f_min = float(f_min)
        self.f_max = float(f_max)
        self.alpha = float(alpha)
        self.bands = bands

    @staticmethod
    def _per_color(value, n_colors, name):
        values = np.atleast_1d(np.asarray(value, dtype=float))
        if values.size == 1:
            values = np.repeat(values, n_colors)
        if values.size != n_colors:
            raise ValueError(f"{name} needs 1 or {n_colors} values (one per band after the "
                             f"first), got {values.size}")
        return [float(v) for v in values]

    @property
    def n_bands(self):
        """Number of bands."""
        return len(self.bands)

    def expected_count(self, shape):
        """Mean number of stars in an image.

        Parameters
        ----------
        shape : tuple of int
            ``(rows, cols)`` of the image.

        Returns
        -------
        count : float
            ``mu * rows * cols``.
        """
        rows, cols = shape
        return self.mu * rows * cols

    def descriptor(self):
        """`prior_descriptor` of this prior's flux distribution, shape (1, PRIOR_FEATURES)."""
        return prior_descriptor(self.f_max, self.alpha)

    def to_dict(self):
        """The prior's settings as a JSON-serialisable dictionary.

        Returns
        -------
        settings : dict
            The arguments of `StarFieldPrior`; `from_dict` rebuilds the prior.
        """
        return {"mu": self.mu, "f_min": self.f_min, "f_max": self.f_max, "alpha": self.alpha,
                "color_mean": self.color_mean, "color_sd": self.color_sd,
                "bands": list(self.bands)}

    @classmethod
    def from_dict(cls, settings):
        """Build a prior from `to_dict` output.

        Parameters
        ----------
        settings : dict
            The arguments of `StarFieldPrior` by name, as `to_dict` gives them.

        Returns
        -------
        prior : `StarFieldPrior`

        Examples
        --------
        >>> from starnet import StarFieldPrior
        >>> prior = StarFieldPrior(mu=0.05, bands=["g", "r", "i"])
        >>> copy = StarFieldPrior.from_dict(prior.to_dict())
        >>> print(copy.bands, copy.mu, copy.color_sd)
        ['g', 'r', 'i'] 0.05 [1.0, 1.0]
        """
        return cls(**settings)

    def replace(self, **changes):
        """A copy of this prior with the keywords in ``changes`` changed.

        Examples
        --------
        >>> from starnet import StarFieldPrior
        >>> StarFieldPrior(bands=["r"]).replace(f_max=5e6).f_max
        5000000.0
        """
        return StarFieldPrior(**dict(self.to_dict(), **changes))

    def __repr__(self):
        return (f"StarFieldPrior(mu={self.mu}, f_min={self.f_min}, f_max={self.f_max}, "
                f"alpha={self.alpha}, color_mean={self.color_mean}, "
                f"color_sd={self.color_sd}, bands={self.bands})")

    def sample_fluxes(self, n, *, f_max=None, alpha=None, generator=None):
        """Sample stars' fluxes in every band.

        Parameters
        ----------
        n : int
            Number of stars.
        f_max, alpha : `torch.Tensor`, shape (n,), optional
            Each star's upper flux and Pareto index in place of the prior's (training
            over a family of priors draws one per image).
        generator : `torch.Generator`, optional
            Source of randomness.

        Returns
        -------
        fluxes : `torch.Tensor`, shape (n, n_bands)
            Fluxes in electrons (float32): Pareto in the reference band, scaled by
            ``10 ** (colour / 2.5)`` in the others.
        """
        uniform = torch.rand(n, generator=generator, dtype=torch.float64)
        f_max = torch.as_tensor(self.f_max if f_max is None else f_max, dtype=torch.float64)
        alpha = torch.as_tensor(self.alpha if alpha is None else alpha, dtype=torch.float64)
        if not bool(((f_max > self.f_min) & (alpha > 0)).all()):
            raise ValueError(f"need f_max > f_min = {self.f_min} and alpha > 0")
        tail = 1.0 - (self.f_min / f_max) ** alpha
        flux_ref = self.f_min * (1.0 - uniform * tail) ** (-1.0 / alpha)
        normal = torch.randn(n, self.n_bands - 1, generator=generator, dtype=torch.float64)
        colors = (torch.tensor(self.color_mean, dtype=torch.float64)
                  + torch.tensor(self.color_sd, dtype=torch.float64) * normal)
        fluxes = torch.cat([flux_ref[:, None], flux_ref[:, None] * 10 ** (colors / 2.5)], dim=1)
        return fluxes.float()

    def flux_log_density(self, fluxes):
        r"""Log density of stars' fluxes under the prior.

        The density is over the fluxes in every band: the truncated Pareto density of
        the reference flux :math:`f_1` times, for each other band, the normal density
        of the colour :math:`c_b = 2.5 \log_{10}(f_b / f_1)` times
        :math:`|dc_b / df_b| = 2.5 / (f_b \ln 10)`.

        Parameters
        ----------
        fluxes : `torch.Tensor`, shape (..., n_bands)
            Fluxes in electrons.

        Returns
        -------
        log_density : `torch.Tensor`, shape (...)
            ``-inf`` where the reference flux is outside ``[f_min, f_max]`` or a flux
            is not positive.

        Examples
        --------
        >>> import torch
        >>> from starnet import StarFieldPrior
        >>> prior = StarFieldPrior(f_min=1000.0, f_max=1e6, alpha=0.5, bands=["r"])
        >>> density = prior.flux_log_density(torch.tensor([[500.0], [4000.0]])).exp()
        >>> print([f"{float(d):.3g}" for d in density])
        ['0', '6.45e-05']
        """
        fluxes = torch.as_tensor(fluxes, dtype=torch.float64)
        ref = fluxes[..., 0]
        log_norm = (np.log(self.alpha) + self.alpha * np.log(self.f_min)
                    - np.log1p(-(self.f_min / self.f_max) ** self.alpha))
        inside = (ref >= self.f_min) & (ref <= self.f_max) & (fluxes > 0).all(dim=-1)
        positive = torch.where(fluxes > 0, fluxes, torch.ones_like(fluxes))
        log_density = log_norm - (self.alpha + 1) * positive[..., 0].log()
        if self.n_bands > 1:
            mean = torch.tensor(self.color_mean, dtype=torch.float64)
            sd = torch.tensor(self.color_sd, dtype=torch.float64)
            colors = 2.5 * torch.log10(positive[..., 1:] / positive[..., :1])
            log_density = log_density + (
                -0.5 * ((colors - mean) / sd) ** 2 - sd.log() - 0.5 * np.log(2 * np.pi)
                + np.log(2.5 / np.log(10.0)) - positive[..., 1:].log()).sum(dim=-1)
        return torch.where(inside, log_density, torch.tensor(-np.inf, dtype=torch.float64))

    def sample_batch(self, n_images, shape, *, margin=0.0, mu=None, f_max=None, alpha=None,
                     generator=None):
        """Sample a batch of catalogs as padded tensors (used for training).

        Parameters
        ----------
        n_images : int
            Number of catalogs.
        shape : tuple of int
            ``(rows, cols)`` of the image.
        margin : float, optional
            Stars are placed over the image extended by ``margin`` pixels on every side
            (with the same density), so that stars just outside the image can shine into
            it, as on a real sky.
        mu : float or `torch.Tensor` of shape (n_images,), optional
            Stars per pixel of each catalog in place of the prior's ``mu`` (training
            over a range of densities draws one per image).
        f_max, alpha : `torch.Tensor` of shape (n_images,), optional
            Each catalog's upper flux and Pareto index in place of the prior's.
        generator : `torch.Generator`, optional
            Source of randomness.

        Returns
        -------
        batch : `StarCatalogBatch`
        """
        rows, cols = shape
        low = -0.5 - margin
        extent = torch.tensor([cols + 2 * margin, rows + 2 * margin])
        density = torch.as_tensor(self.mu if mu is None else mu, dtype=torch.float32)
        if not bool((density > 0).all()):
            raise ValueError(f"mu (stars per pixel) must be positive, got {mu}")
        rate = density.expand(n_images) * float(extent.prod())
        counts = torch.poisson(rate, generator=generator).long()
        max_stars = int(counts.max()) if n_images else 0
        mask = torch.arange(max_stars)[None, :] < counts[:, None]
        locs = low + extent * torch.rand(n_images, max_stars, 2, generator=generator)
        per_star = [None if v is None else torch.as_tensor(v, dtype=torch.float64)
                    .expand(n_images)[:, None].expand(n_images, max_stars).reshape(-1)
                    for v in (f_max, alpha)]
        fluxes = self.sample_fluxes(n_images * max_stars, f_max=per_star[0],
                                    alpha=per_star[1], generator=generator)
        fluxes = fluxes.reshape(n_images, max_stars, self.n_bands) * mask[..., None]
        return StarCatalogBatch(locs=locs * mask[..., None], fluxes=fluxes, mask=mask)

    def sample(self, shape, *, seed=None):
        """Sample one catalog over an image.

        Parameters
        ----------
        shape : tuple of int
            ``(rows, cols)`` of the image; stars fall uniformly over it (``x`` from -0.5
            to ``cols - 0.5``, ``y`` from -0.5 to ``rows - 0.5``).
        seed : int, optional
            Seed of the draws; the same seed gives the same catalog.

        Returns
        -------
        catalog : `~astropy.table.QTable`
            Columns ``x``, ``y`` (pixels) and ``flux_<band>`` (electrons) for each band.
        """
        generator = torch.Generator().manual_seed(_seed_int(seed))
        batch = self.sample_batch(1, shape, generator=generator)
        return batch_to_table(batch, 0, self.bands)


def batch_to_table(batch, index, bands, *, mask=None):
    """Catalog ``index`` of a `StarCatalogBatch` as a QTable (x, y, flux_<band>).

    ``mask`` (n_stars,) selects stars in place of ``batch.mask[index]``.
    """
    keep = batch.mask[index] if mask is None else mask
    return catalog_table(batch.locs[index][keep], batch.fluxes[index][keep], bands)


def catalog_table(locs, fluxes, bands):
    """A QTable with ``x``, ``y`` (pixels) and ``flux_<band>`` (electrons) from tensors
    ``locs`` (n, 2) and ``fluxes`` (n, n_bands)."""
    table = QTable()
    table["x"] = locs[:, 0].double().numpy()
    table["y"] = locs[:, 1].double().numpy()
    for b, band in enumerate(bands):
        table[f"flux_{band}"] = fluxes[:, b].double().numpy() * u.electron
    return table


def _seed_int(seed):
    """A non-negative integer seed for torch from None, an int >= 0 or a numpy
    Generator (`starnet.validation.check_seed`: other types raise)."""
    seed = check_seed(seed)
    if seed is None:
        return int(np.random.default_rng().integers(2**62))
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2**62))
    return int(seed) % (2**63 - 1)
