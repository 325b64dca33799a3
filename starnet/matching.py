"""Compare an estimated star catalog with a true one.

Two matching rules are provided (see `match_catalogs`):

``'one-to-one'`` (default)
    Each star is used at most once. Among all such matchings of pairs that
    satisfy the separation limit (Euclidean distance) and the magnitude limit,
    the one with the largest number of pairs is chosen; ties are broken by the
    smallest total separation. This is solved exactly with the Hungarian
    algorithm (`scipy.optimize.linear_sum_assignment`) on each connected group
    of candidate pairs.

``'any'``
    The rule of the StarNet paper's code: a true star counts as detected if
    *any* estimate lies within the limits, and an estimate counts as correct
    if *any* true star does, using the L-infinity (Chebyshev) distance.
    Several estimates may claim the same true star, so this rule is more
    lenient than ``'one-to-one'``.

Both limits are strict, as in the paper's code: a pair matches when its
separation is ``< max_separation`` and its magnitude difference is
``< max_mag_difference``.

Tables from photutils (`~photutils.psf.PSFPhotometry`, `~photutils.detection.DAOStarFinder`,
...) are read as they are: see `POSITION_COLUMNS`, `SKY_COLUMNS` and `match_catalogs`
for the names looked up. With ``max_separation`` an angle (e.g. ``0.2 * u.arcsec``),
the catalogs are matched on the sky instead of in pixels.
"""

import numbers
from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord, search_around_sky
from astropy.table import QTable, Table
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from . import __version__
from .validation import MemoryLimitError, check_memory

__all__ = ["CatalogMatch", "match_catalogs", "metrics_by_magnitude", "position_columns",
           "POSITION_COLUMNS", "SKY_COLUMNS"]

RULES = ("one-to-one", "any")

#: The most candidate pairs (within the separation limit) that a match takes on.
_MAX_PAIRS = 10_000_000

#: Pixel position columns, in the order they are looked up: the first pair that a
#: table has is used (StarNet and photutils PSF photometry write ``x_fit``, ``y_fit``;
#: simulated truths ``x``, ``y``; photutils finders ``x_centroid``, ``y_centroid``,
#: ``xcentroid``, ``ycentroid`` before photutils 3.0).
POSITION_COLUMNS = (("x_fit", "y_fit"), ("x", "y"), ("x_init", "y_init"),
                    ("x_centroid", "y_centroid"), ("xcentroid", "ycentroid"))

#: Sky position columns, in the order they are looked up: a
#: `~astropy.coordinates.SkyCoord` column named ``skycoord`` or ``sky_centroid`` (as
#: StarNet and photutils write it), else ``ra`` and ``dec`` angle columns.
SKY_COLUMNS = ("skycoord", "sky_centroid", ("ra", "dec"))


@dataclass(frozen=True, eq=False, repr=False)
class CatalogMatch:
    """Result of `match_catalogs`.

    Attributes
    ----------
    tpr : float
        True positive rate (completeness): ``n_matched_true / n_true``.
    ppv : float
        Positive predictive value (purity):
        ``n_matched_estimated / n_estimated``.
    f1 : float
        Harmonic mean ``2 tpr ppv / (tpr + ppv)``, 0 when both are 0.
    n_true, n_estimated : int
        Number of true (reference) and estimated (catalog) sources that
        were compared, i.e. after the border cut.
    n_matched_true, n_matched_estimated : int
        Number of those true and estimated sources that are matched. They are
        equal for the ``'one-to-one'`` rule.
    pairs : `~numpy.ndarray` of int, shape (n_pairs, 2)
        Matched pairs as (catalog row, reference row), indices into the
        original tables (before the border cut), sorted by catalog row. For
        ``'one-to-one'`` each row appears at most once; for ``'any'`` these
        are all pairs that satisfy the limits.
    rule : str
        The matching rule used, ``'one-to-one'`` or ``'any'``.
    """

    tpr: float
    ppv: float
    f1: float
    n_true: int
    n_estimated: int
    n_matched_true: int
    n_matched_estimated: int
    pairs: np.ndarray
    rule: str

    def __repr__(self):
        return (f"<CatalogMatch rule={self.rule!r}: tpr={self.tpr:.3f}, "
                f"ppv={self.ppv:.3f}, f1={self.f1:.3f}; "
                f"matched {self.n_matched_true}/{self.n_true} true, "
                f"{self.n_matched_estimated}/{self.n_estimated} estimated; "
                f"n_pairs={len(self.pairs)}>")


