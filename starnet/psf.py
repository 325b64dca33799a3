"""
Point spread functions: the SDSS power-law PSF, the SDSS KL PSF, PSF
images, and pixel-integrated PSF stamps.

Three kinds of PSF are accepted wherever starnet needs one (see
`as_psf`):

* a `PowerLawPSF` (or any other 2-D `astropy.modeling` model with
  ``flux``, ``x_0`` and ``y_0`` parameters) giving the *point* value of
  the PSF; `pixel_stamps` integrates it over pixels;
* a `photutils.psf.ImagePSF` (or a photutils model whose class name ends
  in ``'PRF'``), which is already integrated over pixels;
* a 2-D `numpy.ndarray`: a pixel-integrated PSF image centred on its
  central pixel, wrapped in an `~photutils.psf.ImagePSF`.

An SDSS ``psField`` file describes the PSF of each band twice: the
power-law fit of HDU 6 (`PowerLawPSF.from_psfield`) and the
Karhunen-Loeve (KL) PSF of HDUs 1-5, which varies with the position in
the frame (`kl_psf_from_psfield`, an `~photutils.psf.ImagePSF`).
"""

import functools
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.modeling import Fittable2DModel, Model, Parameter
from photutils.psf import GriddedPSFModel, ImagePSF
from scipy.optimize import brentq

__all__ = ['PowerLawPSF', 'kl_psf_from_psfield', 'pixel_stamps', 'as_psf',
           'psf_fwhm', 'stamp_light', 'choose_stamp_size', 'psf_to_dict',
           'psf_from_dict']

SDSS_BANDS = 'ugriz'
_SHAPE_NAMES = ('sigma1', 'sigma2', 'sigmap', 'beta', 'b', 'p0')


def _check_band(band):
    if not isinstance(band, str) or len(band) != 1 \
            or band not in SDSS_BANDS:
        msg = f"band must be one of 'u', 'g', 'r', 'i', 'z'; got {band!r}"
        raise ValueError(msg)
    return SDSS_BANDS.index(band)


def _check_beta(beta):
    if np.any(np.asarray(beta) <= 2):
        msg = (f'beta must be > 2 for the power-law wing to have a finite '
               f'integral; got beta={beta}')
        raise ValueError(msg)


