"""The catalog that the shifted tile grids agree on.

A tiled posterior decides each star in the tile that holds it, so a faint star near a
tile boundary, or two stars closer than a tile, are read differently when the grid falls
differently on the sky: catalogs of the same image shifted by one pixel agree on only
55 to 65 % of their stars (docs/calibration.rst, "Invariance to the tile grid"). Reading
the image on every offset of the grid by whole pixels (``tile_size**2`` grids) and
keeping the stars that at least half of the grids find, at their mean position and
flux, removes most of the stars that one grid invents and restores some that it misses
(docs/calibration.rst gives the figures).
"""

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torch.nn import functional as F

from .inference import EncoderInput, modal_catalog
from .tiles import inside_image

__all__ = ["grid_offsets", "shifted_input", "merge_grid_catalogs", "consensus_catalog"]


def grid_offsets(tile_size):
    """The ``(rows, cols)`` offsets, in pixels, of every placement of the tile grid.

    Parameters
    ----------
    tile_size : int

    Returns
    -------
    list of tuple of int
        ``tile_size**2`` offsets, ``(0, 0)`` first.

    Examples
    --------
    >>> from starnet.grid_consensus import grid_offsets
    >>> grid_offsets(2)
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    """
    return [(dy, dx) for dy in range(tile_size) for dx in range(tile_size)]


def shifted_input(inputs, dy, dx, *, tile_size):
    """The encoder input of the image with ``dy`` rows and ``dx`` columns of missing
    pixels added at its top and left, so that the tile grid falls ``(dy, dx)`` pixels
    further up and left on the sky.

    The added pixels hold the background and are masked (for an encoder that reads the
    mask); a PSF map is interpolated linearly to the new tile centres.

    Parameters
    ----------
    inputs : `~starnet.inference.EncoderInput`
    dy, dx : int
        Pixels added, in ``0 .. tile_size - 1``.
    tile_size : int

    Returns
    -------
    `~starnet.inference.EncoderInput`
        A star at ``(x, y)`` of the image is at ``(x + dx, y + dy)`` in it.
    """
    if not (0 <= dy < tile_size and 0 <= dx < tile_size):
        raise ValueError(f"offsets must lie in 0 .. {tile_size - 1}, got ({dy}, {dx})")
    if dy == dx == 0:
        return inputs
    rows, cols = inputs.shape
    pad = (dx, 0, dy, 0)
    background = inputs.background
    if background.shape[-2:] != (1, 1):
        background = F.pad(background, pad, mode="replicate")
    image = background.expand(*inputs.image.shape[:2], rows + dy, cols + dx).clone()
    image[..., dy:, dx:] = inputs.image
    mask = None if inputs.mask is None else F.pad(inputs.mask, pad, value=True)
    psf = inputs.psf
    if psf is not None and psf.ndim == 4:
        psf = _shifted_map(psf, dy, dx, tile_size, (rows + dy, cols + dx))
    return EncoderInput(image, background, inputs.meta, mask, psf, inputs.prior)


