"""starnet: probabilistic cataloging of crowded star fields.

Amortized variational inference for deblending crowded star fields
(StarNet; Liu, Regier et al., JMLR 2023).
"""

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - only when not installed
    __version__ = "0.0.0"

from .prior import StarFieldPrior  # noqa: F401
from .psf import PowerLawPSF  # noqa: F401
from .simulate import simulate_starfield  # noqa: F401
from .matching import match_catalogs  # noqa: F401
from .deblender import StarNetDeblender  # noqa: F401
from .catalogs import to_photutils  # noqa: F401

__all__ = ["StarFieldPrior", "PowerLawPSF", "simulate_starfield", "StarNetDeblender",
           "match_catalogs", "to_photutils"]
