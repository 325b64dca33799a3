"""Add a density spread to a trained model: fit its spread head on the frozen network.

The model's encoder is rebuilt with ``--density-cells`` (its weights kept) and only the
new head is fitted (`starnet.StarNetDeblender.fit_density_spread`), so every tile's
posterior stays as it was while the count intervals of crowded regions widen by the
uncertainty of the density that a cell's tiles share (docs/sdss_model.rst, "Why the
crowded intervals were too narrow"). The command and the fit's history go into the
model's provenance.

Run::

    python scripts/fit_density_spread.py --model sdss --steps 2000 --seed 5 \\
        --output scripts/checkpoints/sdss-spread.pt
"""

import argparse
import sys
import warnings
from pathlib import Path

from starnet import StarNetDeblender


def fit_and_save(parser, fit, key, argv=None, *, model, seed):
    """Parse ``argv`` (``parser`` with the common options added), load ``--model``, fit a
    head by ``fit(deblender, args)``, record the command and history in the provenance
    under ``key`` and save to ``--output``."""
    parser.add_argument("--model", default=model, help="bundled model name or file")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--output", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    deblender = StarNetDeblender.from_name_or_path(args.model)
    history = fit(deblender, args)
    print(history)
    script = Path(sys.argv[0]).name
    deblender.provenance[key] = {
        "command": "python " + " ".join([f"scripts/{script}", *sys.argv[1:]]),
        "from": args.model,
        "history": {name: [float(v) for v in history[name]] for name in history.colnames}}
    deblender.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density-cells", type=int, default=32,
                        help="side in tiles of the cells that share a density offset")
    fit_and_save(parser, lambda deblender, args: deblender.fit_density_spread(
        density_cells=args.density_cells, n_steps=args.steps, seed=args.seed),
        "density_spread", argv, model="sdss", seed=5)


if __name__ == "__main__":
    main()
