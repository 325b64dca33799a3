"""Cataloging many images, or one mosaic too large for one machine, with Dask.

Requires ``dask.distributed`` (``pip install "starnet[distributed]"``). Without a
``client``, a `~distributed.LocalCluster` with one single-threaded worker process per
core is started for the call and closed after it. To scale out, start a scheduler and
workers on the machines of a cluster (``dask scheduler``, ``dask worker ADDRESS``, or
dask-jobqueue / dask-kubernetes) and pass ``client=Client(ADDRESS)``; every worker needs
starnet installed.
"""

import contextlib
import math
import os

import numpy as np
from astropy.table import vstack

from .background import choose_background
from .deblender import StarNetDeblender
from .images import StarFieldImage, with_changes

__all__ = ["catalog_images", "catalog_mosaic", "mosaic_blocks"]


def catalog_images(images, model, *, client=None):
    """Modal catalogs of several images, one Dask task per image.

    Parameters
    ----------
    images : list of `~astropy.nddata.NDData`
        Images as `~starnet.StarNetDeblender` takes them.
    model : `~starnet.StarNetDeblender` or str
        A deblender, the name of a pretrained model, or the path of a saved one.
    client : `distributed.Client`, optional
        The cluster to use; by default a local cluster for this call.

    Returns
    -------
    catalogs : list of `~astropy.table.QTable`
        In the order of ``images``; equal to ``model(image)`` for each.
    """
    deblender = StarNetDeblender.from_name_or_path(model)
    with _client(client) as active:
        shared = active.scatter(deblender, broadcast=True)
        futures = active.map(_catalog, images, deblender=shared, pure=False)
        return active.gather(futures)


def mosaic_blocks(shape, *, block_size, halo, tile_size):
    """Split an image into blocks aligned to the tile grid.

    Returns a list of ``(core, outer)`` pixel bounds ``(row0, row1, col0, col1)``: the
    cores tile the image; each outer block adds ``halo`` pixels of context on every side
    (clipped at the image edges).
    """
    if block_size % tile_size:
        raise ValueError(f"block_size {block_size} must be a multiple of {tile_size} "
                         "pixels (the tile grid)")
    rows, cols = shape
    blocks = []
    for r0 in range(0, rows, block_size):
        for c0 in range(0, cols, block_size):
            r1, c1 = min(r0 + block_size, rows), min(c0 + block_size, cols)
            outer = (max(r0 - halo, 0), min(r1 + halo, rows),
                     max(c0 - halo, 0), min(c1 + halo, cols))
            blocks.append(((r0, r1, c0, c1), outer))
    return blocks


def catalog_mosaic(nddata, model, *, block_size=1024, background=None, client=None):
    """Modal catalog of one large image, cataloged block by block on a Dask cluster.

    Each block is cataloged with a halo wider than the encoder's reach (for a
    checkerboard model, the reach of every colour's pass, with blocks starting on the
    same checkerboard colour as the image), and keeps the stars of its core, so the
    result equals ``model(nddata)`` (up to floating-point rounding). The posterior of
    the star count is not combined across blocks: the catalog's ``meta`` has no
    ``n_stars_*`` entries (`~starnet.StarNetDeblender.sample` gives it for an image).

    Parameters
    ----------
    nddata : `~astropy.nddata.NDData`
    model : `~starnet.StarNetDeblender` or str
    block_size : int, optional
        Side of a block's core in pixels (a multiple of twice the tile size).
    background : {None, 'fit', 'given'}, optional
        As for `~starnet.StarNetDeblender.__call__`; a fit is made once, on the whole
        image, before it is cut into blocks.
    client : `distributed.Client`, optional

    Returns
    -------
    catalog : `~astropy.table.QTable`
    """
    deblender = StarNetDeblender.from_name_or_path(model)
    nddata = choose_background(deblender, nddata, background)
    encoder = deblender.encoder
    tile = deblender.grid.tile_size
    # an even number of tiles keeps every block on the image's checkerboard colours
    reach = math.ceil(3 / tile) + 1 + 3 * encoder.n_colors + 1
    halo = 2 * tile * math.ceil(reach / 2)
    data = np.asarray(nddata.data)
    blocks = mosaic_blocks(data.shape[-2:], block_size=block_size, halo=halo,
                           tile_size=2 * tile)
    pieces = [_cut(nddata, outer) for _, outer in blocks]
    with _client(client) as active:
        shared = active.scatter(deblender, broadcast=True)
        futures = active.map(_catalog, pieces, deblender=shared, pure=False)
        catalogs = active.gather(futures)
    kept = []
    for ((r0, r1, c0, c1), (o_r0, _, o_c0, _)), catalog in zip(blocks, catalogs):
        if "sky_centroid" in catalog.colnames:
            catalog.remove_column("sky_centroid")
        catalog["x_fit"] += o_c0
        catalog["y_fit"] += o_r0
        inside = ((catalog["x_fit"] >= c0 - 0.5) & (catalog["x_fit"] < c1 - 0.5)
                  & (catalog["y_fit"] >= r0 - 0.5) & (catalog["y_fit"] < r1 - 0.5))
        kept.append(catalog[inside])
    merged = vstack(kept, metadata_conflicts="silent")
    merged["id"] = np.arange(1, len(merged) + 1)
    if nddata.wcs is not None:
        merged["sky_centroid"] = nddata.wcs.pixel_to_world(merged["x_fit"], merged["y_fit"])
    merged.meta = {key: value for key, value in catalogs[0].meta.items()
                   if not key.startswith("n_stars")}
    merged.meta.update({"block_size": block_size, "halo": halo, "n_blocks": len(blocks)})
    return merged


def _catalog(nddata, deblender):
    return deblender(nddata, background="given", progress=False)


def _cut(nddata, bounds):
    """The part ``(row0, row1, col0, col1)`` of an image, with its background map and mask."""
    r0, r1, c0, c1 = bounds
    image = (nddata if isinstance(nddata, StarFieldImage)
             else with_changes(nddata, cls=StarFieldImage))
    return image[..., r0:r1, c0:c1]


@contextlib.contextmanager
def _client(client):
    if client is not None:
        yield client
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise ImportError("starnet.distributed needs dask.distributed: "
                          'pip install "starnet[distributed]"') from error
    with LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1) as cluster:
        with Client(cluster) as active:
            yield active
