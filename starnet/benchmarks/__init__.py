"""Benchmarks that reproduce the results of the StarNet paper.

`starnet.benchmarks.m2.run_m2_benchmark` (also ``python -m starnet.benchmarks.m2``
and ``starnet benchmark m2``) reproduces Table 1 and Figures 7 to 9 on the M2 field.
"""

__all__ = ["run_m2_benchmark"]


def __getattr__(name):
    # Imported on first use, so that ``python -m starnet.benchmarks.m2`` does not
    # find the module already imported by its package.
    if name == "run_m2_benchmark":
        from .m2 import run_m2_benchmark
        return run_m2_benchmark
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