def match_catalogs(catalog, reference, *, max_separation=0.5,
                   max_mag_difference=0.5, band=None, rule="one-to-one",
                   border=None, image_shape=None, wcs=None):
    """Match an estimated catalog to a true (reference) catalog.

    Tables are read as StarNet, photutils and simulations write them, with no
    renaming: a `~photutils.psf.PSFPhotometry` result can be scored as it is.

    Parameters
    ----------
    catalog : `~astropy.table.Table`
        Estimated sources. Pixel positions (x = column, y = row, 0-based,
        photutils convention) come from the first pair of columns of
        `POSITION_COLUMNS` that the table has: ``x_fit``, ``y_fit``; ``x``,
        ``y``; ``x_init``, ``y_init``; ``x_centroid``, ``y_centroid``;
        ``xcentroid``, ``ycentroid``. Sky positions (for matching on the sky)
        come from the first of `SKY_COLUMNS`: a `~astropy.coordinates.SkyCoord`
        column ``skycoord`` or ``sky_centroid``, else ``ra``, ``dec`` angle
        columns; else from the pixel positions through ``wcs``.
    reference : `~astropy.table.Table`
        True sources, with positions in the same way.
    max_separation : float or `~astropy.units.Quantity`, optional
        Separation limit (strict: a pair matches when its distance is
        ``< max_separation``). A number (or a Quantity in pixels) is in
        pixels: Euclidean distance for ``rule='one-to-one'``, L-infinity
        distance (largest of ``|dx|``, ``|dy|``) for ``rule='any'``. An
        angle (e.g. ``0.2 * u.arcsec``) matches on the sky by angular
        separation (candidates from `~astropy.coordinates.search_around_sky`,
        then the same one-to-one assignment); ``rule='any'``, defined in
        pixels, is then refused.
    max_mag_difference : float or None, optional
        Magnitude difference limit (strict). The magnitudes ``mag_<band>`` are
        compared when both tables have them (``mag`` with ``band=None``);
        otherwise fluxes, each table's from the first column it has among
        ``flux_<band>`` (only with a ``band``), ``flux_fit`` (photutils PSF
        photometry) and ``flux``, the magnitude difference then being
        ``2.5 |log10(f1 / f2)|`` (the zero point cancels; fluxes with units
        are converted to a common unit). A non-positive flux never matches.
        `None` disables this criterion (no brightness column is then needed).
    band : str or None, optional
        Band name selecting the brightness columns, e.g. ``'r'``.
    rule : {'one-to-one', 'any'}, optional
        ``'one-to-one'``: the largest number of pairs that satisfy both
        limits with each source used at most once, ties broken by the
        smallest total distance. ``'any'``: the rule of the StarNet paper's
        code, where a true star is detected if any estimate matches it, and
        an estimate is correct if it matches any true star.
    border : float or None, optional
        Width in pixels of a border to drop from both catalogs before
        matching (the paper used 5 with a 100 x 100 image). Needs
        ``image_shape``, and pixel positions (or sky positions and ``wcs``).
        A source is kept when, on each axis,
        ``border < x + 0.5 < n_cols - border`` and
        ``border < y + 0.5 < n_rows - border``. Here ``x + 0.5`` is the
        position measured from the outer edge of the first pixel, the
        coordinate in which the paper's code kept sources strictly between
        5 and 95. ``border=0`` keeps the sources inside the image.
    image_shape : tuple of int or None, optional
        ``(n_rows, n_cols)`` of the image, used only with ``border``.
    wcs : `~astropy.wcs.WCS` or None, optional
        Celestial WCS of the image (0-based pixels, as
        ``wcs.pixel_to_world(x, y)``). It converts the pixel positions of a
        table without sky positions to the sky when matching on the sky, and
        the sky positions of a table without pixel positions to pixels
        otherwise (or for ``border``).

    Returns
    -------
    result : `CatalogMatch`
        Rates, counts and matched pairs. With no true (or no estimated)
        source left, ``tpr`` (or ``ppv``) is 0.

    Raises
    ------
    ValueError
        If a needed column is missing (the message lists the table's
        columns), a position is not finite, or an argument is out of range.

    Examples
    --------
    >>> from astropy.table import QTable, Table
    >>> truth = QTable({'x': [10.0, 20.0, 30.0], 'y': [10.0, 20.0, 30.0],
    ...                 'flux_r': [1000.0, 2000.0, 3000.0]})
    >>> estimate = QTable({'x_fit': [10.2, 20.0, 50.0],
    ...                    'y_fit': [10.1, 20.7, 50.0],
    ...                    'flux_r': [1100.0, 2000.0, 900.0]})
    >>> result = match_catalogs(estimate, truth, band='r')
    >>> print(f"TPR {result.tpr:.3f}, PPV {result.ppv:.3f}")
    TPR 0.333, PPV 0.333
    >>> result.pairs.tolist()
    [[0, 0]]

    A photutils PSF photometry table (``x_fit``, ``y_fit``, ``flux_fit``) is
    read as it is:

    >>> photometry = QTable({'x_fit': [10.2, 29.9], 'y_fit': [10.1, 30.2],
    ...                      'flux_fit': [1100.0, 2900.0]})
    >>> match_catalogs(photometry, truth, band='r').pairs.tolist()
    [[0, 0], [1, 2]]

    On the sky, through the image's WCS (0.4 arcsec pixels):

    >>> from astropy import units as u
    >>> from astropy.wcs import WCS
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ['RA---TAN', 'DEC--TAN']
    >>> wcs.wcs.crval = [150.0, 2.0]
    >>> wcs.wcs.cdelt = [-0.4 / 3600, 0.4 / 3600]
    >>> result = match_catalogs(photometry, truth, band='r', wcs=wcs,
    ...                         max_separation=0.2 * u.arcsec)
    >>> result.pairs.tolist()   # 0.22 and 0.36 pixels: 0.09 and 0.14 arcsec
    [[0, 0], [1, 2]]
    """
    match, _, _ = _match(catalog, reference,
                         max_separation=max_separation,
                         max_mag_difference=max_mag_difference, band=band,
                         rule=rule, border=border, image_shape=image_shape, wcs=wcs)
    return match


