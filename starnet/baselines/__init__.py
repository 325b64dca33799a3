"""Baseline catalogers to compare StarNet with.

`daophot_catalog` is a DAOPHOT-like pipeline (find stars, then fit PSFs and
subtract them iteratively) assembled from photutils.
"""

from .daophot import daophot_catalog  # noqa: F401

__all__ = ["daophot_catalog"]