class PowerLawPSF(Fittable2DModel):
    r"""
    The SDSS power-law PSF: two Gaussians plus a power-law wing.

    This is the PSF model of the SDSS photometric pipeline (Xin et al.
    2018; eq. 7 of Liu, Regier et al. 2023), with the parameters stored
    in HDU 6 of an SDSS psField file (see `from_psfield`).

    The model gives the *point* value of the PSF (not integrated over
    pixels; see `pixel_stamps` for that), normalised so that its integral
    over the whole plane equals ``flux``. The shape parameters are fixed
    by default, so that photutils PSF photometry fits only ``flux``,
    ``x_0`` and ``y_0``.

    Parameters
    ----------
    flux : float, optional
        Total flux (integral over the plane).
    x_0, y_0 : float, optional
        Position of the centre (x = column, y = row, pixels).
    sigma1, sigma2 : float, optional
        Standard deviations of the core and the second Gaussian (pixels).
    sigmap : float, optional
        Width of the power-law wing (pixels).
    beta : float, optional
        Power-law index; must be > 2.
    b : float, optional
        Amplitude of the second Gaussian relative to the core.
    p0 : float, optional
        Amplitude of the power-law wing relative to the core.
    bbox_factor : float, optional
        Half-width of the bounding box in units of the FWHM.
    **kwargs : dict, optional
        Passed to `astropy.modeling.Model`.

    Notes
    -----
    With :math:`r^2 = (x - x_0)^2 + (y - y_0)^2`, the profile is

    .. math::

        P(r) \propto e^{-r^2 / 2 \sigma_1^2}
            + b\, e^{-r^2 / 2 \sigma_2^2}
            + p_0 \left(1 + \frac{r^2}{\beta \sigma_P^2}\right)^{-\beta/2},

    normalised analytically by its integral
    :math:`2\pi\sigma_1^2 + 2\pi b \sigma_2^2
    + 2\pi p_0 \beta \sigma_P^2 / (\beta - 2)`. (The factor
    :math:`1 / (1 + b + p_0)` of the SDSS definition cancels in this
    normalisation.) The wing holds a sizeable part of the flux when
    :math:`\beta` is close to 2, so a finite stamp holds less than
    ``flux``.

    Examples
    --------
    >>> from starnet.psf import PowerLawPSF
    >>> psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=2.0, beta=3.0,
    ...                   b=0.1, p0=0.01)
    >>> print(f'{psf.fwhm:.3f}')
    2.498
    >>> print(f'{psf(0.0, 0.0):.4f}')
    0.1012
    """

    flux = Parameter(default=1, description='Total flux')
    x_0 = Parameter(default=0, description='Position of the centre along x')
    y_0 = Parameter(default=0, description='Position of the centre along y')
    sigma1 = Parameter(default=1, fixed=True,
                       description='Sigma of the core Gaussian (pixels)')
    sigma2 = Parameter(default=3, fixed=True,
                       description='Sigma of the second Gaussian (pixels)')
    sigmap = Parameter(default=3, fixed=True,
                       description='Width of the power-law wing (pixels)')
    beta = Parameter(default=3, fixed=True,
                     description='Power-law index (> 2)')
    b = Parameter(default=0.1, fixed=True,
                  description='Relative amplitude of the second Gaussian')
    p0 = Parameter(default=0.01, fixed=True,
                   description='Relative amplitude of the power-law wing')

    def __init__(self, *, flux=flux.default, x_0=x_0.default,
                 y_0=y_0.default, sigma1=sigma1.default,
                 sigma2=sigma2.default, sigmap=sigmap.default,
                 beta=beta.default, b=b.default, p0=p0.default,
                 bbox_factor=6.0, **kwargs):
        for name, value in (('sigma1', sigma1), ('sigma2', sigma2),
                            ('sigmap', sigmap)):
            if not value > 0:
                msg = f'{name} must be > 0 (pixels); got {value}'
                raise ValueError(msg)
        for name, value in (('b', b), ('p0', p0)):
            if not value >= 0:
                msg = f'{name} must be >= 0; got {value}'
                raise ValueError(msg)
        _check_beta(beta)
        super().__init__(flux=flux, x_0=x_0, y_0=y_0, sigma1=sigma1,
                         sigma2=sigma2, sigmap=sigmap, beta=beta, b=b,
                         p0=p0, **kwargs)
        self.bbox_factor = bbox_factor

    @classmethod
    def from_psfield(cls, path, *, band, **kwargs):
        """
        Read the power-law PSF of one band from an SDSS psField file.

        Parameters
        ----------
        path : str or path-like
            The psField FITS file; HDU 6 holds the columns
            ``psf_sigma1``, ``psf_sigma2``, ``psf_sigmap``, ``psf_beta``,
            ``psf_b`` and ``psf_p0`` (one value per band, in ugriz order).
        band : str
            One of ``'u'``, ``'g'``, ``'r'``, ``'i'``, ``'z'``.
        **kwargs : dict, optional
            Other arguments of `PowerLawPSF` (e.g. ``flux``).

        Returns
        -------
        psf : `PowerLawPSF`

        Examples
        --------
        >>> from importlib.resources import files
        >>> from starnet.psf import PowerLawPSF
        >>> path = (files('starnet') / 'datasets' / 'data' / 'sdss'
        ...         / 'psField-002583-2-0136.fit')
        >>> psf = PowerLawPSF.from_psfield(path, band='r')
        >>> print(f'{psf.sigma1.value:.3f} {psf.fwhm:.3f}')
        0.880 2.143
        """
        iband = _check_band(band)
        with fits.open(path) as hdul:
            row = hdul[6].data[0]
            params = {name: float(np.ravel(row[f'psf_{name}'])[iband])
                      for name in _SHAPE_NAMES}
        return cls(**params, **kwargs)

    def _profile(self, r):
        """Unnormalised radial profile at radius ``r`` (pixels)."""
        r2 = np.square(r)
        return (np.exp(-0.5 * r2 / self.sigma1.value ** 2)
                + self.b.value * np.exp(-0.5 * r2 / self.sigma2.value ** 2)
                + self.p0.value * (1 + r2 / (self.beta.value
                                             * self.sigmap.value ** 2))
                ** (-0.5 * self.beta.value))

    @property
    def fwhm(self):
        """
        The full width at half maximum (pixels), found numerically.

        This is the FWHM of the point profile. The ``psf_width`` column of
        a psField file is a different quantity: the width of the Gaussian
        with the same effective area (``0.6643 * sqrt(n_eff)``) for the
        2-Gaussian fit, about 20% larger than this FWHM for SDSS PSFs.
        """
        half = 0.5 * self._profile(0.0)
        upper = max(self.sigma1.value, self.sigma2.value, self.sigmap.value)
        while self._profile(upper) > half:
            upper *= 2
        return 2 * brentq(lambda r: self._profile(r) - half, 0.0, upper,
                          xtol=1e-10)

    @property
    def bounding_box(self):
        """
        The bounding box: ``bbox_factor`` times the FWHM on each side of
        the centre.
        """
        delta = self.bbox_factor * self.fwhm
        return ((self.y_0 - delta, self.y_0 + delta),
                (self.x_0 - delta, self.x_0 + delta))

    @staticmethod
    def evaluate(x, y, flux, x_0, y_0, sigma1, sigma2, sigmap, beta, b, p0):
        """
        Evaluate the PSF (point values) at ``x``, ``y``.

        Parameters
        ----------
        x, y : array_like
            Coordinates (pixels).
        flux, x_0, y_0, sigma1, sigma2, sigmap, beta, b, p0 : float
            The model parameters.

        Returns
        -------
        values : `~numpy.ndarray`
            ``flux`` times the unit-integral profile.
        """
        _check_beta(beta)
        r2 = (x - x_0) ** 2 + (y - y_0) ** 2
        norm = 2 * np.pi * (sigma1 ** 2 + b * sigma2 ** 2
                            + p0 * beta * sigmap ** 2 / (beta - 2))
        profile = (np.exp(-0.5 * r2 / sigma1 ** 2)
                   + b * np.exp(-0.5 * r2 / sigma2 ** 2)
                   + p0 * (1 + r2 / (beta * sigmap ** 2)) ** (-0.5 * beta))
        return flux / norm * profile


