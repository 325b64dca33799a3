"""PSFs as an input of the encoder: a descriptor of any PSF, and families of PSFs to
train one network for many fields.

An encoder built with ``psf_features`` (`starnet.encoder.StarNetEncoder`) reads, beside
the pixels, a short description of each band's PSF: `psf_descriptor`, the PSF's
azimuthally averaged profile on a log scale in ten annuli and its two ellipticities,
computed from the pixel-integrated stamp of any PSF that `starnet.psf.as_psf` accepts.
A `PSFBank` holds the PSFs that training images are rendered with (for SDSS, the
power laws of every field of a run, `photofield_psfs`; analytic profiles for other
surveys) and renders each image with its own, slightly wrong, PSF so that the encoder
learns that the PSF it is told is never exact.
"""

import numpy as np
import torch
from torch.nn import functional as F
from astropy.io import fits
from photutils.psf import GriddedPSFModel, ImagePSF
from scipy.ndimage import gaussian_filter
from scipy.special import ive

from .psf import PowerLawPSF, pixel_stamps, psf_fwhm
from .simulate import StarFieldRenderer
from .validation import check_shape

__all__ = ["DESCRIPTOR_SIZE", "psf_descriptor", "image_descriptors", "widened_psf",
           "photofield_psfs", "PSFBank", "gaussian_blur"]

#: Outer radii (pixels) of the annuli of the profile part of `psf_descriptor`.
ANNULI = (0.5, 1.2, 1.6, 2.5, 3.5, 4.5, 6.0, 8.0, 10.0, 12.5)
#: Numbers per band of `psf_descriptor`.
DESCRIPTOR_SIZE = len(ANNULI) + 2


def psf_descriptor(psf, *, size=25):
    """A short description of a PSF for the encoder.

    The PSF's pixel-integrated stamp (``size`` x ``size``, centred on a pixel centre,
    normalised to unit sum) is averaged in the annuli of `ANNULI` (outer radii 0.5 to
    12.5 pixels); each mean enters as ``(log10(max(mean, 1e-8)) + 4) / 2``, so that the
    numbers are of order one from the core to the far wing. The last two numbers are the
    ellipticities ``e1 = (Ixx - Iyy) / (Ixx + Iyy)`` and ``e2 = 2 Ixy / (Ixx + Iyy)`` of
    the second moments within 4 pixels, times 5.

    Parameters
    ----------
    psf : `~starnet.PowerLawPSF`, `~photutils.psf.ImagePSF`, 2-D model or ndarray
        Anything `starnet.psf.as_psf` accepts.
    size : int, optional
        Odd width of the stamp (at least 25, so that every annulus holds pixels).

    Returns
    -------
    `numpy.ndarray` of float32, shape (DESCRIPTOR_SIZE,)

    Examples
    --------
    >>> from photutils.psf import CircularGaussianPRF
    >>> from starnet.psf_family import psf_descriptor
    >>> narrow = psf_descriptor(CircularGaussianPRF(fwhm=2.0))
    >>> wide = psf_descriptor(CircularGaussianPRF(fwhm=4.0))
    >>> bool(narrow[0] > wide[0]), bool(narrow[6] < wide[6])   # core up, wing down
    (True, True)
    >>> print(abs(narrow[-2:]).max() < 1e-6)                    # round
    True
    """
    if size < 2 * ANNULI[-1]:
        raise ValueError(f"size must be at least {int(2 * ANNULI[-1]) + 1}, got {size}")
    stamp = pixel_stamps(psf, size, [0.0], [0.0])[0]
    stamp = stamp / stamp.sum()
    offsets = np.arange(size) - size // 2
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    radius = np.hypot(dx, dy)
    inner = 0.0
    profile = []
    for outer in ANNULI:
        ring = (radius >= inner) & (radius < outer)
        profile.append((np.log10(max(stamp[ring].mean(), 1e-8)) + 4) / 2)
        inner = outer
    core = np.clip(stamp, 0, None) * (radius < 4)
    ixx, iyy, ixy = (np.sum(core * dx * dx), np.sum(core * dy * dy), np.sum(core * dx * dy))
    shape = [5 * (ixx - iyy) / (ixx + iyy), 5 * 2 * ixy / (ixx + iyy)]
    return np.asarray(profile + shape, dtype=np.float32)


