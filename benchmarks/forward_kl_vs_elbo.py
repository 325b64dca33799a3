"""Why the forward KL: the paper's Section 5 experiment (its Fig. 4) on a CPU budget.

One 20 x 20 one-band image of four stars, cut into 2 x 2 tiles of 10 x 10 pixels with
at most two stars per tile, prior mean of four stars in the image. The same encoder
(`~starnet.encoder.StarNetEncoder`, ``tile_size=10, max_sources=2``) is fitted from six
random initialisations with three objectives:

* ``reinforce``: the ELBO of this image, score-function gradient for the tile counts
  with a leave-one-out baseline, reparameterised positions and fluxes;
* ``analytic``: the ELBO of this image with the 3^4 = 81 count configurations summed
  out exactly, reparameterised positions and fluxes;
* ``forward-kl``: the expected forward KL, ``-log q(z | x)`` on (catalog, image) pairs
  simulated from the prior (StarNet's objective; it never sees this image).

Adam, learning rate decayed from ``--lr`` to 1/30 of it (cosine) over the fit.
``--n-evals`` times during each fit the negative ELBO of this image is estimated the same
way for all three (the analytic-count estimator with ``--eval-samples`` draws per count
configuration, the same random numbers each time), and so is the forward-KL loss on
``--validation-images`` images simulated from the prior once (the same for every fit):
the curve that says whether the forward KL has converged. The table gives its final
value and how much it fell over the last quarter of the fit. At the end the modal
catalog is matched one-to-one to the four true stars (within 0.5 pixel). Run::

    python benchmarks/forward_kl_vs_elbo.py --output docs/_static/forward_kl.png
"""

import argparse
import math
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from starnet import PowerLawPSF, StarFieldPrior
from starnet.elbo import analytic_count_elbo, reinforce_elbo
from starnet.encoder import StarNetEncoder
from starnet.posterior import TiledPosterior
from starnet.simulate import StarFieldRenderer, add_noise
from starnet.tiles import TileCatalog, TileGrid
from starnet.training import SimulatedBatches, cosine_rate

SHAPE = (20, 20)
TILE_SIZE = 10
MAX_SOURCES = 2
BACKGROUND = 686.0
# (x, y) pixels and flux (electrons): two stars 2.9 px apart in the top-left tile, one
# 0.6 px from the boundary of the top-right tile, one faint star alone, one empty tile
TRUE_LOCS = [(4.3, 5.2), (6.8, 6.7), (14.6, 8.9), (12.2, 15.4)]
TRUE_FLUXES = [8000.0, 5000.0, 10000.0, 3000.0]
OBJECTIVES = ("reinforce", "analytic", "forward-kl")


def make_problem(seed):
    """The model and the one observed image."""
    psf = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
    # untruncated Pareto: the variational fluxes (f_min + log-normal) then lie in its support
    prior = StarFieldPrior(mu=4.0 / (SHAPE[0] * SHAPE[1]), f_min=1000.0, f_max=math.inf,
                           alpha=0.5, bands=("r",))
    renderer = StarFieldRenderer([psf], stamp_size=15)
    grid = TileGrid(tile_size=TILE_SIZE, max_sources=MAX_SOURCES)
    locs = torch.tensor([TRUE_LOCS])
    fluxes = torch.tensor(TRUE_FLUXES)[None, :, None]
    mask = torch.ones(1, len(TRUE_LOCS), dtype=torch.bool)
    expected = renderer.render(locs, fluxes, mask, SHAPE) + BACKGROUND
    image = add_noise(expected, generator=torch.Generator().manual_seed(seed))
    return prior, renderer, grid, image, (locs, fluxes, mask)


def shifted(tiles, f_min):
    """Tile variables with fluxes ``f - f_min`` (the variable of q's log-normal)."""
    used = (torch.arange(tiles.fluxes.shape[-2]) < tiles.counts[..., None])[..., None]
    fluxes = torch.where(used, (tiles.fluxes - f_min).clamp(min=1e-3), 1.0)
    return TileCatalog(tiles.counts, tiles.locs, fluxes, tiles.n_dropped)


