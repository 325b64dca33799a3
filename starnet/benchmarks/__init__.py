"""Benchmarks that reproduce the results of the StarNet paper.

`run_m2_benchmark` (also ``python -m starnet.benchmarks.m2`` and
``starnet benchmark m2``) reproduces Table 1 and Figures 7 to 9 on the M2 field.
"""

from .m2 import run_m2_benchmark  # noqa: F401

__all__ = ["run_m2_benchmark"]