def image_descriptors(psfs, shape, *, tile_size):
    """The PSF input of an encoder with ``psf_features`` for an image: one descriptor per
    band, or a map of them over the tiles where a band's PSF varies.

    A `~photutils.psf.GriddedPSFModel` (photutils' PSF that varies over an image) is
    described at each of its grid points and interpolated bilinearly to the centre of
    every tile (the nearest grid value beyond the grid); any other PSF is one descriptor
    for the whole image.

    Parameters
    ----------
    psfs : list
        One PSF per band: anything `psf_descriptor` takes, or a
        `~photutils.psf.GriddedPSFModel`.
    shape : tuple of int
        ``(rows, cols)`` of the image.
    tile_size : int
        Side of the encoder's tiles in pixels.

    Returns
    -------
    `torch.Tensor` of float32
        Shape (1, bands DESCRIPTOR_SIZE) when no PSF varies, else (1, bands
        DESCRIPTOR_SIZE, tile_rows, tile_cols).

    Examples
    --------
    >>> import numpy as np
    >>> from photutils.psf import CircularGaussianPRF, GriddedPSFModel
    >>> from starnet.psf_family import image_descriptors
    >>> from astropy.nddata import NDData
    >>> y, x = np.mgrid[-12:13, -12:13]
    >>> stamps = [CircularGaussianPRF(fwhm=f)(x, y) for f in (2.5, 2.5, 3.5, 3.5)]
    >>> grid = [(0, 0), (0, 40), (40, 0), (40, 40)]                 # (x, y) of each stamp
    >>> varying = GriddedPSFModel(NDData(np.array(stamps), meta={"grid_xypos": grid,
    ...                                                           "oversampling": 1}))
    >>> tuple(image_descriptors([varying], (40, 40), tile_size=2).shape)
    (1, 12, 20, 20)
    >>> tuple(image_descriptors([CircularGaussianPRF(fwhm=3.0)], (40, 40), tile_size=2).shape)
    (1, 12)
    """
    per_band = [_gridded_descriptors(psf, shape, tile_size) if isinstance(psf, GriddedPSFModel)
                else psf_descriptor(psf) for psf in psfs]
    if all(d.ndim == 1 for d in per_band):
        return torch.from_numpy(np.concatenate(per_band))[None]
    grid = (-(-shape[0] // tile_size), -(-shape[1] // tile_size))
    maps = [d if d.ndim == 3 else np.broadcast_to(d[:, None, None], (len(d), *grid))
            for d in per_band]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(maps)))[None]