def metrics_by_magnitude(catalog, reference, *, bins, band,
                         zero_point=None, nelec_per_nmgy=None,
                         **match_kwargs):
    """TPR and PPV in magnitude bins.

    The catalogs are matched once with `match_catalogs`; true stars are then
    binned by their true magnitude and estimates by their estimated
    magnitude, so a bright true star matched by a faint estimate counts in
    the bright bin of ``tpr`` and in the faint bin of ``ppv``.

    Parameters
    ----------
    catalog, reference : `~astropy.table.Table`
        Estimated and true sources, as for `match_catalogs`.
    bins : array-like
        Increasing magnitude bin edges (at least two). Bins are half-open
        ``[mag_min, mag_max)`` except the last, which includes its upper
        edge (as `numpy.histogram`). Sources outside all bins are ignored
        (but still take part in the matching).
    band : str or None
        Band of the magnitudes: the ``mag_<band>`` column is used when a
        table has it, otherwise it is computed from the first of
        ``flux_<band>``, ``flux_fit`` and ``flux`` (electrons) that the table
        has. With `None`, the columns ``mag``, else ``flux_fit`` or ``flux``.
    zero_point : float or None, optional
        Computes magnitudes from fluxes in electrons as
        ``zero_point - 2.5 log10(flux)``.
    nelec_per_nmgy : float or None, optional
        Electrons per nanomaggy; computes magnitudes from fluxes in
        electrons as ``22.5 - 2.5 log10(flux / nelec_per_nmgy)`` (SDSS
        convention). Give this or ``zero_point`` (not both) when a table has
        no magnitude column.
    **match_kwargs
        Passed to `match_catalogs` (``max_separation``, ``rule``,
        ``border``, ...).

    Returns
    -------
    table : `~astropy.table.QTable`
        One row per bin with columns ``mag_min``, ``mag_max``; ``n_true``
        (true stars in the bin by true magnitude); ``n_estimated``
        (estimates in the bin by estimated magnitude); ``tpr`` (fraction
        of those true stars that are matched) and ``ppv`` (fraction of those
        estimates that are matched), NaN for an empty bin. Sources dropped
        by ``border`` are not counted. ``meta`` records the settings.

    Examples
    --------
    >>> from astropy.table import QTable, Table
    >>> truth = QTable({'x': [10.0, 20.0, 30.0], 'y': [10.0, 20.0, 30.0],
    ...                 'flux_r': [1e5, 1e4, 1e3]})
    >>> estimate = QTable({'x_fit': [10.1, 20.1], 'y_fit': [10.0, 20.0],
    ...                    'flux_r': [1e5, 1e4]})
    >>> table = metrics_by_magnitude(estimate, truth, bins=[15, 20, 25],
    ...                              band='r', zero_point=30.0)
    >>> print(table)  # doctest: +FLOAT_CMP
    mag_min mag_max n_true n_estimated tpr ppv
    ------- ------- ------ ----------- --- ---
       15.0    20.0      1           1 1.0 1.0
       20.0    25.0      2           1 0.5 1.0
    """
    edges = np.asarray(bins, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("bins must be a 1-D array of at least two "
                         f"increasing magnitude edges, got {bins!r}")
    if zero_point is not None and nelec_per_nmgy is not None:
        raise ValueError("give zero_point or nelec_per_nmgy, not both")
    if nelec_per_nmgy is not None:
        if not nelec_per_nmgy > 0:
            raise ValueError("nelec_per_nmgy must be positive, got "
                             f"{nelec_per_nmgy!r}")
        zero_point = 22.5 + 2.5 * np.log10(nelec_per_nmgy)

    true_mag = _magnitudes(reference, band, zero_point, "reference")
    est_mag = _magnitudes(catalog, band, zero_point, "catalog")
    match, keep_est, keep_true = _match(catalog, reference, band=band,
                                        **match_kwargs)

    true_matched = np.zeros(len(reference), dtype=bool)
    est_matched = np.zeros(len(catalog), dtype=bool)
    true_matched[match.pairs[:, 1]] = True
    est_matched[match.pairs[:, 0]] = True

    n_true, tpr = _binned_fraction(true_mag[keep_true],
                                   true_matched[keep_true], edges)
    n_est, ppv = _binned_fraction(est_mag[keep_est],
                                  est_matched[keep_est], edges)
    settings = {key: (str(value) if isinstance(value, u.Quantity) else value)
                for key, value in match_kwargs.items() if key != "wcs"}
    if match_kwargs.get("wcs") is not None:
        settings["wcs"] = match_kwargs["wcs"].to_header_string()
    meta = {"version": __version__, "band": band, "zero_point": zero_point,
            **settings, "rule": match.rule}
    return QTable({"mag_min": edges[:-1], "mag_max": edges[1:],
                   "n_true": n_true, "n_estimated": n_est,
                   "tpr": tpr, "ppv": ppv}, meta=meta)


def _match(catalog, reference, *, max_separation=0.5, max_mag_difference=0.5,
           band=None, rule="one-to-one", border=None, image_shape=None, wcs=None):
    """`match_catalogs`, also returning the border masks of both tables."""
    catalog, reference = _as_table(catalog, "catalog"), _as_table(reference, "reference")
    if band is not None and not isinstance(band, str):
        raise TypeError(f"band must be a band name such as 'r', or None, got {band!r}")
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    limit, on_sky = _separation_limit(max_separation)
    if on_sky and rule != "one-to-one":
        raise ValueError(f"rule={rule!r} uses the L-infinity distance in pixels; give "
                         "max_separation in pixels, or use rule='one-to-one' on the sky")
    if max_mag_difference is not None and not (
            _is_number(max_mag_difference) and max_mag_difference > 0):
        raise ValueError("max_mag_difference must be a positive number or "
                         f"None, got {max_mag_difference!r}")
    if wcs is not None and not getattr(wcs, "has_celestial", False):
        raise ValueError(f"wcs must be a celestial astropy WCS, got {wcs!r}")

    keep_est, keep_true = (_inside(table, name, border, image_shape, wcs)
                           for table, name in ((catalog, "catalog"), (reference, "reference")))
    est_rows = np.flatnonzero(keep_est)
    true_rows = np.flatnonzero(keep_true)

    if on_sky:
        est_sky = _sky_positions(catalog, "catalog", wcs)[est_rows]
        true_sky = _sky_positions(reference, "reference", wcs)[true_rows]
        if len(est_sky) and len(true_sky):
            i, j, sep, _ = search_around_sky(est_sky, true_sky, max_separation)
            dist = sep.to_value(max_separation.unit)
        else:
            i = j = np.zeros(0, dtype=np.intp)
            dist = np.zeros(0)
    else:
        est_xy = _pixel_positions(catalog, "catalog", wcs)[est_rows]
        true_xy = _pixel_positions(reference, "reference", wcs)[true_rows]
        p = 2 if rule == "one-to-one" else np.inf
        est_tree, true_tree = cKDTree(est_xy), cKDTree(true_xy)
        _check_pairs(int(est_tree.count_neighbors(true_tree, limit, p=p)), limit)
        candidates = est_tree.sparse_distance_matrix(true_tree, limit, p=p,
                                                     output_type="ndarray")
        i, j, dist = candidates["i"], candidates["j"], candidates["v"]
    valid = dist < limit
    if max_mag_difference is not None:
        est_mag, true_mag = _comparable_magnitudes(catalog, reference, band)
        mag_diff = np.abs(est_mag[est_rows[i]] - true_mag[true_rows[j]])
        valid &= mag_diff < max_mag_difference
    i, j, dist = i[valid], j[valid], dist[valid]

    if rule == "one-to-one":
        i, j = _max_matching(i, j, dist / limit)
    pairs = np.column_stack([est_rows[i], true_rows[j]]).astype(np.intp)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]

    n_true, n_est = len(true_rows), len(est_rows)
    n_matched_true = len(np.unique(j))
    n_matched_est = len(np.unique(i))
    tpr = n_matched_true / n_true if n_true else 0.0
    ppv = n_matched_est / n_est if n_est else 0.0
    f1 = 2 * tpr * ppv / (tpr + ppv) if tpr + ppv > 0 else 0.0
    match = CatalogMatch(tpr=tpr, ppv=ppv, f1=f1, n_true=n_true,
                         n_estimated=n_est, n_matched_true=n_matched_true,
                         n_matched_estimated=n_matched_est, pairs=pairs,
                         rule=rule)
    return match, keep_est, keep_true


