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
"""

from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.table import QTable
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from . import __version__

__all__ = ["CatalogMatch", "match_catalogs", "metrics_by_magnitude"]

RULES = ("one-to-one", "any")


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
                   border=None, image_shape=None):
    """Match an estimated catalog to a true (reference) catalog.

    Parameters
    ----------
    catalog : `~astropy.table.Table`
        Estimated sources. Positions are read from ``x_fit``, ``y_fit`` if
        present, else from ``x``, ``y`` (pixels, photutils convention).
    reference : `~astropy.table.Table`
        True sources, with positions in the same way.
    max_separation : float, optional
        Separation limit in pixels (strict: a pair matches when its distance
        is ``< max_separation``). Euclidean distance for
        ``rule='one-to-one'``, L-infinity distance (largest of ``|dx|``,
        ``|dy|``) for ``rule='any'``.
    max_mag_difference : float or None, optional
        Magnitude difference limit (strict). The brightness is taken from
        ``mag_<band>`` when both tables have it, else from ``flux_<band>``
        (electrons) when both have it, the magnitude difference then being
        ``2.5 |log10(f1 / f2)|`` (the zero point cancels). With
        ``band=None`` the columns ``mag`` and ``flux`` are used instead. A
        non-positive flux never matches. `None` disables this criterion (no
        brightness column is then needed).
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
        ``image_shape``. A source is kept when, on each axis,
        ``border < x + 0.5 < n_cols - border`` and
        ``border < y + 0.5 < n_rows - border``. Here ``x + 0.5`` is the
        position measured from the outer edge of the first pixel, the
        coordinate in which the paper's code kept sources strictly between
        5 and 95. ``border=0`` keeps the sources inside the image.
    image_shape : tuple of int or None, optional
        ``(n_rows, n_cols)`` of the image, used only with ``border``.

    Returns
    -------
    result : `CatalogMatch`
        Rates, counts and matched pairs. With no true (or no estimated)
        source left, ``tpr`` (or ``ppv``) is 0.

    Raises
    ------
    ValueError
        If a needed column is missing, a position is not finite, or an
        argument is out of range.

    Examples
    --------
    >>> from astropy.table import QTable
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
    """
    match, _, _ = _match(catalog, reference,
                         max_separation=max_separation,
                         max_mag_difference=max_mag_difference, band=band,
                         rule=rule, border=border, image_shape=image_shape)
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
        table has it, otherwise it is computed from ``flux_<band>``
        (electrons). With `None`, the columns ``mag`` and ``flux``.
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
    >>> from astropy.table import QTable
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
    meta = {"version": __version__, "band": band, "zero_point": zero_point,
            **match_kwargs, "rule": match.rule}
    return QTable({"mag_min": edges[:-1], "mag_max": edges[1:],
                   "n_true": n_true, "n_estimated": n_est,
                   "tpr": tpr, "ppv": ppv}, meta=meta)


def _match(catalog, reference, *, max_separation=0.5, max_mag_difference=0.5,
           band=None, rule="one-to-one", border=None, image_shape=None):
    """`match_catalogs`, also returning the border masks of both tables."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not (np.isscalar(max_separation) and max_separation > 0
            and np.isfinite(max_separation)):
        raise ValueError("max_separation must be a positive number of "
                         f"pixels, got {max_separation!r}")
    if max_mag_difference is not None and not (
            np.isscalar(max_mag_difference) and max_mag_difference > 0):
        raise ValueError("max_mag_difference must be a positive number or "
                         f"None, got {max_mag_difference!r}")

    est_xy = _positions(catalog, "catalog")
    true_xy = _positions(reference, "reference")
    keep_est, keep_true = (_inside(xy, border, image_shape)
                           for xy in (est_xy, true_xy))
    est_rows = np.flatnonzero(keep_est)
    true_rows = np.flatnonzero(keep_true)

    p = 2 if rule == "one-to-one" else np.inf
    candidates = cKDTree(est_xy[est_rows]).sparse_distance_matrix(
        cKDTree(true_xy[true_rows]), max_separation, p=p,
        output_type="ndarray")
    i, j, dist = candidates["i"], candidates["j"], candidates["v"]
    valid = dist < max_separation
    if max_mag_difference is not None:
        est_mag, true_mag = _comparable_magnitudes(catalog, reference, band)
        mag_diff = np.abs(est_mag[est_rows[i]] - true_mag[true_rows[j]])
        valid &= mag_diff < max_mag_difference
    i, j, dist = i[valid], j[valid], dist[valid]

    if rule == "one-to-one":
        i, j = _max_matching(i, j, dist / max_separation)
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
        forbidden = min(len(gi), len(gj)) + 1.0
        costs = np.full((len(gi), len(gj)), forbidden)
        costs[gi_local, gj_local] = cost[edges]
        r, c = linear_sum_assignment(costs)
        ok = costs[r, c] < forbidden
        matched_i.append(gi[r[ok]])
        matched_j.append(gj[c[ok]])
    return np.concatenate(matched_i), np.concatenate(matched_j)


