"""SDSS fpM mask files: the photometric pipeline's masks of a frame.

An ``fpM-<run>-<band><camcol>-<field>.fit`` file holds one binary table per mask type
(HDU ``1 + k`` for type ``k`` of the ``S_MASKTYPE`` table in the last HDU: ``INTERP``,
``SATUR``, ``NOTCHECKED``, ``OBJECT``, ``BRIGHTOBJECT``, ``BINOBJECT``, ``CATOBJECT``,
``SUBTRACTED``, ``GHOST``, ``CR``). Each row is one masked object: its pixels as spans,
big-endian 16-bit ``(row, first column, last column)`` triples in the column ``s``,
offset by ``row0`` and ``col0``.
"""

import numpy as np
from astropy.io import fits

__all__ = ["FPM_PLANES", "read_fpm_mask"]

#: The mask types of an fpM file, in the order of its HDUs.
FPM_PLANES = ("INTERP", "SATUR", "NOTCHECKED", "OBJECT", "BRIGHTOBJECT", "BINOBJECT",
              "CATOBJECT", "SUBTRACTED", "GHOST", "CR")


def read_fpm_mask(path, planes=("SATUR", "INTERP", "CR")):
    """The union of some mask types of an SDSS fpM file, as a boolean image.

    The default types are the pixels whose values are not measurements: saturated
    pixels and their bleed trails (``SATUR``), pixels interpolated over bad columns and
    cosmic rays (``INTERP``) and cosmic rays (``CR``).

    Parameters
    ----------
    path : str or path-like
        The fpM file (``.fit`` or ``.fit.gz``).
    planes : sequence of str, optional
        Mask types among `FPM_PLANES`.

    Returns
    -------
    `numpy.ndarray` of bool, shape (MASKROWS, MASKCOLS)
        True on masked pixels; indexed [row, col] as the frame.

    Examples
    --------
    >>> from importlib.resources import files
    >>> from starnet.datasets.fpm import read_fpm_mask
    >>> path = files("starnet") / "datasets" / "data" / "sdss" / "fpM-002583-r2-0136.fit.gz"
    >>> saturated = read_fpm_mask(path, planes=["SATUR"])
    >>> saturated.shape, int(saturated.sum())
    ((1489, 2048), 6703)
    """
    unknown = [plane for plane in planes if plane not in FPM_PLANES]
    if unknown:
        raise ValueError(f"unknown fpM mask types {unknown}; expected some of {FPM_PLANES}")
    with fits.open(path) as hdul:
        header = hdul[0].header
        if "MASKROWS" not in header or "NPLANE" not in header:
            raise ValueError(f"{path} is not an SDSS fpM file (no MASKROWS / NPLANE in its "
                             "primary header)")
        shape = (int(header["MASKROWS"]), int(header["MASKCOLS"]))
        mask = np.zeros(shape, dtype=bool)
        for plane in planes:
            table = hdul[1 + FPM_PLANES.index(plane)].data
            if table is None:
                continue
            for row0, col0, spans in zip(table["row0"], table["col0"], table["s"]):
                triples = np.frombuffer(np.asarray(spans, dtype=np.uint8).tobytes(),
                                        dtype=">i2").reshape(-1, 3).astype(int)
                for y, x1, x2 in triples:
                    y, x1, x2 = y + row0, x1 + col0, x2 + col0
                    if 0 <= y < shape[0]:
                        mask[y, max(x1, 0):min(x2 + 1, shape[1])] = True
    return mask
