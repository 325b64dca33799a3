"""Data sets: SDSS frames and the StarNet paper's M2 (NGC 7089) field.

`load_sdss_frame` reads any SDSS DR12 field (downloading what is not
bundled); `load_m2`, `load_m2_hst` and `load_m2_daophot` give the paper's
evaluation image and catalogs, from data bundled with the package.
"""

from .m2 import (M2_NELEC_PER_NMGY, M2_REGION, load_m2, load_m2_daophot,  # noqa: F401
                 load_m2_hst)
from .sdss import SDSS_BANDS, load_sdss_frame  # noqa: F401

__all__ = ["SDSS_BANDS", "load_sdss_frame", "M2_REGION", "M2_NELEC_PER_NMGY",
           "load_m2", "load_m2_hst", "load_m2_daophot"]