_KL_COLUMNS = ('RROWS', 'RNROW', 'RNCOL', 'c', 'nrow_b', 'ncol_b')


@functools.lru_cache(maxsize=16)
def _read_kl_basis(path, iband):
    """
    The KL basis of one band of a psField file (read once per file).

    Returns the eigen-images, shape ``(n, rnrow, rncol)``, and for each
    one the coefficients ``C[p, q]`` of ``row**p * col**q`` (positions in
    units of 1000 pixels), both float64 and read-only.
    """
    hdu = iband + 1
    with fits.open(path) as hdul:
        if len(hdul) <= hdu or not isinstance(hdul[hdu], fits.BinTableHDU):
            msg = (f'{Path(path).name} has no binary table in HDU {hdu} '
                   f'(the KL PSF of band {SDSS_BANDS[iband]!r}); expected an '
                   'SDSS psField file')
            raise ValueError(msg)
        table = hdul[hdu].data
        missing = [name for name in _KL_COLUMNS
                   if name.lower() not in map(str.lower, table.names)]
        if missing or len(table) == 0:
            msg = (f'HDU {hdu} of {Path(path).name} is not a KL PSF basis: '
                   f'it lacks the columns {missing} or has no rows; expected '
                   f'the columns {list(_KL_COLUMNS)} of an SDSS psField file')
            raise ValueError(msg)
        shape = (int(table['RNROW'][0]), int(table['RNCOL'][0]))
        eigen, coeffs = [], []
        for row in table:
            if (int(row['RNROW']), int(row['RNCOL'])) != shape:
                msg = (f'the KL eigen-images of HDU {hdu} of '
                       f'{Path(path).name} differ in shape')
                raise ValueError(msg)
            image = np.asarray(row['RROWS'], dtype=float)
            eigen.append(image[:shape[0] * shape[1]].reshape(shape))
            # numpy's c[p, q] multiplies row**p * col**q: the variation of
            # this field's stars says so (see kl_psf_from_psfield's notes)
            c = np.asarray(row['c'], dtype=float)
            coeffs.append(c[:int(row['nrow_b']), :int(row['ncol_b'])])
    eigen = np.stack(eigen)
    eigen.flags.writeable = False
    for c in coeffs:
        c.flags.writeable = False
    return eigen, tuple(coeffs)


