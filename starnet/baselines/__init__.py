"""Baseline catalogers to compare StarNet with.

`daophot_catalog` is a DAOPHOT-like pipeline (find stars, then fit PSFs and
subtract them iteratively) assembled from photutils. `CatalogSampler` draws
catalogs from the posterior by MCMC with the moves of PCAT (Portillo et al. 2017).
"""

from .daophot import daophot_catalog  # noqa: F401
from .pcat import CatalogSampler  # noqa: F401

__all__ = ["daophot_catalog", "CatalogSampler"]