def _positions(table, name):
    """(n, 2) array of x, y from ``x_fit``/``y_fit`` or ``x``/``y``."""
    for xcol, ycol in (("x_fit", "y_fit"), ("x", "y")):
        if xcol in table.colnames and ycol in table.colnames:
            for col in (xcol, ycol):
                unit = getattr(table[col], "unit", None)
                if unit is not None and u.Unit(unit) not in (u.pix, u.dimensionless_unscaled):
                    raise ValueError(f"{name} column {col!r} is in {unit}; positions "
                                     "must be pixels (convert sky positions with the "
                                     "image's WCS, e.g. wcs.world_to_pixel)")
            xy = np.column_stack([_values(table[xcol], f"{name} {xcol!r}"),
                                  _values(table[ycol], f"{name} {ycol!r}")])
            if not np.all(np.isfinite(xy)):
                raise ValueError(f"{name} has non-finite positions in "
                                 f"columns {xcol!r}, {ycol!r}")
            return xy.reshape(-1, 2)
    raise ValueError(f"{name} needs position columns 'x_fit', 'y_fit' or "
                     f"'x', 'y'; it has {table.colnames}")


def _inside(xy, border, image_shape):
    """Mask of sources kept by the border cut (see `match_catalogs`)."""
    if border is None:
        if image_shape is not None:
            raise ValueError("image_shape is only used together with border")
        return np.ones(len(xy), dtype=bool)
    if image_shape is None or len(image_shape) != 2:
        raise ValueError("border needs image_shape=(n_rows, n_cols), got "
                         f"{image_shape!r}")
    if not border >= 0:
        raise ValueError(f"border must be >= 0 pixels, got {border!r}")
    n_rows, n_cols = image_shape
    edge_xy = xy + 0.5  # position from the outer edge of the first pixel
    return ((edge_xy[:, 0] > border) & (edge_xy[:, 0] < n_cols - border)
            & (edge_xy[:, 1] > border) & (edge_xy[:, 1] < n_rows - border))


def _comparable_magnitudes(catalog, reference, band):
    """Magnitudes of both tables, up to a common zero point."""
    mag_col, flux_col = _brightness_columns(band)
    if mag_col in catalog.colnames and mag_col in reference.colnames:
        return (_values(catalog[mag_col], f"catalog {mag_col!r}"),
                _values(reference[mag_col], f"reference {mag_col!r}"))
    if flux_col in catalog.colnames and flux_col in reference.colnames:
        ours = _values(catalog[flux_col], f"catalog {flux_col!r}")
        theirs = _values(reference[flux_col], f"reference {flux_col!r}")
        unit = getattr(catalog[flux_col], "unit", None)
        other = getattr(reference[flux_col], "unit", None)
        if unit is not None and other is not None:
            try:   # the same star in electrons and in 1000 electrons is the same star
                theirs = (theirs * u.Unit(other)).to_value(u.Unit(unit))
            except u.UnitConversionError:
                raise ValueError(f"{flux_col!r} is in {unit} in the catalog and in {other} "
                                 "in the reference, which do not convert") from None
        return _flux_to_mag(ours), _flux_to_mag(theirs)
    missing = []
    for name, table in (("catalog", catalog), ("reference", reference)):
        lacks = [c for c in (mag_col, flux_col) if c not in table.colnames]
        missing.append(f"{name} lacks {lacks}")
    hint = (" (pass band=... to use e.g. 'flux_r')" if band is None else "")
    raise ValueError(f"the magnitude criterion needs {mag_col!r} in both "
                     f"tables or {flux_col!r} in both tables; "
                     f"{'; '.join(missing)}{hint}. Use "
                     "max_mag_difference=None to match on position only")


def _magnitudes(table, band, zero_point, name):
    """Magnitudes of one table for binning (see `metrics_by_magnitude`)."""
    mag_col, flux_col = _brightness_columns(band)
    if mag_col in table.colnames:
        return _values(table[mag_col])
    if flux_col not in table.colnames:
        raise ValueError(f"{name} needs a {mag_col!r} or {flux_col!r} "
                         f"column for magnitudes; it has {table.colnames}")
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


def _brightness_columns(band):
    if band is None:
        return "mag", "flux"
    return f"mag_{band}", f"flux_{band}"


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