def _centroid(stamp):
    """First moment (x, y) of a stamp, relative to its central pixel."""
    offsets = np.arange(stamp.shape[0], dtype=float) - stamp.shape[0] // 2
    total = stamp.sum()
    return (float(np.sum(stamp.sum(axis=0) * offsets) / total),
            float(np.sum(stamp.sum(axis=1) * offsets) / total))


def kl_psf_from_psfield(path, *, band, row, col, size=25,
                        recenter=False):
    r"""
    The SDSS KL PSF of one band at a position of the frame.

    The SDSS photometric pipeline (PHOTO) describes the PSF of each band
    and field by a Karhunen-Loeve (KL) basis of eigen-images (HDUs 1-5 of
    the psField file, for u, g, r, i, z) whose weights are polynomials in
    the row and the column of the frame. This PSF is built from the
    field's own stars; the power law of HDU 6 (`PowerLawPSF.from_psfield`)
    is a fit to it.

    Parameters
    ----------
    path : str or path-like
        The psField FITS file.
    band : str
        One of ``'u'``, ``'g'``, ``'r'``, ``'i'``, ``'z'``.
    row, col : float
        Position in the frame (0-based pixel coordinates, the centre of the
        first pixel at 0, as photutils' ``y`` and ``x``).
    size : int, optional
        Odd width of the returned image, from 5 to the size of the
        eigen-images (51 for SDSS); the centre is cut out of the
        eigen-images.
    recenter : bool, optional
        PHOTO centres the KL PSF on its peak: the peak (and the centroid
        of the central 3 x 3 pixels) lies within 0.01 pixel of the centre
        of the central pixel, as for the other PSFs of starnet. Its wings
        are slightly asymmetric, so the first moment over 25 x 25 pixels
        is offset by a few hundredths of a pixel (in this field: r +0.04
        in x, -0.02 to -0.03 in y; i +0.06, -0.05). `True` shifts the image
        (cubic spline of the full eigen-image, photutils'
        `~photutils.psf.ImagePSF` interpolation) so that its first moment
        over the ``size`` x ``size`` image is at the centre instead. Such a
        shift moves 1.5-3 % of the light (half the L1 difference).

    Returns
    -------
    psf : `~photutils.psf.ImagePSF`
        The pixel-integrated PSF sampled on the pixel grid (``size`` x
        ``size``, float64, centred on the central pixel, ``flux=1``,
        ``x_0 = y_0 = 0``), normalised to unit sum over the image. It is
        accepted wherever starnet takes a PSF (`as_psf`, `pixel_stamps`,
        `psf_to_dict`, `~starnet.simulate.StarFieldRenderer`).

    Raises
    ------
    ValueError
        For an unknown band, an even or out-of-range ``size``, a position
        that is not finite, or a file without a KL basis in the band's HDU.
    TypeError
        If ``row`` or ``col`` is not a number.

    Notes
    -----
    With :math:`u = 10^{-3}(\mathrm{row} + 0.5)` and
    :math:`v = 10^{-3}(\mathrm{col} + 0.5)` (PHOTO counts pixels from 0.5),
    the PSF is

    .. math::

        P = \sum_k \Big(\sum_{p, q} C_{k,pq}\, u^p v^q\Big)\, E_k,

    with :math:`E_k` the eigen-images (column ``RROWS``) and
    :math:`C_{k,pq}` the first ``nrow_b`` x ``ncol_b`` terms of the
    column ``c`` as numpy reads it (``c[p, q]``, ``p`` the power of the
    row). photoop's ``sdss_psf_recon`` and pydl read the transpose
    (``c[q, p]``); the stars of run 2583, camcol 2, field 136 decide for
    this order: the r-band weight of the first varying eigen-image,
    fitted star by star on 136 isolated stars, follows this order's
    prediction across the frame (correlation +0.7) and not the
    transpose's (-0.5), and the fits' chi^2 is 25 % lower. (Only bands
    with ``nrow_b`` or ``ncol_b`` > 1 depend on the order; this field's i
    band is constant.) The 25 x 25 PSF images distributed with the
    StarNet paper's data for that field are this reconstruction at row
    600, column 500 (photoop's at its documented example position, row
    500, column 600), to float32 precision. The
    reconstruction sums to about 1 (e.g. 1.017 over 51 x 51 pixels in r);
    the eigen-images have small negative wings, so the central 25 x 25
    pixels hold slightly more (1.019). The SDSS eigen-images are pixel
    images: `pixel_stamps` samples them at the pixel centres (cubic spline
    for sub-pixel shifts) and does not integrate over pixels again.

    The polynomial is a fit over the frame (1489 x 2048 pixels for SDSS);
    positions outside it are extrapolated.

    Examples
    --------
    >>> from importlib.resources import files
    >>> from starnet.psf import kl_psf_from_psfield, pixel_stamps
    >>> path = (files('starnet') / 'datasets' / 'data' / 'sdss'
    ...         / 'psField-002583-2-0136.fit')
    >>> psf = kl_psf_from_psfield(path, band='r', row=680.0, col=360.0)
    >>> psf.data.shape
    (25, 25)
    >>> print(f'{psf.data.sum():.6f} {psf.data.max():.4f}')
    1.000000 0.1396
    >>> stamp = pixel_stamps(psf, 15, 0.3, -0.2)[0]
    >>> print(f'{stamp.sum():.3f}')
    0.991
    """
    iband = _check_band(band)
    try:
        row, col = float(row), float(col)
    except (TypeError, ValueError) as err:
        msg = f'row and col must be numbers (pixels); got {row!r}, {col!r}'
        raise TypeError(msg) from err
    if not (np.isfinite(row) and np.isfinite(col)):
        msg = f'row and col must be finite; got {row}, {col}'
        raise ValueError(msg)
    eigen, coeffs = _read_kl_basis(str(path), iband)
    limit = min(eigen.shape[1:])
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
            or size % 2 == 0 or not 5 <= size <= limit:
        msg = (f'size must be an odd integer from 5 to {limit} (the size of '
               f'the KL eigen-images); got {size!r}')
        raise ValueError(msg)
    u, v = 1e-3 * (row + 0.5), 1e-3 * (col + 0.5)
    weights = [np.sum(c * np.outer(u ** np.arange(c.shape[0]),
                                   v ** np.arange(c.shape[1])))
               for c in coeffs]
    full = np.tensordot(weights, eigen, axes=1)
    centre = np.array(full.shape) // 2
    half = size // 2
    stamp = full[centre[0] - half:centre[0] + half + 1,
                 centre[1] - half:centre[1] + half + 1]
    if recenter:
        model = ImagePSF(full, origin=(centre[1], centre[0]))
        grid = np.arange(size, dtype=float) - half
        shift = np.zeros(2)
        for _ in range(10):
            dx, dy = _centroid(stamp)
            if max(abs(dx), abs(dy)) < 1e-6:
                break
            shift += (dx, dy)
            stamp = model(grid[None, :] + shift[0], grid[:, None] + shift[1])
    stamp = np.array(stamp, dtype=float)
    return ImagePSF(stamp / stamp.sum(),
                    name=f'SDSS KL PSF {band} (row {row:g}, col {col:g})')