def reference_posterior(grid, truth, f_min, sd=0.05):
    """A q concentrated at the true catalog (not fitted): a yardstick for the ELBO."""
    locs, fluxes, mask = truth
    tiles = shifted(grid.to_tiles(locs, fluxes, mask, SHAPE), f_min)
    n_slots = MAX_SOURCES * (MAX_SOURCES + 1) // 2
    rows, cols = grid.grid_shape(SHAPE)
    loc_mean = torch.zeros(1, rows, cols, n_slots, 2)
    flux_mean = torch.zeros(1, rows, cols, n_slots, 1)
    for n in range(1, MAX_SOURCES + 1):
        slots = list(range(n * (n - 1) // 2, n * (n + 1) // 2))
        u = tiles.locs[..., :n, :]
        loc_mean[..., slots, :] = torch.log(u) - torch.log1p(-u)
        flux_mean[..., slots, :] = torch.log(tiles.fluxes[..., :n, :])
    logits = torch.where(torch.arange(MAX_SOURCES + 1) == tiles.counts[..., None], 0.0, -30.0)
    return TiledPosterior(logits, loc_mean, torch.full_like(loc_mean, sd), flux_mean,
                          torch.full_like(flux_mean, sd))


def match_count(estimate, truth, radius=0.5):
    """Number of true stars matched one-to-one by an estimate within ``radius`` px."""
    if len(estimate) == 0:
        return 0
    distance = np.linalg.norm(estimate[:, None, :] - truth[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(distance)
    return int((distance[rows, cols] < radius).sum())


def validation_set(problem, n_images):
    """Images simulated from the prior, the same for every fit: (images, backgrounds,
    tile catalogs with shifted fluxes)."""
    prior, renderer, grid, _, _ = problem
    batches = SimulatedBatches(prior, renderer, [BACKGROUND], SHAPE)
    images, backgrounds, catalogs = batches.draw(n_images,
                                                 generator=torch.Generator().manual_seed(4242))
    tiles = grid.to_tiles(catalogs.locs, catalogs.fluxes, catalogs.mask, SHAPE)
    return images, backgrounds, shifted(tiles, prior.f_min)


def fit(objective, restart, args, problem, validation):
    """Fit one encoder; return the history (iteration, negative ELBO of the image,
    forward-KL loss of the validation images) and the modal catalog."""
    prior, renderer, grid, image, truth = problem
    background = torch.full_like(image, BACKGROUND)
    torch.manual_seed(1000 + restart)
    encoder = StarNetEncoder(n_bands=1, tile_size=TILE_SIZE, max_sources=MAX_SOURCES,
                             hidden=args.hidden, tile_hidden=args.tile_hidden,
                             log_flux_offset=math.log(3000.0))
    optimizer = torch.optim.Adam(encoder.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(2000 + restart)
    batches = SimulatedBatches(prior, renderer, [BACKGROUND], SHAPE)
    common = dict(prior=prior, renderer=renderer, grid=grid, flux_shift=prior.f_min)
    history = []
    n_iterations = args.fkl_iterations if objective == "forward-kl" else args.iterations
    eval_every = max(n_iterations // args.n_evals, 1)
    started = time.perf_counter()

    def evaluate(iteration):
        with torch.no_grad():
            q = encoder(image, background)
            elbo = analytic_count_elbo(q, image, background, n_samples=args.eval_samples,
                                       generator=torch.Generator().manual_seed(7), **common)
            images, backgrounds, tiles = validation
            loss = -encoder(images, backgrounds).log_prob(tiles).mean()
        history.append((iteration, -float(elbo), float(loss)))

    for iteration in range(n_iterations):
        if iteration % eval_every == 0:
            evaluate(iteration)
        for group in optimizer.param_groups:
            group["lr"] = cosine_rate(iteration / n_iterations, args.lr, args.lr / 30)
        if objective == "forward-kl":
            images, backgrounds, catalogs = batches.draw(args.batch_size, generator=generator)
            tiles = grid.to_tiles(catalogs.locs, catalogs.fluxes, catalogs.mask, SHAPE)
            q = encoder(images, backgrounds)
            loss = -q.log_prob(shifted(tiles, prior.f_min)).mean()
        elif objective == "analytic":
            q = encoder(image, background)
            loss = -analytic_count_elbo(q, image, background, n_samples=1,
                                        generator=generator, **common)
        else:
            q = encoder(image, background)
            loss = -reinforce_elbo(q, image, background, n_samples=args.reinforce_samples,
                                   generator=generator, **common)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    evaluate(n_iterations)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        mode = encoder(image, background).mode()
    locs, _, mask = grid.from_tiles(mode)
    estimate = locs[0][mask[0]].numpy()
    recovered = match_count(estimate, truth[0][0].numpy())
    return {"objective": objective, "restart": restart, "history": np.array(history),
            "estimate": estimate, "recovered": recovered, "seconds": seconds}


def plot(results, image, truth, reference, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reinforce": "tab:orange", "analytic": "tab:blue", "forward-kl": "tab:green"}
    markers = {"reinforce": "s", "analytic": "D", "forward-kl": "o"}
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.6))
    for result in results:
        history = result["history"]
        label = result["objective"] if result["restart"] == 0 else None
        left.plot(history[:, 0], history[:, 1], color=colors[result["objective"]], alpha=0.7,
                  lw=1.2, label=label)
        if result["objective"] == "forward-kl":
            middle.plot(history[:, 0], history[:, 2], color=colors["forward-kl"], alpha=0.7,
                        lw=1.2, label="forward-kl" if label else None)
    middle.set_xlabel("iteration")
    middle.set_ylabel("forward-KL loss, validation images from the prior")
    middle.legend(fontsize=8)
    left.axhline(reference, color="k", ls="--", lw=1, label="q concentrated at the truth")
    left.set_yscale("log")
    left.set_xlabel("iteration")
    left.set_ylabel("negative ELBO of the image")
    left.legend(fontsize=8)
    right.imshow(image[0, 0].numpy(), origin="lower", cmap="gray_r")
    true_locs = truth[0][0].numpy()
    right.scatter(true_locs[:, 0], true_locs[:, 1], marker="x", s=90, color="red",
                  linewidths=2, label="true stars", zorder=5)
    offsets = {"reinforce": (-0.12, 0.12), "analytic": (0.12, 0.12), "forward-kl": (0.0, -0.12)}
    for objective in colors:
        estimates = [r["estimate"] for r in results if r["objective"] == objective]
        points = np.concatenate(estimates) if estimates else np.zeros((0, 2))
        dx, dy = offsets[objective]
        right.scatter(points[:, 0] + dx, points[:, 1] + dy, marker=markers[objective], s=28,
                      facecolors="none", edgecolors=colors[objective],
                      label=f"{objective} (all restarts)", zorder=4)
    for edge in (TILE_SIZE - 0.5,):
        right.axhline(edge, color="0.6", lw=0.8)
        right.axvline(edge, color="0.6", lw=0.8)
    right.set_xlim(-0.5, SHAPE[1] - 0.5)
    right.set_ylim(-0.5, SHAPE[0] - 0.5)
    right.set_title("modal locations (markers offset by 0.12 px per objective)", fontsize=9)
    right.legend(fontsize=7, loc="upper right", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--restarts", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=500,
                        help="gradient steps of the two ELBO objectives")
    parser.add_argument("--fkl-iterations", type=int, default=3000,
                        help="gradient steps of the forward KL")
    parser.add_argument("--n-evals", type=int, default=20,
                        help="evaluations of the ELBO during each fit")
    parser.add_argument("--eval-samples", type=int, default=8,
                        help="draws per count configuration of the ELBO estimate")
    parser.add_argument("--validation-images", type=int, default=256,
                        help="images from the prior on which the forward-KL loss is tracked")
    parser.add_argument("--reinforce-samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="simulated images per forward-KL step")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="initial learning rate of Adam, decayed to 1/30 of it (cosine)")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--tile-hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the image's noise")
    parser.add_argument("--output", help="write the figure to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    problem = make_problem(args.seed)
    prior, renderer, grid, image, truth = problem
    background = torch.full_like(image, BACKGROUND)
    with torch.no_grad():
        reference = -float(analytic_count_elbo(
            reference_posterior(grid, truth, prior.f_min), image, background, prior=prior,
            renderer=renderer, grid=grid, flux_shift=prior.f_min, n_samples=args.eval_samples,
            generator=torch.Generator().manual_seed(7)))
    print(f"negative ELBO of a q concentrated at the true catalog: {reference:.1f}")
    validation = validation_set(problem, args.validation_images)
    print(f"{'objective':<11} {'restart':>7} {'-ELBO':>10} {'recovered':>9} {'modal':>5} "
          f"{'val FKL':>8} {'last 1/4':>8} {'wall s':>7}")
    results = []
    for objective in args.objectives:
        for restart in range(args.restarts):
            result = fit(objective, restart, args, problem, validation)
            results.append(result)
            history = result["history"]
            quarter = history[np.argmin(np.abs(history[:, 0] - 0.75 * history[-1, 0])), 2]
            print(f"{objective:<11} {restart:>7} {history[-1, 1]:>10.1f} "
                  f"{result['recovered']:>7}/4 {len(result['estimate']):>5} "
                  f"{history[-1, 2]:>8.4g} {quarter - history[-1, 2]:>+8.3g} "
                  f"{result['seconds']:>7.1f}", flush=True)
    if args.output:
        plot(results, image, truth, reference, args.output)


if __name__ == "__main__":
    main()
