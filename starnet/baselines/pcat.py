"""PCAT-like MCMC sampling of star catalogs under StarNet's generative model.

Probabilistic cataloging (PCAT; Portillo et al. 2017, AJ 154, 132) draws catalogs
from their posterior by reversible-jump Markov chain Monte Carlo. `CatalogSampler`
does so under exactly the model that `~starnet.StarNetDeblender` approximates: the
prior of `~starnet.StarFieldPrior`, the PSF stamps of
`~starnet.simulate.StarFieldRenderer` and Normal(lambda, lambda) pixels.
"""

import math
import time

import numpy as np
import torch
from astropy import units as u
from astropy.table import QTable

from .. import __version__
from ..images import image_psfs, read_image
from ..prior import _seed_int
from ..simulate import StarFieldRenderer
from ..validation import check_positive_int

__all__ = ["CatalogSampler"]

MOVES = ("move", "birth", "death", "split", "merge")
"""The proposals of `CatalogSampler`, in the order of its ``move_probabilities``."""

_LOG_2PI = math.log(2 * math.pi)
_MIN_RATE = 1e-6
"""Floor of the expected counts in the likelihood, electrons."""


class CatalogSampler:
    r"""Draw catalogs from the posterior by MCMC with PCAT's moves.

    The chain's state is a whole catalog: its number of stars, their positions and their
    fluxes in every band. The image is cut into a grid of ``region_size`` x
    ``region_size`` pixel squares, and the grid into blocks of ``k`` x ``k`` squares,
    with ``k = 1 + ceil((stamp_size - 1) / region_size)``. Each step proposes, in the
    square of the same place in every block, one of

    * ``move``: one star's position (a normal step) and fluxes (a log-normal step per
      band), with steps scaled to the star's photon noise times one of
      ``step_scales``;
    * ``birth`` / ``death``: a star drawn from the prior (position uniform over the
      region, fluxes from `~starnet.StarFieldPrior`) added, or a star removed;
    * ``split`` / ``merge``: a star split into two that keep its flux in every band
      and its flux-weighted centre (separated by a normal vector of scale
      ``split_scale``), or two stars of the region merged (the second chosen with
      weight ``exp(-d^2 / (2 split_scale^2))`` from the first),

    and accepts it with the Metropolis-Hastings-Green probability: the likelihood
    ratio, the prior ratio (Poisson count, truncated Pareto flux and normal colours),
    the ratio of the reverse and forward proposal densities and, for split and merge,
    the Jacobian :math:`\prod_b f_b` of the map from (parent, fractions, separation)
    to the two stars. A proposal that would leave its region is rejected. The squares
    of one step are at least ``(k - 1) * region_size >= stamp_size - 1`` pixels apart,
    so the pixels that their proposals change never overlap: they are decided in
    parallel, each with the log-likelihood summed over its own window of the model
    image, which is kept up to date. The grid's origin is drawn at random each step.
    One sweep is ``k * k`` steps (each place in the block once), a proposal in every
    square. Small squares hold few stars, so each star is proposed a move more often
    per unit of computation (the window of a square is ``region_size + stamp_size -
    1`` pixels wide).

    Stars lie within the image (``-0.5 <= x < cols - 0.5``, likewise ``y``), as the
    prior of `~starnet.StarNetDeblender` places them; their light is the renderer's
    pixel-integrated PSF stamp of ``stamp_size`` pixels (normalised to unit sum, as
    when images are simulated), evaluated for each proposal from the SVD basis of
    `~starnet.simulate.StarFieldRenderer` (exact sub-pixel placement, no table of
    shifted stamps to hold); a smaller stamp makes smaller regions and more proposals
    per step.

    Parameters
    ----------
    prior : `~starnet.StarFieldPrior`
        The prior over catalogs (its bands are the image's).
    psf : PSF or list of PSF, optional
        One per band (or one for all); by default the image's ``meta['psf']``.
    stamp_size : int, optional
        Odd width of the PSF stamps, pixels; by default that of the images
        `~starnet.simulate_starfield` renders and `~starnet.StarNetDeblender` is
        trained on (a smaller stamp drops wing light that the sampler then explains
        with extra faint stars).
    region_size : int, optional
        Side of the grid's squares, pixels (at M2's density, 0.12 stars per pixel, an
        8-pixel square holds about 8 stars).
    move_probabilities : sequence of 5 float, optional
        Probabilities of the moves ``move``, ``birth``, ``death``, ``split``,
        ``merge``; birth and death, split and merge must be equally likely.
    position_step, flux_step : float, optional
        Scales of the random-walk steps of ``move``, in units of a star's position and
        log-flux uncertainty from its photon noise (the sky over the PSF's effective
        area plus its own flux); steps are at most one pixel and a factor e.
    step_scales : sequence of float, optional
        Each move's steps are ``position_step`` and ``flux_step`` times one of these
        factors, chosen at random (the proposal density is the mixture). Steps of the
        photon-noise scale sample a star's posterior once it is found; the larger ones
        let a bright star whose start is many of its (tiny) posterior widths away, as
        in a catalog from another method, reach its position and flux in tens of
        sweeps rather than thousands.
    split_scale : float, optional
        Scale of the separation of the two stars of a split, pixels.
    likelihood : bool, optional
        With `False`, the data are ignored and the chain samples the prior (a check).

    Examples
    --------
    A star of 20 000 electrons on a 686-electron sky:

    >>> import numpy as np
    >>> from starnet import PowerLawPSF, StarFieldPrior, simulate_starfield
    >>> from starnet.baselines import CatalogSampler
    >>> psf = PowerLawPSF(sigma1=0.9, sigma2=2.3, b=0.06, p0=0.0)
    >>> prior = StarFieldPrior(mu=0.002, bands=["r"])
    >>> image, truth = simulate_starfield((20, 20), prior=prior, psf=psf,
    ...                                   background=686.0, seed=3)
    >>> sampler = CatalogSampler(prior=prior, psf=psf, stamp_size=11)
    >>> samples = sampler.sample(image, n_samples=20, n_sweeps=100, seed=0)
    >>> samples.colnames
    ['sample', 'x_fit', 'y_fit', 'flux_r']
    """

    def __init__(self, *, prior, psf=None, stamp_size=25, region_size=8,
                 move_probabilities=(0.6, 0.1, 0.1, 0.1, 0.1), position_step=1.0,
                 flux_step=1.0, step_scales=(1.0, 10.0, 100.0), split_scale=1.0,
                 likelihood=True):
        if stamp_size % 2 != 1 or stamp_size < 3:
            raise ValueError(f"stamp_size must be an odd integer >= 3, got {stamp_size}")
        region_size = check_positive_int(region_size, "region_size")
        probabilities = np.asarray(move_probabilities, dtype=float)
        if (probabilities.shape != (5,) or np.any(probabilities < 0)
                or not np.isclose(probabilities.sum(), 1.0)):
            raise ValueError("move_probabilities must be 5 non-negative numbers summing to "
                             f"one (for {', '.join(MOVES)}), got {move_probabilities}")
        if probabilities[1] != probabilities[2] or probabilities[3] != probabilities[4]:
            raise ValueError("birth and death, and split and merge, must be equally likely "
                             f"(so that each is the other's reverse), got {move_probabilities}")
        if prior.n_bands > 1 and min(prior.color_sd) <= 0:
            raise ValueError("the sampler needs color_sd > 0 in every band of the prior")
        step_scales = np.atleast_1d(np.asarray(step_scales, dtype=float))
        if step_scales.ndim != 1 or not len(step_scales) or not np.all(step_scales > 0):
            raise ValueError(f"step_scales must be positive numbers, got {step_scales!r}")
        for name, value in (("position_step", position_step), ("flux_step", flux_step),
                            ("split_scale", split_scale)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.prior = prior
        self.psf = psf
        self.stamp_size = int(stamp_size)
        self.region_size = region_size
        self.block = 1 + math.ceil((self.stamp_size - 1) / region_size)
        self.move_probabilities = probabilities
        self.position_step = float(position_step)
        self.flux_step = float(flux_step)
        self.step_scales = tuple(step_scales.tolist())
        self.split_scale = float(split_scale)
        self.likelihood = bool(likelihood)

    @property
    def bands(self):
        """The bands of the prior."""
        return list(self.prior.bands)

    def sample(self, nddata, *, n_samples=100, n_sweeps=1000, burn_in=0.5, time_limit=None,
               n_chains=1, init=None, seed=None):
        """Catalogs drawn from the posterior of an image.

        Parameters
        ----------
        nddata : `~astropy.nddata.NDData`
            The image in electrons with ``meta['bands']`` (the prior's),
            ``meta['background']`` and, unless the sampler has its own, ``meta['psf']``,
            as for `~starnet.StarNetDeblender`. Masked and non-finite pixels are left
            out of the likelihood.
        n_samples : int, optional
            Catalogs kept from each chain, evenly spaced after the burn-in.
        n_sweeps : int, optional
            Sweeps of each chain (a sweep proposes a move in every region once).
        burn_in : float, optional
            Fraction of the sweeps discarded at the start.
        time_limit : float, optional
            Seconds to run instead of ``n_sweeps``: the number of sweeps that fits is
            estimated from the speed of the first sweeps.
        n_chains : int, optional
            Independent chains run side by side (ignored with ``init`` of several draws).
        init : `~astropy.table.QTable`, optional
            Starting catalog(s): ``x_fit``, ``y_fit`` (or ``x``, ``y``) and
            ``flux_<band>``; with a ``sample`` column (the output of
            `~starnet.StarNetDeblender.sample`), one chain starts from each draw. By
            default chains start empty. Fluxes are clipped to the prior's range.
        seed : int, optional
            Seed of the chains; the same seed gives the same catalogs.

        Returns
        -------
        samples : `~astropy.table.QTable`
            As `~starnet.StarNetDeblender.sample`: columns ``sample``, ``x_fit``,
            ``y_fit`` and ``flux_<band>`` (electrons) for every star of every draw;
            draw ``chain * n_samples + k`` is the ``k``-th of chain ``chain``. ``meta``
            holds the settings, the sweeps run, the acceptance rate of each move and the
            wall time.
        """
        n_samples = check_positive_int(n_samples, "n_samples")
        if not 0 <= burn_in < 1:
            raise ValueError(f"burn_in must be a fraction in [0, 1), got {burn_in!r}")
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(_seed_int(seed))
        chain = _Chains(self, nddata, generator)
        chain.initialise(init, check_positive_int(n_chains, "n_chains"))
        if time_limit is None:
            n_sweeps = check_positive_int(n_sweeps, "n_sweeps")
        else:
            n_sweeps = chain.sweeps_within(float(time_limit) - (time.perf_counter() - start))
        n_burn = int(burn_in * n_sweeps)
        thin = max((n_sweeps - n_burn) // n_samples, 1)
        n_burn = n_sweeps - thin * n_samples if n_sweeps >= thin * n_samples else 0
        draws = []
        for sweep in range(max(n_sweeps, thin * n_samples)):
            chain.sweep()
            if sweep >= n_burn and (sweep - n_burn + 1) % thin == 0 and len(draws) < n_samples:
                chain.refresh_model()
                draws.append(chain.catalogs())
        table = self._table(draws, chain.n_chains, n_samples)
        table.meta.update({
            "version": __version__, "method": "PCAT-like MCMC (starnet.baselines.pcat)",
            "n_samples": chain.n_chains * n_samples, "n_chains": chain.n_chains,
            "seed": seed, "n_sweeps": chain.n_sweeps, "burn_in_sweeps": n_burn,
            "thin": thin, "stamp_size": self.stamp_size, "region_size": self.region_size,
            "block": self.block,
            "step_scales": list(self.step_scales),
            "move_probabilities": dict(zip(MOVES, self.move_probabilities.tolist())),
            "acceptance": chain.acceptance(), "likelihood": self.likelihood,
            "wall_time": time.perf_counter() - start})
        return table

    def log_posterior(self, nddata, catalogs):
        """Log posterior density of catalogs under the sampler's model, up to the
        evidence: the log-likelihood (Normal(lambda, lambda) pixels) plus the log prior
        density (``N log mu - mu * area`` plus each star's flux density).

        The catalogs are read as ``init`` of `sample` (stars outside the image dropped,
        fluxes clipped to the prior's range): the densities are those of the states
        the chains would start from. Comparing catalogs of one image (say the truth of
        a simulation, StarNet's draws and a chain's draws) shows which the model
        prefers, and whether a chain has reached the posterior's typical set.

        Parameters
        ----------
        nddata : `~astropy.nddata.NDData`
            The image, as for `sample`.
        catalogs : `~astropy.table.Table`
            One catalog, or several with a ``sample`` column (as `sample` and
            `~starnet.StarNetDeblender.sample` return them).

        Returns
        -------
        log_density : `~numpy.ndarray`
            One value per catalog, in the order of the distinct ``sample`` values
            (a single value without that column).

        Examples
        --------
        The true catalog of a simulated image is far more probable than the same
        catalog without its brightest star:

        >>> import numpy as np
        >>> from starnet import PowerLawPSF, StarFieldPrior, simulate_starfield
        >>> from starnet.baselines import CatalogSampler
        >>> psf = PowerLawPSF(sigma1=0.9, sigma2=2.3, b=0.06, p0=0.0)
        >>> prior = StarFieldPrior(mu=0.01, bands=["r"])
        >>> image, truth = simulate_starfield((20, 20), prior=prior, psf=psf,
        ...                                   background=686.0, seed=3)
        >>> sampler = CatalogSampler(prior=prior, psf=psf, stamp_size=11)
        >>> brightest = np.argmax(truth["flux_r"])
        >>> without = truth[np.arange(len(truth)) != brightest]
        >>> true, fewer = (sampler.log_posterior(image, truth)[0],
        ...                sampler.log_posterior(image, without)[0])
        >>> bool(true > fewer + 10)
        True
        """
        chains = _Chains(self, nddata, torch.Generator())
        chains.initialise(catalogs, 1)
        return chains.log_posterior()

    def _table(self, draws, n_chains, n_samples):
        """Draws (a list over time of per-chain (x, y, fluxes, chain) arrays) as a table."""
        columns = {"sample": [], "x_fit": [], "y_fit": [], "flux": []}
        for k, (x, y, fluxes, chains) in enumerate(draws):
            columns["sample"].append(chains * n_samples + k)
            columns["x_fit"].append(x)
            columns["y_fit"].append(y)
            columns["flux"].append(fluxes)
        sample = np.concatenate(columns["sample"]) if draws else np.zeros(0, int)
        order = np.argsort(sample, kind="stable")
        table = QTable()
        table["sample"] = sample[order]
        for name in ("x_fit", "y_fit"):
            table[name] = (np.concatenate(columns[name]) if draws else np.zeros(0))[order]
        fluxes = (np.concatenate(columns["flux"]) if draws
                  else np.zeros((0, self.prior.n_bands)))[order]
        for b, band in enumerate(self.bands):
            table[f"flux_{band}"] = fluxes[:, b] * u.electron
        return table


class _Chains:
    """The state of ``n_chains`` chains on one image: stars in slots of fixed capacity
    (``alive`` marks the used ones) and each chain's model image on a padded canvas."""

    def __init__(self, sampler, nddata, generator):
        self.s = sampler
        self.generator = generator
        prior = sampler.prior
        image = read_image(nddata, prior.bands)
        psfs = sampler.psf if sampler.psf is not None else image_psfs(nddata, prior.n_bands)
        psfs = list(psfs) if isinstance(psfs, (list, tuple)) else [psfs] * prior.n_bands
        self.renderer = StarFieldRenderer(psfs, stamp_size=sampler.stamp_size)
        self.bands = prior.n_bands
        self.shape = image.data.shape[1:]
        self.half = sampler.stamp_size // 2
        self.region = sampler.region_size
        self.pad = self.region + self.half
        rows, cols = self.shape
        self.canvas_shape = (rows + 2 * self.pad, cols + 2 * self.pad)
        data = torch.from_numpy(np.asarray(image.data, dtype=np.float64))
        background = torch.from_numpy(np.asarray(image.background, dtype=np.float64))
        background = background.expand(self.bands, rows, cols)
        good = torch.from_numpy(~np.asarray(image.bad)).expand(self.bands, rows, cols)
        if not sampler.likelihood:
            good = torch.zeros_like(good)
        self.data = self._on_canvas(torch.where(good, data, background), 1.0).flatten()
        self.weight = self._on_canvas(good.double(), 0.0).flatten()
        self.background = self._on_canvas(background, 1.0)
        # unit-flux stamps are drawn from the renderer's tables, in double precision
        self.tables = [(t.double(), b.double().reshape(b.shape[0], -1))
                       for t, b in zip(self.renderer._coefficients, self.renderer._bases)]
        # photon-noise scales of the steps: sky over the PSF's effective area, per band
        centre = torch.zeros(1, 2, dtype=torch.float64)
        self.sky_area = torch.tensor([
            float(background[b].median()) / float((self._stamps(centre, b)[1] ** 2).sum())
            for b in range(self.bands)], dtype=torch.float64)
        self.log_p = torch.tensor(np.log(np.maximum(sampler.move_probabilities, 1e-300)))
        self.cumulative = torch.tensor(np.cumsum(sampler.move_probabilities))
        self.step_scales = torch.tensor(sampler.step_scales, dtype=torch.float64)
        self.proposed = np.zeros(5, dtype=np.int64)
        self.accepted = np.zeros(5, dtype=np.int64)
        self.n_sweeps = 0
        self.step_count = 0

    def _on_canvas(self, values, fill):
        """(bands, rows, cols) values on the padded canvas, ``fill`` around them."""
        rows, cols = self.shape
        canvas = torch.full((self.bands, *self.canvas_shape), fill, dtype=torch.float64)
        canvas[:, self.pad:self.pad + rows, self.pad:self.pad + cols] = values
        return canvas

    def _stamps(self, locs, band):
        """Nearest pixels (col, row) and flattened unit-flux stamps of stars at ``locs``."""
        nearest = torch.floor(locs + 0.5)
        table, basis = self.tables[band]
        coeffs = self.renderer._interpolate(table, locs - nearest)
        return nearest.long(), coeffs @ basis

    # ------------------------------------------------------------------ the state
    def initialise(self, init, n_chains):
        prior = self.s.prior
        if init is not None:
            xcol = "x_fit" if "x_fit" in init.colnames else "x"
            ycol = "y_fit" if "y_fit" in init.colnames else "y"
            sample = (np.asarray(init["sample"]) if "sample" in init.colnames
                      else np.zeros(len(init), dtype=int))
            draws, chain_of_star = np.unique(sample, return_inverse=True)
            n_chains = max(len(draws), 1)
            locs = np.stack([np.asarray(init[xcol], float), np.asarray(init[ycol], float)], 1)
            fluxes = np.stack([u.Quantity(init[f"flux_{band}"], u.electron).value
                               for band in prior.bands], axis=1)
            rows, cols = self.shape
            inside = ((locs[:, 0] >= -0.5) & (locs[:, 0] < cols - 0.5)
                      & (locs[:, 1] >= -0.5) & (locs[:, 1] < rows - 0.5))
            locs, fluxes, chain_of_star = locs[inside], fluxes[inside], chain_of_star[inside]
            scale = np.clip(fluxes[:, 0], prior.f_min, prior.f_max) / fluxes[:, 0]
            fluxes = np.where(np.isfinite(fluxes) & (fluxes > 0), fluxes, prior.f_min)
            fluxes = fluxes * np.where(np.isfinite(scale), scale, 1.0)[:, None]
            # exactly within the range (the product can fall an ulp outside it, where
            # the prior density is zero and every split of the star would be accepted)
            fluxes[:, 0] = np.clip(fluxes[:, 0], prior.f_min, prior.f_max)
        else:
            locs, fluxes = np.zeros((0, 2)), np.zeros((0, self.bands))
            chain_of_star = np.zeros(0, dtype=int)
        self.n_chains = n_chains
        counts = np.bincount(chain_of_star, minlength=n_chains)
        self.capacity = max(64, 2 * int(counts.max(initial=0)))
        size = n_chains * self.capacity
        self.locs = torch.zeros(size, 2, dtype=torch.float64)
        self.fluxes = torch.ones(size, self.bands, dtype=torch.float64)
        self.alive = torch.zeros(size, dtype=torch.bool)
        rank = np.zeros(len(chain_of_star), dtype=int)
        for c in range(n_chains):
            rank[chain_of_star == c] = np.arange(counts[c])
        slots = torch.from_numpy(chain_of_star * self.capacity + rank)
        self.locs[slots] = torch.from_numpy(locs)
        self.fluxes[slots] = torch.from_numpy(fluxes)
        self.alive[slots] = True
        self.refresh_model()

    def _grow(self):
        """Double the slots of every chain."""
        old, new = self.capacity, 2 * self.capacity
        index = (torch.arange(self.n_chains)[:, None] * new + torch.arange(old)).flatten()
        for name, fill in (("locs", 0.0), ("fluxes", 1.0), ("alive", False)):
            tensor = getattr(self, name)
            grown = torch.full((self.n_chains * new, *tensor.shape[1:]), fill,
                               dtype=tensor.dtype)
            grown[index] = tensor
            setattr(self, name, grown)
        self.capacity = new

    def refresh_model(self):
        """Recompute each chain's model image from its stars (no drift of the sums)."""
        model = self.background.expand(self.n_chains, -1, -1, -1).clone()
        index = torch.nonzero(self.alive).squeeze(1)
        flat = model.flatten()
        chains = index // self.capacity
        for b in range(self.bands):
            nearest, stamps = self._stamps(self.locs[index], b)
            offsets = self._stamp_offsets(nearest + self.pad - self.half, chains, b)
            flat.index_add_(0, offsets.flatten(),
                            (stamps * self.fluxes[index, b:b + 1]).flatten())
        self.model = flat

    def _stamp_offsets(self, corner, chains, band):
        """Flat canvas indices (n, S*S) of the stamps whose top-left canvas pixels
        (col, row) are ``corner`` (n, 2), in chains ``chains`` (n,)."""
        size = self.s.stamp_size
        rows, cols = self.canvas_shape
        grid = torch.arange(size)
        base = ((chains * self.bands + band) * rows + corner[:, 1]) * cols + corner[:, 0]
        return base[:, None] + (grid[:, None] * cols + grid[None, :]).flatten()[None, :]

    def catalogs(self):
        """The current catalogs: x, y, fluxes and chain of every star (numpy)."""
        index = torch.nonzero(self.alive).squeeze(1)
        return (self.locs[index, 0].numpy().copy(), self.locs[index, 1].numpy().copy(),
                self.fluxes[index].numpy().copy(), (index // self.capacity).numpy())

    def log_posterior(self):
        """Each chain's log-likelihood plus log prior density (see
        `CatalogSampler.log_posterior`)."""
        prior = self.s.prior
        model = self.model.view(self.n_chains, -1).clamp(min=_MIN_RATE)
        log_likelihood = -0.5 * (self.weight * ((self.data - model) ** 2 / model
                                                + model.log() + _LOG_2PI)).sum(1)
        alive = self.alive.view(self.n_chains, -1)
        flux_density = prior.flux_log_density(self.fluxes).view(self.n_chains, -1)
        rows, cols = self.shape
        log_prior = (alive.sum(1) * math.log(prior.mu) - prior.mu * rows * cols
                     + torch.where(alive, flux_density, torch.zeros_like(flux_density)).sum(1))
        return (log_likelihood + log_prior).numpy()

    def acceptance(self):
        return {name: (float(a / p) if p else float("nan"))
                for name, a, p in zip(MOVES, self.accepted, self.proposed)}

    def sweeps_within(self, seconds):
        """Run sweeps for a tenth of ``seconds`` (at least 4) and return the number
        of sweeps that fit in ``seconds`` in all (counting those run)."""
        start = time.perf_counter()
        while True:
            self.sweep()
            elapsed = time.perf_counter() - start
            if elapsed > 0.1 * seconds and self.n_sweeps >= 4:
                break
        return max(int(self.n_sweeps * seconds / elapsed) - self.n_sweeps, 1)

    def sweep(self):
        for place in range(self.s.block ** 2):
            self.step(place)
        self.n_sweeps += 1

    # ------------------------------------------------------------------ one step
    def step(self, place):
        s, g = self.s, self.generator
        prior = s.prior
        rows, cols = self.shape
        R, C, M = self.region, self.n_chains, None
        shift = torch.randint(R, (2,), generator=g)        # (col, row) shift
        n_reg = ((rows + R - 1) // R + 1, (cols + R - 1) // R + 1)
        k = s.block
        kr = torch.arange(place // k, n_reg[0], k)
        kc = torch.arange(place % k, n_reg[1], k)
        kr, kc = torch.meshgrid(kr, kc, indexing="ij")
        kr, kc = kr.flatten(), kc.flatten()
        start_row, start_col = kr * R - shift[1], kc * R - shift[0]
        low = torch.stack([start_col.clamp(min=0), start_row.clamp(min=0)], 1).double() - 0.5
        high = torch.stack([(start_col + R).clamp(max=cols),
                            (start_row + R).clamp(max=rows)], 1).double() - 0.5
        keep = (high > low).all(dim=1)
        kr, kc, low, high = kr[keep], kc[keep], low[keep], high[keep]
        start_row, start_col = start_row[keep], start_col[keep]
        G = len(kr)
        if G == 0:                     # this place of the blocks misses a small image
            self.step_count += 1
            return
        group = torch.full(n_reg, -1, dtype=torch.long)
        group[kr, kc] = torch.arange(G)
        U = C * G
        if int(self.alive.view(C, -1).sum(dim=1).max()) + G > self.capacity:
            self._grow()
        M = self.capacity
        n_units = torch.arange(U)
        unit_chain = n_units // G
        low, high = low.repeat(C, 1), high.repeat(C, 1)
        area = (high - low).prod(dim=1)
        origin = torch.stack([start_col, start_row], 1).repeat(C, 1)   # (U, 2) pixels

        # the stars of the active regions
        index = torch.nonzero(self.alive).squeeze(1)
        locs = self.locs[index]
        reg = torch.floor((locs + 0.5 + shift.double()) / R).long()
        reg_r, reg_c = reg[:, 1].clamp(0, n_reg[0] - 1), reg[:, 0].clamp(0, n_reg[1] - 1)
        star_group = group[reg_r, reg_c]
        active = star_group >= 0
        index, locs = index[active], locs[active]
        unit = (index // M) * G + star_group[active]
        fluxes = self.fluxes[index]
        n = torch.bincount(unit, minlength=U)

        # the move of each region, and a star chosen uniformly in it
        moves = torch.searchsorted(self.cumulative, torch.rand(U, generator=g, dtype=torch.float64),
                                   right=True).clamp(max=4)
        key = torch.rand(len(index), generator=g, dtype=torch.float64)
        first_pos = _argmax_by_unit(key, unit, U)              # position in `index` or -1
        has = first_pos >= 0
        fp = first_pos.clamp(min=0)
        first = torch.where(has, index[fp] if len(index) else torch.zeros(U, dtype=torch.long), -1)
        x0 = locs[fp] if len(index) else torch.zeros(U, 2, dtype=torch.float64)
        f0 = fluxes[fp] if len(index) else torch.ones(U, self.bands, dtype=torch.float64)
        log_mu_area = math.log(prior.mu) + area.log()
        nd = n.double()
        in_region = _inside(low, high)

        # --- move: a random walk whose scale is one of `step_scales` (chosen at random)
        # times the photon-noise scales; its density is the mixture over the scales
        scales = self.step_scales[torch.randint(len(self.step_scales), (U,), generator=g)]
        flux_sd, pos_sd = self._flux_sd(f0, scales), self._position_sd(f0, scales)
        new_logf = f0.log() + flux_sd * torch.randn(U, self.bands, generator=g, dtype=torch.float64)
        f_move = new_logf.exp()
        x_move = x0 + pos_sd[:, None] * torch.randn(U, 2, generator=g, dtype=torch.float64)
        log_q_forward = (self._log_move_density(f0, new_logf - f0.log(), x_move - x0)
                         - new_logf.sum(1))
        log_q_back = (self._log_move_density(f_move, f0.log() - new_logf, x0 - x_move)
                      - f0.log().sum(1))
        ratio_move = log_q_back - log_q_forward
        ok_move = has & in_region(x_move)

        # --- birth (from the prior) and death
        x_birth = low + (high - low) * torch.rand(U, 2, generator=g, dtype=torch.float64)
        f_birth = prior.sample_fluxes(U, generator=g).double()
        f_birth[:, 0] = f_birth[:, 0].clamp(prior.f_min, prior.f_max)   # float32 rounding
        log_bd = self.log_p[2] - self.log_p[1]
        ratio_birth = log_mu_area - (nd + 1).log() + log_bd
        ratio_death = -log_mu_area + nd.clamp(min=1).log() - log_bd

        # --- split
        ref = f0[:, 0]
        low_fraction = (prior.f_min / ref).clamp(max=0.5)
        width = 1 - 2 * low_fraction
        fraction = torch.rand(U, self.bands, generator=g, dtype=torch.float64)
        fraction[:, 0] = low_fraction + width * fraction[:, 0]
        separation = s.split_scale * torch.randn(U, 2, generator=g, dtype=torch.float64)
        u1 = fraction[:, :1]
        x_c1, x_c2 = x0 + (1 - u1) * separation, x0 - u1 * separation
        f_c1, f_c2 = fraction * f0, (1 - fraction) * f0
        ok_split = has & (width > 0) & in_region(x_c1) & in_region(x_c2)
        log_q_split = -width.clamp(min=1e-300).log() + _log_normal(separation, s.split_scale).sum(1)
        # the reverse merge picks the pair {c1, c2} among the region's n + 1 stars
        others = index != first[unit] if len(index) else torch.zeros(0, dtype=torch.bool)
        lw_c1 = self._log_weight(locs, x_c1[unit])
        lw_c2 = self._log_weight(locs, x_c2[unit])
        lw_12 = self._log_weight(x_c1, x_c2)
        log_w1 = torch.logaddexp(lw_12, _logsumexp_by_unit(lw_c1[others], unit[others], U))
        log_w2 = torch.logaddexp(lw_12, _logsumexp_by_unit(lw_c2[others], unit[others], U))
        log_pair_split = (-(nd + 1).log() + lw_12 + torch.logaddexp(-log_w1, -log_w2))
        log_jacobian = f0.log().sum(1)
        log_sm = self.log_p[4] - self.log_p[3]
        ratio_split = (math.log(prior.mu) + log_jacobian + log_sm
                       + log_pair_split + nd.clamp(min=1).log() - math.log(2) - log_q_split)

        # --- merge: a second star j near the first, i
        lw_first = self._log_weight(locs, x0[unit])
        gumbel = -torch.log(-torch.log(torch.rand(len(index), generator=g, dtype=torch.float64)))
        second_key = torch.where(others, lw_first + gumbel,
                                 torch.tensor(-math.inf, dtype=torch.float64))
        second_pos = _argmax_by_unit(second_key, unit, U)
        has_two = has & (n >= 2) & (second_pos >= 0)
        sp = second_pos.clamp(min=0)
        second = torch.where(has_two, index[sp] if len(index) else torch.zeros(U, dtype=torch.long),
                             -1)
        x1 = locs[sp] if len(index) else torch.zeros(U, 2, dtype=torch.float64)
        f1 = fluxes[sp] if len(index) else torch.ones(U, self.bands, dtype=torch.float64)
        log_wi = _logsumexp_by_unit(lw_first[others], unit[others], U)
        not_second = index != second[unit] if len(index) else others
        lw_second = self._log_weight(locs, x1[unit])
        log_wj = _logsumexp_by_unit(lw_second[not_second], unit[not_second], U)
        lw_ij = self._log_weight(x0, x1)
        log_pair_merge = -nd.clamp(min=1).log() + lw_ij + torch.logaddexp(-log_wi, -log_wj)
        f_merge = f0 + f1
        w_merge = f0[:, :1] / f_merge[:, :1]
        x_merge = w_merge * x0 + (1 - w_merge) * x1
        width_merge = (1 - 2 * prior.f_min / f_merge[:, 0]).clamp(min=1e-300)
        log_q_reverse = -width_merge.log() + _log_normal(x0 - x1, s.split_scale).sum(1)
        ratio_merge = (-math.log(prior.mu) - f_merge.log().sum(1) - log_sm
                       - (nd - 1).clamp(min=1).log() + math.log(2) + log_q_reverse
                       - log_pair_merge)

        # --- the prior's flux densities, for all the moves at once
        lp0, lp_move, lp_c1, lp_c2, lp_merge, lp1 = prior.flux_log_density(
            torch.stack([f0, f_move, f_c1, f_c2, f_merge, f1])).unbind(0)
        ratio_move = ratio_move + lp_move - lp0
        ratio_split = ratio_split + lp_c1 + lp_c2 - lp0
        ratio_merge = ratio_merge + lp_merge - lp0 - lp1

        # --- the proposals as removed and added stars
        is_move, is_birth, is_death, is_split, is_merge = (moves == k for k in range(5))
        none = torch.full((U,), -1, dtype=torch.long)
        remove = torch.stack([torch.where(is_birth, none, first),
                              torch.where(is_merge, second, none)], 1)
        add_locs = torch.stack([torch.where(is_move[:, None], x_move,
                                torch.where(is_birth[:, None], x_birth,
                                torch.where(is_split[:, None], x_c1, x_merge))), x_c2], 1)
        add_fluxes = torch.stack([torch.where(is_move[:, None], f_move,
                                  torch.where(is_birth[:, None], f_birth,
                                  torch.where(is_split[:, None], f_c1, f_merge))), f_c2], 1)
        ok = torch.stack([ok_move, torch.ones(U, dtype=torch.bool), has, ok_split, has_two],
                         1).gather(1, moves[:, None]).squeeze(1)
        ratio = torch.stack([ratio_move, ratio_birth, ratio_death, ratio_split, ratio_merge],
                            1).gather(1, moves[:, None]).squeeze(1)
        adds = torch.stack([~is_death, is_split], 1) & ok[:, None]
        removes = (remove >= 0) & ok[:, None]
        ratio = torch.where(ok & ~torch.isnan(ratio), ratio,
                            torch.tensor(-math.inf, dtype=torch.float64))

        # --- the likelihood over each region's window
        delta_ll, window, delta = self._delta_log_likelihood(
            unit_chain, origin, remove, removes, add_locs, add_fluxes, adds)
        log_alpha = ratio + delta_ll
        accept = torch.log(torch.rand(U, generator=g, dtype=torch.float64)) < log_alpha
        self.proposed += np.bincount(moves.numpy(), minlength=5)
        self.accepted += np.bincount(moves[accept].numpy(), minlength=5)

        # --- apply the accepted proposals
        slot0 = torch.where(is_birth, -1, first)
        need = accept & (is_birth | is_split)
        rank = (need.view(C, G).cumsum(1) - 1).flatten()
        free = torch.argsort(self.alive.view(C, M).int(), dim=1, stable=True)
        new_slot = unit_chain * M + free[unit_chain, rank.clamp(min=0)]
        slot0 = torch.where(is_birth, new_slot, slot0)
        slot1 = new_slot
        gone = remove[removes & accept[:, None]]
        self.alive[gone] = False
        for column, slots in ((0, slot0), (1, slot1)):
            take = adds[:, column] & accept
            self.locs[slots[take]] = add_locs[take, column]
            self.fluxes[slots[take]] = add_fluxes[take, column]
            self.alive[slots[take]] = True
        self.model.index_add_(0, window[accept].flatten(), delta[accept].flatten())
        self.step_count += 1

    def _flux_sd(self, fluxes, scales):
        """Log-flux step of each band: ``flux_step`` times ``scales`` (one per star) times
        the relative photon noise, at most 1."""
        noise = (fluxes + self.sky_area).sqrt() / fluxes
        return (self.s.flux_step * scales[..., None] * noise).clamp(max=1.0)

    def _position_sd(self, fluxes, scales):
        """Position step: ``position_step`` times ``scales`` times the photon noise of the
        reference flux relative to the flux, in pixels (the PSF's width is about a pixel),
        at most 1."""
        ref = fluxes[..., 0]
        noise = (ref + self.sky_area[0]).sqrt() / ref
        return (self.s.position_step * scales * noise).clamp(max=1.0)

    def _log_move_density(self, fluxes, log_flux_step, position_step):
        """Log density of a move's steps (log-flux and position) from stars of
        ``fluxes``: the mixture over `step_scales`."""
        scales = self.step_scales[:, None]                            # (K, 1)
        flux_sd = self._flux_sd(fluxes[None], scales)                 # (K, U, B)
        pos_sd = self._position_sd(fluxes[None], scales)              # (K, U)
        log_density = (_log_normal(log_flux_step[None], flux_sd).sum(-1)
                       + _log_normal(position_step[None], pos_sd[..., None]).sum(-1))
        return torch.logsumexp(log_density, dim=0) - math.log(len(self.step_scales))

    def _log_weight(self, a, b):
        """Log of the merge kernel between positions ``a`` and ``b``."""
        return -((a - b) ** 2).sum(-1) / (2 * self.s.split_scale ** 2)

    def _delta_log_likelihood(self, unit_chain, origin, remove, removes, add_locs, add_fluxes,
                              adds):
        """The change of log-likelihood of each unit's proposal over its window, the
        window's flat canvas indices and the change of the model there."""
        U = len(unit_chain)
        G = U // self.n_chains                       # regions per chain (units repeat them)
        S, R, half = self.s.stamp_size, self.region, self.half
        width = R + 2 * half
        safe = remove.clamp(min=0)
        locs = torch.cat([self.locs[safe], add_locs], 1)              # (U, 4, 2)
        fluxes = torch.cat([-self.fluxes[safe] * removes[..., None],
                            add_fluxes * adds[..., None]], 1)         # (U, 4, B)
        fluxes = torch.where(torch.isfinite(fluxes), fluxes, torch.zeros_like(fluxes))
        unit, slot = torch.nonzero(torch.cat([removes, adds], 1), as_tuple=True)
        locs, fluxes = locs[unit, slot], fluxes[unit, slot]          # the changed stars only
        rows, cols = self.canvas_shape
        grid = torch.arange(width)
        corner = origin[:G] + self.pad - half                         # window top-left
        window_rc = ((corner[:, 1, None] + grid)[:, :, None] * cols
                     + (corner[:, 0, None] + grid)[:, None, :]).reshape(G, 1, -1)
        band_offset = (torch.arange(self.bands) * rows * cols)[None, :, None]
        data_index = window_rc + band_offset                          # (G, B, width^2)
        window = (data_index[None] + (torch.arange(self.n_chains) * self.bands * rows
                                      * cols)[:, None, None, None]).reshape(U, self.bands, -1)
        delta = torch.zeros(U, self.bands, width * width, dtype=torch.float64)
        stamp_grid = (torch.arange(S)[:, None] * width + torch.arange(S)[None, :]).flatten()
        for b in range(self.bands):
            nearest, stamps = self._stamps(locs, b)
            local = (nearest - origin[unit]).clamp(0, R - 1)
            offsets = (local[:, 1] * width + local[:, 0])[:, None] + stamp_grid
            delta[:, b].index_put_((unit[:, None].expand_as(offsets), offsets),
                                   stamps * fluxes[:, b:b + 1], accumulate=True)
        # the data are the same in every chain: gathered once, broadcast over chains
        x = self.data[data_index][None]
        weight = self.weight[data_index][None]
        # a PSF image's negative wings can make a bright star's model negative; the
        # likelihood's rate is floored in both states, as the simulator floors it at 0
        before = self.model[window].view(self.n_chains, G, self.bands, -1)
        after = (before + delta.view_as(before)).clamp(min=_MIN_RATE)
        before = before.clamp(min=_MIN_RATE)
        change = 0.5 * weight * ((x - before) ** 2 / before - (x - after) ** 2 / after
                                 + (before / after).log())
        change = change.view(U, self.bands, -1)
        return change.sum(dim=(1, 2)), window, delta


def _inside(low, high):
    """A test of positions (U, 2) against each unit's box ``[low, high)``."""
    def test(locs):
        return ((locs >= low) & (locs < high)).all(dim=1)
    return test


def _log_normal(value, sd):
    """Log density of Normal(0, sd^2) at ``value``."""
    sd = torch.as_tensor(sd, dtype=torch.float64)
    return -0.5 * (value / sd) ** 2 - sd.log() - 0.5 * _LOG_2PI


def _argmax_by_unit(values, unit, n_units):
    """Position in ``values`` of the largest value of each unit (-1 where a unit has
    none, or only -inf)."""
    best = torch.full((n_units,), -math.inf, dtype=torch.float64)
    best = best.scatter_reduce(0, unit, values, reduce="amax")
    found = torch.full((n_units,), -1, dtype=torch.long)
    hit = (values == best[unit]) & torch.isfinite(values)
    found[unit[hit]] = torch.nonzero(hit).squeeze(1)
    return found


def _logsumexp_by_unit(values, unit, n_units):
    """Log of the sum of ``exp(values)`` within each unit (-inf for none)."""
    best = torch.full((n_units,), -math.inf, dtype=torch.float64)
    best = best.scatter_reduce(0, unit, values, reduce="amax")
    shift = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    total = torch.zeros(n_units, dtype=torch.float64).index_add_(
        0, unit, (values - shift[unit]).exp())
    return total.log() + shift
