"""Render images of star fields from catalogs, and simulate star fields from the prior."""

import numpy as np
import torch
from astropy import units as u

from .images import StarFieldImage, as_background
from .prior import StarCatalogBatch, StarFieldPrior, batch_to_table, _seed_int
from .psf import as_psf, pixel_stamps
from .validation import check_memory, check_shape

__all__ = ["StarFieldRenderer", "add_noise", "as_background", "simulate_starfield"]

# coefficient-map values rendered at once (`StarFieldRenderer.render`): about 1.5 MB
_CHUNK_VALUES = 400_000


class StarFieldRenderer:
    """Render the light of stars through one PSF per band, fast and with sub-pixel accuracy.

    The pixel-integrated PSF stamp of a star at sub-pixel offset ``(dx, dy)`` from a pixel
    centre is tabulated on a grid of offsets and compressed by a singular value
    decomposition into ``K`` basis stamps, ``stamp(dx, dy) = sum_k c_k(dx, dy) B_k``;
    the coefficients are interpolated bilinearly between grid offsets, which keeps the
    flux (each stamp sums to one) and the centroid exact. An image is then ``K`` sparse
    coefficient maps convolved with the basis stamps by FFT, whatever the number of stars.

    Parameters
    ----------
    psfs : list
        One PSF per band (anything `starnet.psf.as_psf` accepts).
    stamp_size : int, optional
        Odd width in pixels of the PSF stamp; light beyond it is dropped and each stamp
        is normalised to unit sum.
    phase_steps : int, optional
        Number of steps of the offset grid across one pixel.
    tolerance : float, optional
        Largest relative error of the low-rank representation of the tabulated stamps
        (Frobenius norm).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from starnet import PowerLawPSF
    >>> from starnet.simulate import StarFieldRenderer
    >>> psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    >>> renderer = StarFieldRenderer([psf], stamp_size=15)
    >>> locs = torch.tensor([[[10.3, 12.7]]])          # one image, one star at x=10.3, y=12.7
    >>> fluxes = torch.tensor([[[1000.0]]])
    >>> image = renderer.render(locs, fluxes, torch.ones(1, 1, dtype=bool), (25, 25))
    >>> print(f"{float(image.sum()):.1f}")
    1000.0
    """

    def __init__(self, psfs, *, stamp_size=25, phase_steps=32, tolerance=1e-4):
        if stamp_size % 2 != 1 or stamp_size < 3:
            raise ValueError(f"stamp_size must be an odd integer >= 3, got {stamp_size}")
        self.psfs = [as_psf(psf) for psf in psfs]
        self.stamp_size = int(stamp_size)
        self.phase_steps = int(phase_steps)
        self.tolerance = float(tolerance)
        self._coefficients = []
        self._bases = []
        for psf in self.psfs:
            coefficients, basis = self._decompose(psf)
            self._coefficients.append(coefficients)
            self._bases.append(basis)
        self._basis_fft = {}

    @property
    def n_bands(self):
        return len(self.psfs)

    @property
    def ranks(self):
        """Number of basis stamps used for each band."""
        return [basis.shape[0] for basis in self._bases]

    def _decompose(self, psf):
        steps, size = self.phase_steps, self.stamp_size
        offsets = np.linspace(-0.5, 0.5, steps + 1)
        dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
        stamps = pixel_stamps(psf, size, dx.ravel(), dy.ravel())
        stamps = stamps / stamps.sum(axis=(1, 2), keepdims=True)
        left, singular, right = np.linalg.svd(stamps.reshape(len(stamps), -1),
                                              full_matrices=False)
        residual = np.sqrt(np.cumsum((singular**2)[::-1])[::-1]) / np.sqrt((singular**2).sum())
        rank = int(np.argmax(np.append(residual[1:], 0.0) <= self.tolerance)) + 1
        coefficients = left[:, :rank] * singular[:rank]
        basis = right[:rank].reshape(rank, size, size)
        # truncation changes each stamp's sum by up to ~tolerance: restore unit sums
        coefficients /= (coefficients @ basis.sum(axis=(1, 2)))[:, None]
        coefficients = coefficients.reshape(steps + 1, steps + 1, rank)
        return (torch.from_numpy(coefficients).float(), torch.from_numpy(basis).float())

    def _fft_shape(self, shape):
        # circular convolution of the (n + 2 half) canvas: wrap-around stays out of the
        # cropped output as long as the transform is at least that long
        pad = 2 * (self.stamp_size // 2)
        return tuple(_fast_length(n + pad) for n in shape)

    def _basis_transform(self, band, fft_shape):
        key = (band, fft_shape)
        if key not in self._basis_fft:
            self._basis_fft[key] = torch.fft.rfft2(self._bases[band], s=fft_shape)
        return self._basis_fft[key]

    def render(self, locs, fluxes, mask, shape):
        """Noiseless star light of a batch of catalogs.

        Parameters
        ----------
        locs : `torch.Tensor`, shape (n_images, n_stars, 2)
            ``(x, y)`` pixel positions; stars may lie outside the image.
        fluxes : `torch.Tensor`, shape (n_images, n_stars, n_bands)
            Fluxes in electrons.
        mask : `torch.Tensor` of bool, shape (n_images, n_stars)
            Which slots hold stars.
        shape : tuple of int
            ``(rows, cols)`` of the images.

        Returns
        -------
        images : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
        """
        rows, cols = check_shape(shape)
        n_images = locs.shape[0]
        if fluxes.shape[-1] != self.n_bands:
            raise ValueError(f"fluxes have {fluxes.shape[-1]} bands but the renderer has "
                             f"{self.n_bands} PSFs")
        for values, what in ((locs, "positions"), (fluxes, "fluxes")):
            finite = torch.isfinite(values).all(dim=-1)
            if not bool(finite[mask].all()):
                raise ValueError(f"{int((~finite & mask).sum())} stars have non-finite "
                                 f"{what} (NaN or infinite); expected finite values")
        half = self.stamp_size // 2
        canvas = (rows + 2 * half, cols + 2 * half)
        locs, fluxes = locs.float(), fluxes.float()
        nearest = torch.round(locs)
        offset = locs - nearest
        col = nearest[..., 0].long() + half
        row = nearest[..., 1].long() + half
        inside = mask & (col >= 0) & (col < canvas[1]) & (row >= 0) & (row < canvas[0])
        # the stars only (a batch's catalogs are padded to its fullest): in image order
        image_of, slot = torch.nonzero(inside, as_tuple=True)
        pixel = (row * canvas[1] + col)[image_of, slot]
        offset, fluxes = offset[image_of, slot], fluxes[image_of, slot]
        n_pixels = canvas[0] * canvas[1]

        fft_shape = self._fft_shape(shape)
        images = torch.empty(n_images, self.n_bands, rows, cols)
        for band in range(self.n_bands):
            table = self._coefficients[band]
            values = self._interpolate(table, offset) * fluxes[:, band, None]
            rank = table.shape[-1]
            # a few images at a time: their maps and spectra stay in the cache
            # (16 images of 64 x 64 rendered in one go took twice as long on 2 cores)
            step = max(1, _CHUNK_VALUES // (rank * n_pixels))
            bounds = torch.searchsorted(image_of, torch.arange(0, n_images + step, step))
            for k, start in enumerate(range(0, n_images, step)):
                stars = slice(int(bounds[k]), int(bounds[k + 1]))
                n = min(step, n_images - start)
                index = (((image_of[stars, None] - start) * rank + torch.arange(rank)) * n_pixels
                         + pixel[stars, None])
                maps = torch.zeros(n * rank * n_pixels).index_add_(0, index.flatten(),
                                                                   values[stars].flatten())
                spectrum = (torch.fft.rfft2(maps.reshape(n, rank, *canvas), s=fft_shape)
                            * self._basis_transform(band, fft_shape)).sum(dim=1)
                full = torch.fft.irfft2(spectrum, s=fft_shape)
                images[start:start + n, band] = full[:, 2 * half:2 * half + rows,
                                                     2 * half:2 * half + cols]
        return images

    def _interpolate(self, table, offset):
        """Basis coefficients (..., rank) at sub-pixel offsets (..., 2) in [-0.5, 0.5],
        bilinear between the tabulated offsets of ``table``."""
        position = (offset + 0.5).clamp(0, 1) * self.phase_steps
        lower = position.floor().clamp(max=self.phase_steps - 1)
        weight = position - lower
        ix, iy = lower[..., 0].long(), lower[..., 1].long()
        wx, wy = weight[..., 0:1].to(table.dtype), weight[..., 1:2].to(table.dtype)
        return ((1 - wy) * (1 - wx) * table[iy, ix] + (1 - wy) * wx * table[iy, ix + 1]
                + wy * (1 - wx) * table[iy + 1, ix] + wy * wx * table[iy + 1, ix + 1])

    def stamps(self, locs, band, *, dtype=torch.float32):
        """The unit-flux stamps that `render` adds for stars at ``locs``.

        Parameters
        ----------
        locs : `torch.Tensor`, shape (n, 2)
            ``(x, y)`` pixel positions.
        band : int
            Index of the band.
        dtype : `torch.dtype`, optional
            Type of the stamps (the tables are float32; float64 sums more exactly).

        Returns
        -------
        nearest : `torch.Tensor` of long, shape (n, 2)
            The pixel ``(col, row)`` nearest each star: the centre of its stamp.
        stamps : `torch.Tensor`, shape (n, stamp_size, stamp_size)
            ``stamps[k, i, j]`` is the light of star ``k`` in pixel
            ``(row, col) = nearest[k, ::-1] + (i, j) - stamp_size // 2``; each sums to one.
        """
        nearest = torch.floor(locs + 0.5)
        coeffs = self._interpolate(self._coefficients[band].to(dtype), (locs - nearest).to(dtype))
        basis = self._bases[band].to(dtype)
        stamps = coeffs @ basis.reshape(basis.shape[0], -1)
        return nearest.long(), stamps.reshape(-1, self.stamp_size, self.stamp_size)


def _fast_length(n):
    """Smallest integer >= n with no prime factor above 5 (fast FFT length)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def add_noise(expected, *, noise="gaussian", generator=None):
    """Draw an image given its expected electron counts ``expected``.

    ``noise="gaussian"`` draws Normal(lambda, lambda), the model's approximation of
    Poisson noise; ``noise="poisson"`` draws exact Poisson counts; ``noise=None``
    returns ``expected`` unchanged.
    """
    if noise is None:
        return expected
    if torch.any(expected < 0):
        raise ValueError("expected counts must be non-negative to add noise")
    if noise == "gaussian":
        return expected + expected.sqrt() * torch.randn(expected.shape, generator=generator)
    if noise == "poisson":
        return torch.poisson(expected, generator=generator)
    raise ValueError(f"noise must be 'gaussian', 'poisson' or None, got {noise!r}")


def simulate_starfield(shape, *, prior=None, psf, background, noise="gaussian", seed=None,
                       margin=0.0, stamp_size=25, density=None, renderer=None):
    """Simulate an image of a star field and its true catalog from the generative model.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` of the image.
    prior : `~starnet.StarFieldPrior`, optional
        Prior over catalogs; by default the paper's M2 prior in bands r and i.
    psf : PSF or list of PSF
        One PSF for every band, or one per band (`~starnet.PowerLawPSF`, photutils
        `~photutils.psf.ImagePSF`, or a 2-D array image of the PSF).
    background : float, sequence or array
        Background in electrons per pixel: a scalar, one value per band, or a
        (bands, rows, cols) map.
    noise : {'gaussian', 'poisson', None}, optional
        Normal(lambda, lambda) (the model's likelihood), exact Poisson, or no noise.
    seed : int, optional
        Seed of the random draws.
    margin : float, optional
        Stars are also drawn within ``margin`` pixels outside the image and shine into
        it; they are in the catalog too (with ``x`` or ``y`` outside the image).
    stamp_size : int, optional
        Width of the rendered PSF stamp in pixels.
    density : array, shape (rows, cols), optional
        Stars per pixel at each pixel, in place of the prior's ``mu`` (e.g. a cluster's
        radial profile): the count of each pixel is Poisson with this mean, positions
        uniform within the pixel. Margin pixels take the density of the nearest edge
        pixel.
    renderer : `StarFieldRenderer`, optional
        A renderer of ``psf`` to reuse (building one takes most of the time of a small
        image); by default one is built from ``psf`` and ``stamp_size``.

    Returns
    -------
    image : `~astropy.nddata.NDData`
        ``data`` of shape (bands, rows, cols) in electrons including the background;
        ``meta`` holds ``bands``, ``psf`` (one per band) and ``background``, the form
        `~starnet.StarNetDeblender` takes.
    catalog : `~astropy.table.QTable`
        The true catalog: ``x``, ``y`` and ``flux_<band>`` in electrons.

    Examples
    --------
    >>> from starnet import PowerLawPSF, StarFieldPrior, simulate_starfield
    >>> psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    >>> image, truth = simulate_starfield((40, 40), prior=StarFieldPrior(mu=0.05),
    ...                                   psf=psf, background=[686.0, 1123.0], seed=0)
    >>> image.data.shape
    (2, 40, 40)
    >>> image.meta["bands"]
    ['r', 'i']
    """
    prior = StarFieldPrior() if prior is None else prior
    shape = check_shape(shape)
    # the light, its expectation and the noisy image, float64
    check_memory(3 * 8 * prior.n_bands * shape[0] * shape[1],
                 f"a simulated image of {shape[0]} x {shape[1]} pixels")
    psfs = list(psf) if isinstance(psf, (list, tuple)) else [psf] * prior.n_bands
    if len(psfs) != prior.n_bands:
        raise ValueError(f"got {len(psfs)} PSFs for {prior.n_bands} bands {prior.bands}")
    background = as_background(background, prior.n_bands, shape)
    generator = torch.Generator().manual_seed(_seed_int(seed))
    if density is None:
        batch = prior.sample_batch(1, shape, margin=margin, generator=generator)
    else:
        batch = _sample_density(prior, density, shape, margin, generator)
    if renderer is None:
        renderer = StarFieldRenderer(psfs, stamp_size=stamp_size)
    stars = renderer.render(batch.locs, batch.fluxes, batch.mask, shape)[0].double()
    expected = stars + torch.from_numpy(np.array(background.reshape(prior.n_bands, -1, 1)
                                                 if background.ndim == 1 else background))
    data = add_noise(expected.clamp(min=0), noise=noise, generator=generator).numpy()
    meta = {"bands": list(prior.bands), "psf": renderer.psfs, "background": background,
            "prior": prior.to_dict(), "seed": seed}
    return (StarFieldImage(data, unit=u.electron, meta=meta),
            batch_to_table(batch, 0, prior.bands))


def _sample_density(prior, density, shape, margin, generator):
    """One catalog whose stars per pixel follow the map ``density`` (see
    `simulate_starfield`), as a `~starnet.prior.StarCatalogBatch`."""
    density = np.asarray(density, dtype=float)
    if density.shape != tuple(shape) or not np.all(np.isfinite(density)) or np.any(density < 0):
        raise ValueError(f"density must be a map of non-negative stars per pixel of the "
                         f"image's shape {tuple(shape)}, got shape {density.shape}")
    pad = int(np.ceil(margin))
    padded = torch.from_numpy(np.pad(density, pad, mode="edge"))
    counts = torch.poisson(padded, generator=generator).long().flatten()
    pixels = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    rows, cols = pixels // padded.shape[1], pixels % padded.shape[1]
    offsets = torch.rand(len(pixels), 2, generator=generator, dtype=torch.float64) - 0.5
    locs = torch.stack([cols, rows], dim=1).double() - pad + offsets
    keep = ((locs >= -0.5 - margin) & (locs < torch.tensor([shape[1], shape[0]]) - 0.5 + margin)
            ).all(dim=1)
    locs = locs[keep].float()
    fluxes = prior.sample_fluxes(len(locs), generator=generator)
    mask = torch.ones(1, len(locs), dtype=torch.bool)
    return StarCatalogBatch(locs=locs[None], fluxes=fluxes[None], mask=mask)