def _shifted_map(values, dy, dx, tile_size, shape):
    """A map at tile resolution interpolated linearly to the tile centres of the grid
    shifted by ``(dy, dx)`` pixels over an image of ``shape`` (nearest value beyond)."""
    n_rows, n_cols = (-(-n // tile_size) for n in shape)
    padded = F.pad(values, (1, n_cols - values.shape[-1], 1, n_rows - values.shape[-2]),
                   mode="replicate")
    wy, wx = dy / tile_size, dx / tile_size
    rows = (1 - wy) * padded[..., 1:n_rows + 1, :] + wy * padded[..., :n_rows, :]
    return (1 - wx) * rows[..., 1:n_cols + 1] + wx * rows[..., :n_cols]


def merge_grid_catalogs(catalogs, *, band_index=0, min_grids, tile_size=2,
                        max_separation=0.5, max_mag_difference=0.5):
    """The stars found by at least ``min_grids`` of several catalogs of one image.

    Stars of different catalogs are grouped under `~starnet.match_catalogs`' rule
    (within ``max_separation`` pixels and ``max_mag_difference`` magnitudes in one band)
    by complete linkage: candidate pairs are taken from the closest up, and two groups
    join when they hold no catalog in common and every pair across them obeys the rule.
    The result does not depend on the order of the catalogs (but for pairs at exactly
    equal distances). The stars come sorted by the tile of their mean position
    (``tile_size``), then by x. A group's position, its
    standard deviations, log fluxes, their standard deviations and its detection
    probability are the means over its members. Of two kept groups closer than
    ``max_separation`` (a star that one catalog reads twice, two tiles claiming it),
    the one that fewer catalogs hold is dropped.

    Parameters
    ----------
    catalogs : list of dict
        Rows of `~starnet.inference.modal_catalog` (``locs``, ``sd``, ``fluxes``,
        ``flux_sd``, ``detection``), positions in the same image's pixels.
    band_index : int, optional
        The band whose magnitudes are compared.
    min_grids : int
        Catalogs that must hold a star for it to be kept.
    tile_size : int, optional
        Side of the tiles whose order the stars come in.
    max_separation, max_mag_difference : float, optional
        The matching rule, pixels and magnitudes.

    Returns
    -------
    dict of `numpy.ndarray`
        The same keys, plus ``n_grids``: the number of catalogs holding each star.

    Examples
    --------
    >>> import numpy as np
    >>> from starnet.grid_consensus import merge_grid_catalogs
    >>> def rows(x, flux):
    ...     n = len(x)
    ...     return {"locs": np.c_[x, np.full(n, 5.0)], "sd": np.full((n, 2), 0.1),
    ...             "fluxes": np.array(flux, float)[:, None],
    ...             "flux_sd": np.full((n, 1), 0.1), "detection": np.full(n, 0.8)}
    >>> merged = merge_grid_catalogs([rows([3.0, 9.0], [1e4, 2e3]), rows([3.2], [1.1e4])],
    ...                              min_grids=2)
    >>> merged["locs"].round(2).tolist(), merged["n_grids"].tolist()
    ([[3.1, 5.0]], [2])
    """
    if not catalogs:
        raise ValueError("merge_grid_catalogs needs at least one catalog")
    if not (isinstance(min_grids, (int, np.integer)) and 1 <= min_grids <= len(catalogs)):
        raise ValueError(f"min_grids must be an integer in 1 .. {len(catalogs)} (the "
                         f"number of catalogs), got {min_grids!r}")
    keys = ("locs", "sd", "fluxes", "flux_sd", "detection")
    stars = {key: np.concatenate([np.asarray(c[key], dtype=float) for c in catalogs])
             for key in keys}
    stars["fluxes"] = np.log(stars["fluxes"])
    grid = np.concatenate([np.full(len(c["locs"]), k) for k, c in enumerate(catalogs)])
    group = _complete_linkage(stars["locs"], stars["fluxes"][:, band_index], grid,
                              max_separation, max_mag_difference * np.log(10) / 2.5)
    _, group, size = np.unique(group, return_inverse=True, return_counts=True)
    merged = {}
    for key in keys:
        width = int(np.prod(np.shape(catalogs[0][key])[1:]))     # 1 for detection
        values = stars[key].reshape(len(grid), width)
        sums = np.zeros((len(size), width))
        np.add.at(sums, group, values)
        merged[key] = sums / size[:, None]
    keep = size >= min_grids
    keep[keep] = _not_repeated(merged["locs"][keep], size[keep],
                               merged["detection"][keep, 0], max_separation)
    tile = np.floor((merged["locs"] + 0.5) / tile_size)
    order = np.flatnonzero(keep)[np.lexsort((merged["locs"][keep, 0], tile[keep, 0],
                                             tile[keep, 1]))]
    merged = {key: value[order] for key, value in merged.items()}
    merged["fluxes"] = np.exp(merged["fluxes"])
    merged["detection"] = merged["detection"][:, 0]
    merged["n_grids"] = size[order]
    return merged


def _not_repeated(xy, size, detection, radius):
    """Which groups to keep where two are one star: a grid that reads a star twice (two
    tiles claiming it) leaves two groups at one place. Of two groups closer than
    ``radius``, the one found by fewer grids (then the less probable) goes: the network
    sees two stars only from about 0.75 pixel apart (docs/calibration.rst, "Deblending
    power")."""
    keep = np.ones(len(xy), dtype=bool)
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    if not len(pairs):
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    same = np.hypot(*(xy[i] - xy[j]).T) < radius
    rank = np.lexsort((-detection, -size))          # the best group first
    priority = np.empty(len(xy), dtype=int)
    priority[rank] = np.arange(len(xy))
    better = np.where(priority[i] < priority[j], i, j)[same]
    worse = np.where(priority[i] < priority[j], j, i)[same]
    for index in np.argsort(priority[better], kind="stable"):
        if keep[better[index]]:
            keep[worse[index]] = False
    return keep


def _complete_linkage(xy, log_flux, grid, radius, max_log_ratio):
    """Group labels of stars: closest pairs first, groups join when they share no grid
    and every pair across them lies within ``radius`` and ``max_log_ratio``."""
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    distance = ((xy[i] - xy[j]) ** 2).sum(-1)        # squared, as in the merging below
    ok = ((grid[i] != grid[j]) & (distance < radius ** 2)
          & (np.abs(log_flux[i] - log_flux[j]) < max_log_ratio))
    i, j, distance = i[ok], j[ok], distance[ok]
    # most connected sets of stars are one star per grid, every pair within the rule:
    # such a set is a group as it is, and only the others need the pair by pair merging
    n = len(xy)
    _, component = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)),
                                        directed=False)
    size = np.bincount(component)
    n_catalogs = int(grid.max(initial=0)) + 1
    n_grids = np.bincount(np.unique(component * n_catalogs + grid) // n_catalogs,
                          minlength=len(size))
    n_pairs = np.bincount(component[i], minlength=len(size))
    simple = (n_grids == size) & (n_pairs == size * (size - 1) // 2)
    label = np.where(simple[component], n + component, np.arange(n))
    members = {}
    tangled = ~simple[component[i]]
    order = np.argsort(distance[tangled], kind="stable")
    for a, b in zip(i[tangled][order].tolist(), j[tangled][order].tolist()):
        first, second = label[a], label[b]
        if first == second:
            continue
        one, two = members.get(first, [first]), members.get(second, [second])
        if set(grid[one].tolist()) & set(grid[two].tolist()):
            continue
        across = (xy[one][:, None] - xy[two][None]) ** 2
        if (across.sum(-1) >= radius ** 2).any() or (np.abs(
                log_flux[one][:, None] - log_flux[two][None]) >= max_log_ratio).any():
            continue
        members[first] = one + two
        members.pop(second, None)
        label[two] = first
    return label


def consensus_catalog(encoder, inputs, *, chunk_tiles=None, progress=False,
                      dtype=torch.float32, min_grids=None):
    """`~starnet.inference.modal_catalog` of an image read on every offset of the tile
    grid, merged by `merge_grid_catalogs`.

    Parameters
    ----------
    encoder : `~starnet.encoder.StarNetEncoder`
    inputs : `~starnet.inference.EncoderInput`
    chunk_tiles, progress, dtype : optional
        As for `~starnet.inference.modal_catalog`.
    min_grids : int, optional
        Grids that must find a star (default: half of the ``tile_size**2`` grids).

    Returns
    -------
    rows, offset, pmf
        As `~starnet.inference.modal_catalog` returns them; the rows also hold
        ``n_grids``, and the count posterior is that of the unshifted grid.
    """
    if encoder.n_colors != 1:
        raise ValueError("grid consensus needs a model of independent tiles; this one "
                         f"decides its tiles in {encoder.n_colors} colours, each given the "
                         "choices of the others, which a grid's catalog does not carry")
    size = encoder.tile_size
    offsets = grid_offsets(size)
    min_grids = -(-len(offsets) // 2) if min_grids is None else min_grids
    catalogs = []
    for dy, dx in offsets:
        rows, offset, pmf = modal_catalog(
            encoder, shifted_input(inputs, dy, dx, tile_size=size), chunk_tiles=chunk_tiles,
            progress=progress, dtype=dtype, counts=(dy, dx) == (0, 0))
        if (dy, dx) == (0, 0):
            count = (offset, pmf)
        rows["locs"] = rows["locs"] - np.array([dx, dy], dtype=float)
        inside = inside_image(rows["locs"], inputs.shape)
        catalogs.append({key: value[inside] for key, value in rows.items()})
    return (merge_grid_catalogs(catalogs, min_grids=min_grids, tile_size=size), *count)