def as_psf(psf):
    """
    Validate a PSF and return it as an astropy model.

    Parameters
    ----------
    psf : `PowerLawPSF`, `~photutils.psf.ImagePSF`, 2-D model or ndarray
        A 2-D `astropy.modeling.Model` with ``flux``, ``x_0`` and ``y_0``
        parameters is returned unchanged. A 2-D `numpy.ndarray` is a
        pixel-integrated PSF image centred on its central pixel; it must
        be finite, not all zero and at least 4 x 4.

    Returns
    -------
    psf : `astropy.modeling.Model`
        The model, or an `~photutils.psf.ImagePSF` (``x_0 = y_0 = 0`` at
        the centre of the array) for an array.

    Raises
    ------
    TypeError
        If ``psf`` is neither an array nor a suitable model.
    ValueError
        If an array is not 2-D, not finite, all zero or smaller than 4 x 4.

    Examples
    --------
    >>> import numpy as np
    >>> from starnet.psf import as_psf
    >>> image = np.zeros((5, 5))
    >>> image[2, 2] = 1.0
    >>> model = as_psf(image)
    >>> type(model).__name__, model.origin.tolist()
    ('ImagePSF', [2.0, 2.0])
    """
    if isinstance(psf, np.ndarray):
        if psf.ndim != 2:
            msg = f'a PSF image must be a 2-D array; got shape {psf.shape}'
            raise ValueError(msg)
        if not np.all(np.isfinite(psf)):
            msg = 'a PSF image must contain only finite values (no NaN/inf)'
            raise ValueError(msg)
        if not np.any(psf):
            msg = 'a PSF image must not be all zero'
            raise ValueError(msg)
        if min(psf.shape) < 4:
            msg = (f'a PSF image must be at least 4 x 4 pixels (to be interpolated); '
                   f'got {psf.shape[0]} x {psf.shape[1]}')
            raise ValueError(msg)
        return ImagePSF(psf.astype(float))
    if isinstance(psf, GriddedPSFModel):
        msg = ('a GriddedPSFModel varies with position; pass the ImagePSF '
               'of one position instead')
        raise TypeError(msg)
    if isinstance(psf, Model) and psf.n_inputs == 2 \
            and {'flux', 'x_0', 'y_0'} <= set(psf.param_names):
        return psf
    msg = ('psf must be a PowerLawPSF, a photutils ImagePSF, a 2-D astropy '
           'model with flux, x_0 and y_0 parameters, or a 2-D numpy array; '
           f'got {type(psf).__name__}')
    raise TypeError(msg)