def _gridded_descriptors(psf, shape, tile_size):
    """Descriptors (DESCRIPTOR_SIZE, tile_rows, tile_cols) of a GriddedPSFModel at the
    tile centres of an image of ``shape``."""
    oversampling = np.atleast_1d(psf.oversampling)
    described = np.stack([psf_descriptor(ImagePSF(stamp, oversampling=oversampling))
                          for stamp in np.asarray(psf.data)])
    xs, ys = (np.unique(psf.grid_xypos[:, k]) for k in (0, 1))
    if len(xs) * len(ys) != len(described):
        raise ValueError("the GriddedPSFModel's grid points must form a regular grid")
    values = np.zeros((len(ys), len(xs), described.shape[1]))
    for (x, y), d in zip(psf.grid_xypos, described):
        values[np.searchsorted(ys, y), np.searchsorted(xs, x)] = d
    rows = np.arange(-(-shape[0] // tile_size)) * tile_size + (tile_size - 1) / 2
    cols = np.arange(-(-shape[1] // tile_size)) * tile_size + (tile_size - 1) / 2
    if len(ys) == 1 or len(xs) == 1:      # a line or a point: interpolate along it only
        values = np.broadcast_to(values, (max(len(ys), 2), max(len(xs), 2), values.shape[2]))
        ys = ys if len(ys) > 1 else ys[0] + np.array([0.0, 1.0])
        xs = xs if len(xs) > 1 else xs[0] + np.array([0.0, 1.0])
    # bilinear on a regular grid is linear along each axis in turn
    return np.einsum("ry,yxf,cx->frc", _linear_weights(rows, ys), values,
                     _linear_weights(cols, xs), optimize=True).astype(np.float32)


def _linear_weights(points, knots):
    """Matrix (points, knots) of linear interpolation between increasing ``knots`` at
    ``points`` (clipped to the knots' range)."""
    points = np.clip(points, knots[0], knots[-1])
    right = np.clip(np.searchsorted(knots, points, side="right"), 1, len(knots) - 1)
    fraction = (points - knots[right - 1]) / (knots[right] - knots[right - 1])
    weights = np.zeros((len(points), len(knots)))
    index = np.arange(len(points))
    weights[index, right - 1] = 1 - fraction
    weights[index, right] += fraction
    return weights


def widened_psf(psf, factor, *, size=25, oversampling=4):
    """The PSF blurred by a Gaussian so that its FWHM grows by ``factor`` (flux kept).

    A seeing slightly worse than the PSF model says: the pixel-integrated PSF is
    tabulated ``oversampling`` times per pixel and convolved with a Gaussian of
    ``sigma * sqrt(factor**2 - 1)``, ``sigma = FWHM / 2.3548``, so that a Gaussian
    PSF's FWHM grows exactly by ``factor`` (other profiles: about so, wings less).
    Rendering between a PSF and its widened version, with fractions of either sign,
    makes PSFs slightly wider or narrower than a model (`PSFBank`).

    Parameters
    ----------
    psf : PSF
        Anything `starnet.psf.as_psf` accepts.
    factor : float
        Growth of the FWHM, > 1.
    size : int, optional
        Odd width of the table in pixels.
    oversampling : int, optional
        Samples per pixel of the table.

    Returns
    -------
    `~photutils.psf.ImagePSF`
        Pixel-integrated (evaluate it at pixel centres, as `starnet.psf.pixel_stamps`
        does).

    Examples
    --------
    >>> from photutils.psf import CircularGaussianPSF
    >>> from starnet.psf import pixel_stamps, psf_fwhm
    >>> from starnet.psf_family import widened_psf
    >>> wide = widened_psf(CircularGaussianPSF(fwhm=3.0), 1.1)
    >>> print(f"{pixel_stamps(wide, 25, 0.0, 0.0).sum():.4f}")
    1.0000
    """
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    n = oversampling
    sub = (np.arange(n) - (n - 1) / 2) / n
    dy, dx = np.meshgrid(sub, sub, indexing="ij")
    # stamps of a star at -offset sample the PSF at +offset from each pixel centre
    stamps = pixel_stamps(psf, size, -dx.ravel(), -dy.ravel()).reshape(n, n, size, size)
    table = stamps.transpose(2, 0, 3, 1).reshape(size * n, size * n)
    sigma = psf_fwhm(psf) / 2.3548 * np.sqrt(factor ** 2 - 1)
    table = gaussian_filter(table, sigma * n, mode="constant")
    return ImagePSF(table / table.sum() * n ** 2, oversampling=n)


def photofield_psfs(path, bands, *, fields=None):
    """The SDSS power-law PSFs of every field of a run from its photoField file.

    Parameters
    ----------
    path : str or path-like
        A ``photoField-<run>-<camcol>.fits`` file (``PSF_SIGMA1``, ``PSF_SIGMA2``,
        ``PSF_SIGMAP``, ``PSF_BETA``, ``PSF_B``, ``PSF_P0`` per band, in pixels).
    bands : sequence of str
        Bands among ``u, g, r, i, z``.
    fields : sequence of int, optional
        Fields to read (default: all).

    Returns
    -------
    dict
        Field number -> tuple of `~starnet.PowerLawPSF`, one per band.

    Examples
    --------
    >>> from importlib.resources import files
    >>> from starnet.psf_family import photofield_psfs
    >>> path = files("starnet") / "datasets" / "data" / "sdss" / "photoField-002583-2.fits"
    >>> psfs = photofield_psfs(path, ("r", "i"))
    >>> print(len(psfs), f"{psfs[136][0].fwhm:.3f}")
    227 2.143
    """
    columns = {"sigma1": "PSF_SIGMA1", "sigma2": "PSF_SIGMA2", "sigmap": "PSF_SIGMAP",
               "beta": "PSF_BETA", "b": "PSF_B", "p0": "PSF_P0"}
    index = ["ugriz".index(band) for band in bands]
    with fits.open(path) as hdul:
        table = hdul[1].data
        numbers = [int(n) for n in table["FIELD"]]
        values = {name: np.asarray(table[column], dtype=float)
                  for name, column in columns.items()}
    wanted = numbers if fields is None else [int(f) for f in fields]
    missing = sorted(set(wanted) - set(numbers))
    if missing:
        raise ValueError(f"fields {missing} are not in {path}")
    row_of = {n: k for k, n in enumerate(numbers)}
    return {field: tuple(PowerLawPSF(**{name: values[name][row_of[field], i]
                                        for name in columns}) for i in index)
            for field in wanted}


class PSFBank:
    """The PSFs that training images are rendered with, and what the encoder is told.

    Each member is one PSF per band. An image drawn with member ``k`` is rendered through
    that PSF made wider or narrower by a fraction ``t`` in [-1, 1] of ``width_error``,
    while the encoder is told the member's own descriptor, so that the posterior learns
    that a user's PSF is never exact. The widening is the image blurred by the Gaussian
    of `widened_psf` (blurring commutes with rendering); a narrower PSF is the same step
    taken backwards, ``R + t (blur(R) - R)`` with ``t < 0``.

    Parameters
    ----------
    members : sequence of sequences of PSFs
        One tuple of PSFs (one per band) per member.
    stamp_size : int, optional
        Odd stamp width of the renderers.
    width_error : float, optional
        Largest relative error of the told PSF's FWHM.
    phase_steps : int, optional
        Sub-pixel steps of the renderers' tables (`starnet.simulate.StarFieldRenderer`).

    Examples
    --------
    >>> import torch
    >>> from photutils.psf import CircularGaussianPRF
    >>> from starnet.psf_family import PSFBank
    >>> bank = PSFBank([(CircularGaussianPRF(fwhm=f),) for f in (2.5, 4.0)], stamp_size=15)
    >>> locs = torch.tensor([[[7.0, 7.0]], [[7.0, 7.0]]])
    >>> images = bank.render(locs, torch.full((2, 1, 1), 1000.0), torch.ones(2, 1, dtype=bool),
    ...                      (15, 15), members=torch.tensor([0, 1]),
    ...                      errors=torch.zeros(2, 1))
    >>> bool(images[0].max() > images[1].max()), tuple(bank.descriptors.shape)
    (True, (2, 12))
    """

    def __init__(self, members, *, stamp_size=25, width_error=0.03, phase_steps=16):
        self.members = [tuple(member) for member in members]
        if not self.members:
            raise ValueError("a PSFBank needs at least one member")
        n_bands = {len(member) for member in self.members}
        if len(n_bands) != 1:
            raise ValueError(f"every member needs the same number of bands, got {n_bands}")
        self.n_bands = n_bands.pop()
        if not 0 <= width_error < 0.5:
            raise ValueError(f"width_error must be in [0, 0.5), got {width_error}")
        self.width_error = float(width_error)
        self.renderers = [StarFieldRenderer(member, stamp_size=stamp_size,
                                            phase_steps=phase_steps)
                          for member in self.members]
        self.descriptors = torch.stack([
            torch.from_numpy(np.concatenate([psf_descriptor(psf) for psf in member]))
            for member in self.members])
        fwhm = torch.tensor([[psf_fwhm(psf) for psf in member] for member in self.members])
        # sigma of the Gaussian that widens each member's FWHM by 1 + width_error
        self.blur_sigma = fwhm / 2.3548 * np.sqrt((1 + self.width_error) ** 2 - 1)

    def __len__(self):
        return len(self.members)

    def render(self, locs, fluxes, mask, shape, *, members, errors):
        """Star light of each image through its member's PSF, with its width error.

        Parameters
        ----------
        locs, fluxes, mask, shape
            As in `starnet.simulate.StarFieldRenderer.render`.
        members : `torch.Tensor` of int64, shape (n_images,)
            Member of each image.
        errors : `torch.Tensor`, shape (n_images, n_bands)
            Fraction in [-1, 1] of ``width_error`` by which each band's PSF is wider
            (negative: narrower) than the member's.

        Returns
        -------
        `torch.Tensor`, shape (n_images, n_bands, rows, cols)
        """
        members = torch.as_tensor(members)
        images = torch.zeros(len(members), self.n_bands, *check_shape(shape))
        for member in torch.unique(members).tolist():   # one call for each member's images
            index = torch.nonzero(members == member).flatten()
            images[index] = self.renderers[member].render(locs[index], fluxes[index],
                                                          mask[index], shape)
        if self.width_error:
            blurred = gaussian_blur(images, self.blur_sigma[members])
            images = images + errors[..., None, None] * (blurred - images)
        return images


def gaussian_blur(images, sigma):
    """Images blurred by discrete Gaussians, one ``sigma`` per image and band.

    The kernel is the discrete analogue of the Gaussian, ``exp(-t) I_n(t)`` with
    ``t = sigma**2`` (Lindeberg 1990): its variance is exactly ``sigma**2`` for any
    ``sigma``, small ones included, so that the second moment of a blurred star grows by
    exactly ``sigma**2``.

    Parameters
    ----------
    images : `torch.Tensor`, shape (n_images, n_bands, rows, cols)
    sigma : `torch.Tensor`, shape (n_images, n_bands)
        Pixels.

    Returns
    -------
    `torch.Tensor`, same shape as ``images`` (zeros beyond the edges; flux kept away
    from them)

    Examples
    --------
    >>> import torch
    >>> from starnet.psf_family import gaussian_blur
    >>> image = torch.zeros(1, 1, 9, 9)
    >>> image[0, 0, 4, 4] = 1.0
    >>> blurred = gaussian_blur(image, torch.tensor([[0.5]]))
    >>> offsets = torch.arange(9.0) - 4
    >>> print(f"{float(blurred.sum()):.4f} {float(blurred[0, 0].sum(0) @ offsets**2):.4f}")
    1.0000 0.2500
    """
    n, bands, rows, cols = images.shape
    t = np.square(np.asarray(sigma, dtype=float)).reshape(-1, 1)
    radius = int(np.ceil(5 * np.sqrt(t.max()))) + 3    # the tails carry variance
    kernel = torch.from_numpy(ive(np.arange(-radius, radius + 1)[None, :], t)).to(images.dtype)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)          # (n bands, 2 radius + 1)
    flat = images.reshape(1, n * bands, rows, cols)
    flat = F.conv2d(flat, kernel[:, None, None, :], padding=(0, radius), groups=n * bands)
    flat = F.conv2d(flat, kernel[:, None, :, None], padding=(radius, 0), groups=n * bands)
    return flat.reshape(n, bands, rows, cols)