def _separation_limit(max_separation):
    """The limit as a number (pixels, or in the angle's own unit) and whether it is an
    angle (matching on the sky)."""
    on_sky = False
    value = max_separation
    if isinstance(max_separation, u.Quantity):
        if max_separation.unit.physical_type == "angle":
            on_sky, value = True, max_separation.value
        elif max_separation.unit == u.pix:
            value = max_separation.value
        else:
            value = None
    if not (value is not None and _is_number(value) and np.isfinite(value) and value > 0):
        raise ValueError("max_separation must be a positive number of pixels or a "
                         f"positive angle (e.g. 0.2 * u.arcsec), got {max_separation!r}")
    return float(value), on_sky


def _is_number(value):
    """Whether ``value`` is a real number (not a bool or a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_table(table, name):
    """``table`` as an astropy table: a Table as it is, a dict of columns or a numpy
    structured array converted; anything else a TypeError."""
    if isinstance(table, Table):
        return table
    if isinstance(table, dict) or (isinstance(table, np.ndarray) and table.dtype.names):
        return QTable(table)
    raise TypeError(f"{name} must be an astropy Table (or a dict of columns, or a numpy "
                    f"structured array), got {type(table).__name__}")


def _check_pairs(n_pairs, limit):
    """Refuse a match whose candidate pairs would not fit in memory or time."""
    if n_pairs > _MAX_PAIRS:
        raise MemoryLimitError(
            f"{n_pairs} candidate pairs lie within {limit:g} pixels, more than the "
            f"{_MAX_PAIRS} allowed (each needs memory, and a group of them a dense "
            "assignment problem): do the catalogs hold many stars at the same positions "
            "(a duplicated catalog, positions in another unit)?")


def _max_matching(i, j, cost):
    """Maximum-cardinality bipartite matching of minimum total cost.

    ``i``, ``j`` are the two ends of the candidate edges and ``cost`` (in
    [0, 1)) their costs. Each connected group of edges is solved on its own
    with the Hungarian algorithm on a dense ``n x m`` matrix whose forbidden
    pairs cost ``min(n, m) + 1``: replacing a valid pair by a forbidden one
    then always costs more than the whole valid cost of any matching, so the
    number of valid pairs is maximised first and their total cost second.
    """
    if len(i) == 0:
        return i, j
    # Number the nodes of each side compactly, then label the groups.
    rows, i_local = np.unique(i, return_inverse=True)
    cols, j_local = np.unique(j, return_inverse=True)
    n_rows = len(rows)
    graph = coo_matrix((np.ones(len(i)), (i_local, n_rows + j_local)),
                       shape=(n_rows + len(cols),) * 2)
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[i_local]
    order = np.argsort(edge_label, kind="stable")
    starts = np.flatnonzero(np.diff(edge_label[order], prepend=-1))
    ends = np.append(starts[1:], len(order))

    matched_i, matched_j = [], []
    for start, end in zip(starts, ends):
        edges = order[start:end]
        if len(edges) == 1:
            matched_i.append(i[edges])
            matched_j.append(j[edges])
            continue
        gi, gi_local = np.unique(i[edges], return_inverse=True)
        gj, gj_local = np.unique(j[edges], return_inverse=True)
        check_memory(8 * len(gi) * len(gj), f"matching a group of {len(gi)} x {len(gj)} "
                     "stars within reach of each other")
        forbidden = min(len(gi), len(gj)) + 1.0
        costs = np.full((len(gi), len(gj)), forbidden)
        costs[gi_local, gj_local] = cost[edges]
        r, c = linear_sum_assignment(costs)
        ok = costs[r, c] < forbidden
        matched_i.append(gi[r[ok]])
        matched_j.append(gj[c[ok]])
    return np.concatenate(matched_i), np.concatenate(matched_j)


def _position_columns(table):
    """Names of the pixel position columns of a table (see `POSITION_COLUMNS`), or
    None."""
    for xcol, ycol in POSITION_COLUMNS:
        if xcol in table.colnames and ycol in table.colnames:
            return xcol, ycol
    return None


def position_columns(table, name="table"):
    """Names ``(x, y)`` of the pixel position columns of a table: the first pair of
    `POSITION_COLUMNS` that it has.

    Raises
    ------
    ValueError
        If it has none; the message lists its columns.

    Examples
    --------
    >>> from astropy.table import QTable, Table
    >>> position_columns(QTable({'x_init': [1.0], 'y_init': [2.0], 'x_fit': [1.1],
    ...                          'y_fit': [2.1]}))
    ('x_fit', 'y_fit')
    """
    columns = _position_columns(table)
    if columns is None:
        raise ValueError(f"{name} needs pixel position columns (the first of "
                         f"{_POSITION_NAMES}); it has {table.colnames}")
    return columns


_POSITION_NAMES = "; ".join(f"{x!r}, {y!r}" for x, y in POSITION_COLUMNS)


def _pixel_positions(table, name, wcs=None):
    """(n, 2) array of x, y: from the first pair of `POSITION_COLUMNS` present, else
    from the sky positions through ``wcs``."""
    columns = _position_columns(table)
    if columns is None:
        if wcs is not None and _sky_column(table) is not None:
            x, y = wcs.world_to_pixel(_sky_positions(table, name))
            return _finite(np.column_stack([x, y]).reshape(-1, 2), name, "sky positions")
        raise ValueError(f"{name} needs pixel position columns (the first of "
                         f"{_POSITION_NAMES}), or sky positions and wcs=; it has "
                         f"{table.colnames}")
    for col in columns:
        unit = getattr(table[col], "unit", None)
        if unit is not None and u.Unit(unit) not in (u.pix, u.dimensionless_unscaled):
            raise ValueError(f"{name} column {col!r} is in {unit}; positions "
                             "must be pixels (match on the sky with an angle "
                             "max_separation, or convert with wcs.world_to_pixel)")
    xcol, ycol = columns
    xy = np.column_stack([_values(table[xcol], f"{name} {xcol!r}"),
                          _values(table[ycol], f"{name} {ycol!r}")])
    return _finite(xy.reshape(-1, 2), name, f"columns {xcol!r}, {ycol!r}")


def _sky_column(table):
    """The sky position column(s) of a table (see `SKY_COLUMNS`), or None."""
    for entry in SKY_COLUMNS:
        if isinstance(entry, tuple):
            if all(col in table.colnames for col in entry):
                return entry
        elif entry in table.colnames and isinstance(table[entry], SkyCoord):
            return entry
    return None


def _sky_positions(table, name, wcs=None):
    """The sky positions of a table as a `SkyCoord`: from `SKY_COLUMNS`, else from
    the pixel positions through ``wcs``."""
    column = _sky_column(table)
    if column is None:
        if wcs is None:
            raise ValueError(
                f"{name} has no sky positions (a SkyCoord column 'skycoord' or "
                "'sky_centroid', or 'ra', 'dec' angle columns): pass wcs= to convert "
                f"its pixel positions; it has {table.colnames}")
        xy = _pixel_positions(table, name)
        sky = wcs.pixel_to_world(xy[:, 0], xy[:, 1])
    elif isinstance(column, tuple):
        ra, dec = (table[col] for col in column)
        for col, values in zip(column, (ra, dec)):
            if getattr(values, "unit", None) is None or \
                    values.unit.physical_type != "angle":
                raise ValueError(f"{name} column {col!r} needs an angle unit (e.g. deg), "
                                 f"got {getattr(values, 'unit', None)}")
        sky = SkyCoord(ra, dec)
    else:
        sky = table[column]
    if not isinstance(sky, SkyCoord) or sky.isscalar:
        raise ValueError(f"the sky positions of {name} are not a SkyCoord array "
                         f"({type(sky).__name__}); is the WCS celestial?")
    spherical = sky.spherical
    _finite(np.column_stack([spherical.lon.deg, spherical.lat.deg]), name,
            "sky positions")
    return sky


def _finite(xy, name, what):
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"{name} has non-finite positions ({what})")
    return xy


def _inside(table, name, border, image_shape, wcs):
    """Mask of sources kept by the border cut (see `match_catalogs`)."""
    if border is None:
        if image_shape is not None:
            raise ValueError("image_shape is only used together with border")
        return np.ones(len(table), dtype=bool)
    if image_shape is None or len(image_shape) != 2:
        raise ValueError("border needs image_shape=(n_rows, n_cols), got "
                         f"{image_shape!r}")
    if not border >= 0:
        raise ValueError(f"border must be >= 0 pixels, got {border!r}")
    xy = _pixel_positions(table, name, wcs)
    n_rows, n_cols = image_shape
    edge_xy = xy + 0.5  # position from the outer edge of the first pixel
    return ((edge_xy[:, 0] > border) & (edge_xy[:, 0] < n_cols - border)
            & (edge_xy[:, 1] > border) & (edge_xy[:, 1] < n_rows - border))


def _comparable_magnitudes(catalog, reference, band):
    """Magnitudes of both tables, up to a common zero point."""
    mag_col = _mag_column(band)
    if mag_col in catalog.colnames and mag_col in reference.colnames:
        return (_values(catalog[mag_col], f"catalog {mag_col!r}"),
                _values(reference[mag_col], f"reference {mag_col!r}"))
    ours, theirs = (_flux_column(table, band) for table in (catalog, reference))
    if ours is not None and theirs is not None:
        mine = _values(catalog[ours], f"catalog {ours!r}")
        other = _values(reference[theirs], f"reference {theirs!r}")
        unit = getattr(catalog[ours], "unit", None)
        other_unit = getattr(reference[theirs], "unit", None)
        if unit is not None and other_unit is not None:
            try:   # the same star in electrons and in 1000 electrons is the same star
                other = (other * u.Unit(other_unit)).to_value(u.Unit(unit))
            except u.UnitConversionError:
                raise ValueError(f"the catalog's {ours!r} is in {unit} and the reference's "
                                 f"{theirs!r} in {other_unit}, which do not convert") from None
        return _flux_to_mag(mine), _flux_to_mag(other)
    flux_cols = _flux_columns(band)
    missing = []
    for name, table in (("catalog", catalog), ("reference", reference)):
        lacks = [c for c in (mag_col, *flux_cols) if c not in table.colnames]
        missing.append(f"{name} lacks {lacks}")
    hint = (" (pass band=... to use e.g. 'flux_r')" if band is None else "")
    raise ValueError(f"the magnitude criterion needs {mag_col!r} in both tables, or a "
                     f"flux column in both (the first of {list(flux_cols)}); "
                     f"{'; '.join(missing)}{hint}. Columns: catalog {catalog.colnames}, "
                     f"reference {reference.colnames}. Use max_mag_difference=None to "
                     "match on position only")


def _magnitudes(table, band, zero_point, name):
    """Magnitudes of one table for binning (see `metrics_by_magnitude`)."""
    mag_col = _mag_column(band)
    if mag_col in table.colnames:
        return _values(table[mag_col])
    flux_col = _flux_column(table, band)
    if flux_col is None:
        raise ValueError(f"{name} needs a {mag_col!r} column or a flux column (the first "
                         f"of {list(_flux_columns(band))}) for magnitudes; it has "
                         f"{table.colnames}")
    if zero_point is None:
        raise ValueError(f"{name} has no {mag_col!r} column: pass "
                         "nelec_per_nmgy= or zero_point= to compute "
                         f"magnitudes from {flux_col!r}")
    return zero_point + _flux_to_mag(table[flux_col])


def _binned_fraction(mags, flags, edges):
    """Number of sources per bin and the fraction flagged (NaN if empty)."""
    n_bins = len(edges) - 1
    index = np.searchsorted(edges, mags, side="right") - 1
    index[mags == edges[-1]] = n_bins - 1  # the last bin is closed
    inside = (index >= 0) & (index < n_bins)
    counts = np.bincount(index[inside], minlength=n_bins)
    hits = np.bincount(index[inside], weights=flags[inside],
                       minlength=n_bins)
    fraction = np.full(n_bins, np.nan)
    np.divide(hits, counts, out=fraction, where=counts > 0)
    return counts, fraction


def _mag_column(band):
    return "mag" if band is None else f"mag_{band}"


def _flux_columns(band):
    """Flux columns looked up, in order: ``flux_<band>``, ``flux_fit``, ``flux``."""
    return (() if band is None else (f"flux_{band}",)) + ("flux_fit", "flux")


def _flux_column(table, band):
    """The first of `_flux_columns` that ``table`` has, or None."""
    return next((col for col in _flux_columns(band) if col in table.colnames), None)


def _flux_to_mag(flux, name="flux"):
    """-2.5 log10(flux); NaN for a non-positive flux."""
    flux = _values(flux, name)
    mag = np.full(flux.shape, np.nan)
    positive = flux > 0
    mag[positive] = -2.5 * np.log10(flux[positive])
    return mag


def _values(column, name="column"):
    """Column as a float array (the value of a Quantity); masked values are refused."""
    mask = np.ma.getmaskarray(column) if np.ma.isMaskedArray(column) else getattr(
        column, "mask", None)
    if mask is not None and np.any(mask):
        raise ValueError(f"{name} has {int(np.sum(mask))} masked values: drop those rows "
                         "(e.g. table[~table[column].mask]) before matching")
    if isinstance(column, u.Quantity):
        column = column.value
    return np.asarray(getattr(column, "unmasked", column), dtype=float)