def psf_fwhm(psf, *, step=0.05):
    """
    Full width at half maximum of a PSF, in pixels.

    The exact FWHM of a `PowerLawPSF`; for any other PSF the diameter of
    the circle whose area is that of the region above half the peak,
    measured on a grid of ``step`` pixels (exact for a circular profile).
    A pixel-integrated PSF (an `~photutils.psf.ImagePSF`, a PSF image) is
    measured as it is, so slightly wider than its point profile.

    Parameters
    ----------
    psf : `PowerLawPSF`, `~photutils.psf.ImagePSF`, 2-D model or ndarray
        Anything `as_psf` accepts.
    step : float, optional
        Grid step in pixels.

    Examples
    --------
    >>> from photutils.psf import CircularGaussianPRF, CircularGaussianPSF
    >>> from starnet.psf import psf_fwhm
    >>> print(f'{psf_fwhm(CircularGaussianPSF(fwhm=2.5)):.1f}')
    2.5
    >>> print(f'{psf_fwhm(CircularGaussianPRF(fwhm=2.5)):.1f}')  # pixel-integrated
    2.6
    """
    model = as_psf(psf)
    if isinstance(model, PowerLawPSF):
        return model.fwhm
    model = model.copy()
    model.x_0, model.y_0, model.flux = 0.0, 0.0, 1.0
    half = 12.0
    if isinstance(model, ImagePSF):
        half = max(model.data.shape) / 2 / np.max(model.oversampling)
    grid = np.arange(-half, half + step / 2, step)
    values = model(grid[None, :], grid[:, None])
    area = np.count_nonzero(values >= values.max() / 2) * step**2
    return 2 * np.sqrt(area / np.pi)


def stamp_light(psf, size):
    """
    Fraction of a PSF's light inside a ``size`` x ``size`` pixel stamp centred on it.

    Training images are rendered with stamps of this size, renormalised to the
    star's flux: what the stamp leaves out is put in the core instead (see
    `~starnet.simulate.StarFieldRenderer`). The whole light is that of a stamp of
    255 pixels (or of the whole array of an image PSF).

    Parameters
    ----------
    psf : `PowerLawPSF`, `~photutils.psf.ImagePSF`, 2-D model or ndarray
        Anything `as_psf` accepts.
    size : int
        Odd stamp width, pixels.

    Examples
    --------
    A Moffat PSF of FWHM 3.5 pixels with photutils' ``alpha = 3`` has wide wings:

    >>> from photutils.psf import MoffatPSF
    >>> from starnet.psf import stamp_light
    >>> moffat = MoffatPSF(alpha=3.0, beta=2.367)
    >>> print(f"{stamp_light(moffat, 25):.3f} {stamp_light(moffat, 41):.3f}")
    0.986 0.996
    """
    return _enclosed_light(psf, [size])[0]


