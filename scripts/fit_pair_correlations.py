"""Add pair correlations to a trained model: fit its pair head on the frozen network.

The model's encoder is rebuilt with ``pair_correlations`` (its weights kept) and only
the new head is fitted (`starnet.StarNetDeblender.fit_pair_correlations`), so every
tile's posterior stays as it was while the count intervals of regions narrow by the
anticorrelation of neighbouring tiles that share a star on their boundary
(docs/calibration.rst, "Pair correlations (tried, not bundled)"). The command and the
fit's history go into the model's provenance.

Run::

    python scripts/fit_pair_correlations.py --model sdss-m2 --steps 2000 --seed 7 \\
        --output scripts/checkpoints/sdss-m2-pairs.pt
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fit_density_spread import fit_and_save  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-side", type=int, default=64,
                        help="side in pixels of the simulated images")
    fit_and_save(parser, lambda deblender, args: deblender.fit_pair_correlations(
        image_side=args.image_side, n_steps=args.steps, seed=args.seed),
        "pair_correlations", argv, model="sdss-m2", seed=7)


if __name__ == "__main__":
    main()