def _enclosed_light(psf, sizes):
    model = as_psf(psf)
    whole = 255
    if isinstance(model, ImagePSF):
        whole = max(whole, *(2 * (np.array(model.data.shape) // (2 * model.oversampling))
                             + 1))
    stamp = pixel_stamps(model, int(whole), [0.0], [0.0])[0]
    centre = whole // 2
    total = stamp.sum()
    return [float(stamp[centre - s // 2:centre + s // 2 + 1,
                        centre - s // 2:centre + s // 2 + 1].sum() / total) for s in sizes]


def choose_stamp_size(psfs, *, light=0.995, smallest=25, largest=65):
    """
    The smallest odd stamp width, from ``smallest`` up, that holds ``light`` of
    every PSF's light (at most ``largest``).

    Parameters
    ----------
    psfs : PSF or list of PSF
        Anything `as_psf` accepts, or one per band.
    light : float, optional
        Fraction of the light to hold.
    smallest, largest : int, optional
        Odd bounds of the width, pixels.

    Examples
    --------
    >>> from photutils.psf import CircularGaussianPRF, MoffatPSF
    >>> from starnet.psf import choose_stamp_size
    >>> choose_stamp_size(CircularGaussianPRF(fwhm=4.0)), choose_stamp_size(
    ...     MoffatPSF(alpha=3.0, beta=2.367))
    (25, 39)
    """
    psfs = list(psfs) if isinstance(psfs, (list, tuple)) else [psfs]
    if not 0 < light < 1:
        raise ValueError(f"light must be a fraction between 0 and 1, got {light!r}")
    sizes = list(range(int(smallest), int(largest) + 1, 2))
    if not sizes or sizes[0] % 2 == 0:
        raise ValueError(f"need odd smallest <= largest, got {smallest} and {largest}")
    held = np.min([_enclosed_light(psf, sizes) for psf in psfs], axis=0)
    return sizes[int(np.argmax(held >= light))] if np.any(held >= light) else sizes[-1]


def _is_pixel_integrated(model):
    return (isinstance(model, ImagePSF)
            or type(model).__name__.endswith('PRF'))


def pixel_stamps(psf, size, dx, dy, *, oversample=5):
    """
    Stamps of the PSF integrated over pixels, for sub-pixel offsets.

    Parameters
    ----------
    psf : `PowerLawPSF`, `~photutils.psf.ImagePSF`, 2-D model or ndarray
        Anything `as_psf` accepts. Point-value models are integrated over
        each pixel with ``oversample`` x ``oversample`` Gauss-Legendre
        points; pixel-integrated PSFs (`~photutils.psf.ImagePSF`, arrays,
        photutils ``*PRF`` models) are evaluated at pixel centres.
    size : int
        Odd stamp size; the star's reference pixel is ``size // 2``.
    dx, dy : float or array_like, shape (n,)
        Offsets of the stars from the centre of the central pixel
        (x = column, y = row; pixels).
    oversample : int, optional
        Gauss-Legendre points per pixel and axis for point-value models.

    Returns
    -------
    stamps : `~numpy.ndarray`, shape (n, size, size)
        ``stamps[k, row, col]``: the PSF of unit flux (not renormalised
        to the stamp) centred at ``(size // 2 + dx[k], size // 2 + dy[k])``.

    Examples
    --------
    >>> from starnet.psf import PowerLawPSF, pixel_stamps
    >>> psf = PowerLawPSF(sigma1=1.5, sigma2=3.0, b=0.1, p0=0.0)
    >>> stamps = pixel_stamps(psf, 31, [0.0, 0.3], [0.0, -0.2])
    >>> stamps.shape
    (2, 31, 31)
    >>> print(f'{stamps[0].sum():.4f}')
    1.0000
    """
    model = as_psf(psf).copy()
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
            or size < 1 or size % 2 == 0:
        msg = f'size must be a positive odd integer; got {size!r}'
        raise ValueError(msg)
    dx = np.atleast_1d(np.asarray(dx, dtype=float))
    dy = np.atleast_1d(np.asarray(dy, dtype=float))
    if dx.ndim != 1 or dx.shape != dy.shape:
        msg = ('dx and dy must be scalars or 1-D arrays of the same length; '
               f'got shapes {dx.shape} and {dy.shape}')
        raise ValueError(msg)
    if not (np.all(np.isfinite(dx)) and np.all(np.isfinite(dy))):
        msg = 'dx and dy must be finite'
        raise ValueError(msg)
    model.flux = 1.0
    model.x_0 = 0.0
    model.y_0 = 0.0
    centres = np.arange(size, dtype=float) - size // 2

    if _is_pixel_integrated(model):
        return np.asarray(model(centres[None, None, :] - dx[:, None, None],
                                centres[None, :, None] - dy[:, None, None]),
                          dtype=float)

    nodes, weights = np.polynomial.legendre.leggauss(oversample)
    sub = (centres[:, None] + 0.5 * nodes[None, :]).ravel()
    weights = 0.5 * weights
    stamps = np.empty((dx.size, size, size))
    chunk = max(1, 2 ** 20 // sub.size ** 2)
    for start in range(0, dx.size, chunk):
        sl = slice(start, start + chunk)
        values = model(sub[None, None, :] - dx[sl, None, None],
                       sub[None, :, None] - dy[sl, None, None])
        values = values.reshape(-1, size, oversample, size, oversample)
        stamps[sl] = np.einsum('nakbl,k,l->nab', values, weights, weights)
    return stamps


def psf_to_dict(psf):
    """
    Describe a PSF with plain JSON-serialisable values.

    Parameters
    ----------
    psf : `PowerLawPSF`, `~photutils.psf.ImagePSF`, a photutils PSF model or 2-D ndarray

    Returns
    -------
    d : dict
        ``{'type': 'PowerLawPSF', <parameter>: float, ...}``,
        ``{'type': 'photutils', 'class': 'CircularGaussianPRF', <parameter>:
        float, ...}`` for an analytic model of `photutils.psf`, or
        ``{'type': 'ImagePSF', 'data': nested lists, 'oversampling':
        [int, int], 'origin': [float, float], 'fill_value': float,
        'flux', 'x_0', 'y_0': float}``.

    Raises
    ------
    TypeError
        For any other PSF model.

    Examples
    --------
    >>> import json
    >>> from starnet.psf import PowerLawPSF, psf_from_dict, psf_to_dict
    >>> text = json.dumps(psf_to_dict(PowerLawPSF(sigma1=1.2)))
    >>> print(psf_from_dict(json.loads(text)).sigma1.value)
    1.2
    """
    psf = as_psf(psf)
    params = {name: float(getattr(psf, name).value)
              for name in psf.param_names}
    if isinstance(psf, PowerLawPSF):
        return {'type': 'PowerLawPSF', **params,
                'bbox_factor': float(psf.bbox_factor)}
    if isinstance(psf, ImagePSF):
        return {'type': 'ImagePSF', **params,
                'data': psf.data.tolist(),
                'oversampling': [int(v) for v in psf.oversampling],
                'origin': [float(v) for v in psf.origin],
                'fill_value': (None if psf.fill_value is None
                               else float(psf.fill_value))}
    if type(psf).__name__ in _photutils_models():
        return {'type': 'photutils', 'class': type(psf).__name__, **params}
    msg = ('only PowerLawPSF, ImagePSF, photutils PSF models '
           f'({", ".join(sorted(_photutils_models()))}) and numpy arrays can be '
           f'saved; got {type(psf).__name__}: render it as an array or an '
           'ImagePSF first')
    raise TypeError(msg)


def _photutils_models():
    """The analytic PSF models of `photutils.psf`, by class name."""
    import photutils.psf
    from astropy.modeling import Fittable2DModel
    # the models defined by their parameters alone (not ImagePSF, GriddedPSFModel)
    return {name: model for name, model in vars(photutils.psf).items()
            if isinstance(model, type) and issubclass(model, Fittable2DModel)
            and model.__module__.endswith("functional_models")}


def psf_from_dict(d):
    """
    Rebuild a PSF from the output of `psf_to_dict`.

    Parameters
    ----------
    d : dict
        As returned by `psf_to_dict`.

    Returns
    -------
    psf : `PowerLawPSF` or `~photutils.psf.ImagePSF`

    Raises
    ------
    ValueError
        If ``d['type']`` is not ``'PowerLawPSF'`` or ``'ImagePSF'``.
    """
    d = dict(d)
    kind = d.pop('type', None)
    if kind == 'PowerLawPSF':
        return PowerLawPSF(**d)
    if kind == 'ImagePSF':
        data = np.asarray(d.pop('data'), dtype=float)
        return ImagePSF(data, **d)
    if kind == 'photutils':
        name = d.pop('class', None)
        models = _photutils_models()
        if name not in models:
            raise ValueError(f"unknown photutils PSF model {name!r}; expected one of "
                             f"{sorted(models)}")
        return models[name](**d)
    msg = f"d['type'] must be 'PowerLawPSF', 'ImagePSF' or 'photutils'; got {kind!r}"
    raise ValueError(msg)
