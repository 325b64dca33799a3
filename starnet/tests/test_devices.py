"""device=: where the network runs (the CPU in these tests; a GPU where one is lent, by
benchmarks/gpu_check.py); precision=: in which float type."""

import math
import warnings

import numpy as np
import pytest
import torch
from astropy.table import QTable

from starnet import StarNetDeblender, devices, match_catalogs, simulate_starfield
from starnet.devices import as_device, as_precision, on_device
from starnet.inference import encode_blocks

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def deblender():
    return StarNetDeblender.pretrained("sdss-m2")


@pytest.mark.parametrize("name, expected", [(None, "cpu"), ("cpu", "cpu"),
                                            (torch.device("cpu"), "cpu")])
def test_cpu_names(name, expected):
    assert as_device(name) == torch.device(expected)


@pytest.mark.parametrize("name, message", [("gpu", "must be None, 'cpu', 'cuda'"),
                                           (3.5, "must be None, 'cpu', 'cuda'"),
                                           ("meta", "the CPU or a CUDA GPU, not on 'meta'")])
def test_names_that_are_not_devices(name, message):
    with pytest.raises(ValueError, match=message):
        as_device(name)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is there")
def test_a_missing_gpu_is_a_clear_error_and_auto_falls_back(deblender):
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        as_device("cuda")
    assert as_device("auto") == torch.device("cpu")
    image, _ = simulate_starfield((20, 20), psf=deblender.psfs,
                                  background=deblender.background, seed=0)
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        deblender(image, background="given", device="cuda", progress=False)
    assert next(deblender.encoder.parameters()).device.type == "cpu"


def test_the_cpu_catalog_is_the_default_one(deblender):
    image, _ = simulate_starfield((30, 30), psf=deblender.psfs,
                                  background=deblender.background, seed=2)
    default = deblender(image, background="given", progress=False)
    on_cpu = deblender(image, background="given", progress=False, device="auto" if NO_GPU
                       else "cpu")
    np.testing.assert_array_equal(default["x_fit"], on_cpu["x_fit"])
    np.testing.assert_array_equal(default["flux_r"], on_cpu["flux_r"])
    assert default.meta["n_stars_mean"] == on_cpu.meta["n_stars_mean"]


def test_on_device_gives_the_network_back_on_the_cpu_after_an_error():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError):
        with on_device(layer, "cpu"):
            raise KeyError("inside")
    assert layer.weight.device.type == "cpu"


@pytest.mark.skipif(not NO_GPU, reason="a GPU is there")
def test_fit_on_a_missing_gpu_fails_before_simulating(deblender, monkeypatch):
    small = StarNetDeblender(prior=deblender.prior, psf=deblender.psfs,
                             background=deblender.background, hidden=4, tile_hidden=8)
    monkeypatch.setattr(StarNetDeblender, "_batches", lambda *args: pytest.fail("simulated"))
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        small.fit(n_steps=1, device="cuda", progress=False)
    with pytest.raises(ValueError, match="must be None, 'cpu', 'cuda'"):
        small.fit(n_steps=1, device="gpu", progress=False)


@pytest.mark.parametrize("n_colors", [1, 2])
def test_training_creates_its_tensors_on_the_device_of_its_inputs(n_colors):
    """A GPU fit holds the batch on the GPU, so every tensor the loss and the validation
    create must be made on their inputs' device. Here torch's default device is 'meta'
    while the inputs are on the CPU: a tensor made without a device (on 'meta') fails
    when it meets them, or reads garbage, and the loss, its gradient and the validation
    would differ from those of the plain run."""
    from starnet import PowerLawPSF, StarFieldPrior
    from starnet.encoder import StarNetEncoder
    from starnet.psf_family import DESCRIPTOR_SIZE, PSFBank
    from starnet.tiles import TileGrid
    from starnet.training import SimulatedBatches, TrainingSettings, _training_loss, _validate

    psf = PowerLawPSF(sigma1=0.8, sigma2=2.0, sigmap=3.0, beta=3.0, b=0.05, p0=0.001)
    prior = StarFieldPrior(mu=0.08, bands=["r"])
    bank = PSFBank([(psf,)], stamp_size=11)
    batches = SimulatedBatches(prior, bank, np.array([686.0]), (16, 16), margin=3)
    batch = batches.draw_batch(4, generator=torch.Generator().manual_seed(0))
    grid = TileGrid(tile_size=2, max_sources=3)
    tiles = grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes, batch.catalogs.mask,
                          (16, 16))
    # the count score (independent tiles only) makes tensors of its own
    settings = TrainingSettings(count_score_weight=0.5 if n_colors == 1 else 0.0,
                                count_blocks=(4, 8))
    torch.manual_seed(0)
    encoder = StarNetEncoder(n_bands=1, hidden=4, tile_hidden=8, n_colors=n_colors,
                             psf_features=DESCRIPTOR_SIZE)

    def run():
        encoder.zero_grad()
        loss = _training_loss(encoder, batch, tiles, torch.Generator().manual_seed(1),
                              settings)
        loss.backward()
        return loss.item(), encoder.head.weight.grad.clone(), _validate(
            encoder, grid, batch, batch, ["r"])

    plain = run()
    with torch.device("meta"):
        on_meta = run()
    assert on_meta[0] == pytest.approx(plain[0], rel=1e-6)
    torch.testing.assert_close(on_meta[1], plain[1])
    for key, value in plain[2].items():
        assert on_meta[2][key] == pytest.approx(value, rel=1e-6, nan_ok=True), key


@pytest.mark.parametrize("name, expected", [(None, torch.float32), ("float32", torch.float32),
                                            ("bfloat16", torch.bfloat16)])
def test_precision_names(name, expected, monkeypatch):
    monkeypatch.setattr(devices, "_computes_bfloat16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_precision(name) == expected


@pytest.mark.parametrize("name", ["half", "float16", torch.bfloat16, 16])
def test_names_that_are_not_precisions(name):
    with pytest.raises(ValueError, match="precision must be one of 'float32', 'bfloat16'"):
        as_precision(name)


def test_bfloat16_without_the_hardware_warns(monkeypatch):
    monkeypatch.setattr(devices, "_computes_bfloat16", lambda device: False)
    with pytest.warns(UserWarning, match="does not compute in bfloat16, so the network runs "
                                         "slower"):
        assert as_precision("bfloat16") == torch.bfloat16


def _catalogs_in(deblender, image, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # on a CPU without bfloat16 arithmetic
        return (deblender(image, background="given", progress=False, precision=precision),
                deblender.count_posterior(image, background="given", progress=False,
                                          precision=precision))


def test_bfloat16_moves_the_catalog_by_little_against_its_uncertainties(deblender):
    """bfloat16 convolutions (8 bits of mantissa) between the float32 first convolution
    and heads give nearly the same posterior: the same stars under the 0.5-pixel /
    0.5-magnitude rule, positions moved by a few hundredths of their posterior standard
    deviations, the same count to a fraction of a per cent (0.2-0.3 % here)."""
    image, _ = simulate_starfield((80, 80), psf=deblender.psfs,
                                  background=deblender.background, seed=5)
    exact, exact_pmf = _catalogs_in(deblender, image, None)
    rough, rough_pmf = _catalogs_in(deblender, image, "bfloat16")
    n = np.arange(len(exact_pmf))
    assert np.dot(n, rough_pmf) == pytest.approx(np.dot(n, exact_pmf), rel=0.005)
    reference = QTable({"x": exact["x_fit"], "y": exact["y_fit"], "flux_r": exact["flux_r"]})
    matched = match_catalogs(rough, reference, band="r")
    assert matched.tpr > 0.98 and matched.ppv > 0.98
    rows, refs = matched.pairs.T
    shift = np.hypot(np.asarray(rough["x_fit"])[rows] - np.asarray(exact["x_fit"])[refs],
                     np.asarray(rough["y_fit"])[rows] - np.asarray(exact["y_fit"])[refs])
    sigma = np.hypot(np.asarray(exact["x_err"]), np.asarray(exact["y_err"]))[refs]
    assert np.median(shift / sigma) < 0.05 and np.quantile(shift / sigma, 0.9) < 0.2


def test_bfloat16_blocks_keep_float32_posteriors_and_no_autocast_outside(deblender):
    # blocks are whole cells of the context branch and of the density spread
    encoder = deblender.encoder
    cell = math.lcm(max(encoder.context_cells, 1), max(encoder.density_cells, 1))
    side = 2 * cell * deblender.grid.tile_size      # two blocks of one cell a side
    image, _ = simulate_starfield((side, side), psf=deblender.psfs,
                                  background=deblender.background, seed=6)
    inputs = deblender._prepare(image)
    blocks = 0
    for _, _, posterior in encode_blocks(encoder, inputs, chunk_tiles=cell,
                                         dtype=torch.bfloat16):
        assert not torch.is_autocast_enabled("cpu")     # not in the caller's code
        assert posterior.count_logits.dtype == torch.float32
        blocks += 1
    assert blocks == 4


def test_a_checkerboard_model_refuses_bfloat16(deblender):
    board = StarNetDeblender(prior=deblender.prior, psf=deblender.psfs,
                             background=deblender.background, hidden=4, tile_hidden=8,
                             n_colors=2)
    image, _ = simulate_starfield((16, 16), psf=deblender.psfs,
                                  background=deblender.background, seed=0)
    with pytest.raises(ValueError, match="checkerboard model runs in float32 only"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")         # on a CPU without bfloat16 arithmetic
        board(image, background="given", progress=False, precision="bfloat16")


def test_bfloat16_training_steps_follow_the_float32_ones(deblender):
    """A training step with the convolutions in bfloat16 (8 bits of mantissa) gives the
    forward KL of the trained model to within 0.5 %, and a gradient closer to the float32
    one (cosine > 0.6) than the gradient of another batch is: its rounding moves a
    step by less than the batch's draw does. (The bundled model's cosine on this batch
    is 0.75 and 0.95-0.98 on two others; the previous one's 0.96-0.99: a converged
    model's gradient is smaller, so the rounding weighs more.) The loss and the
    gradients are float32, and autocast is off again after the step."""
    from starnet.tiles import TileGrid
    from starnet.training import _training_loss

    settings = deblender.training_settings
    encoder = deblender.encoder
    grid = TileGrid(tile_size=encoder.tile_size, max_sources=encoder.max_sources)

    def step(seed, dtype):
        batch = deblender._batches((32, 32), settings).draw_batch(
            4, generator=torch.Generator().manual_seed(seed))
        tiles = grid.to_tiles(batch.catalogs.locs, batch.catalogs.fluxes,
                              batch.catalogs.mask, (32, 32))
        encoder.zero_grad()
        loss = _training_loss(encoder, batch, tiles, None, settings, dtype)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in encoder.parameters()])
        encoder.zero_grad()
        return loss.detach(), grads

    exact, exact_grad = step(0, torch.float32)
    rough, rough_grad = step(0, torch.bfloat16)
    _, other_grad = step(1, torch.float32)
    assert not torch.is_autocast_enabled("cpu")
    assert rough.dtype == rough_grad.dtype == torch.float32
    assert float(rough) == pytest.approx(float(exact), rel=0.005)
    assert float(rough) != float(exact)          # the convolutions did run in bfloat16
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(rough_grad, exact_grad, dim=0)) > 0.6
    assert float(cosine(rough_grad, exact_grad, dim=0)) \
        > float(cosine(other_grad, exact_grad, dim=0)) + 0.2


@pytest.mark.parametrize("n_colors", [1, 2])
def test_fit_in_bfloat16_keeps_float32_weights(deblender, n_colors, tmp_path):
    small = StarNetDeblender(prior=deblender.prior, psf=deblender.psfs,
                             background=deblender.background, hidden=4, tile_hidden=8,
                             n_colors=n_colors, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # on a CPU without bfloat16 arithmetic
        history = small.fit(n_steps=2, batch_size=2, image_shape=(16, 16), n_validation=2,
                            batches_per_epoch=2, progress=False, compare_photutils=False,
                            precision="bfloat16")
    assert np.isfinite(history["train_loss"][0]) and np.isfinite(history["val_loss"][0])
    assert {p.dtype for p in small.encoder.parameters()} == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")
    small.save(tmp_path / "bf16.pt")      # the history says how the steps ran
    assert list(StarNetDeblender.load(tmp_path / "bf16.pt").training_history["precision"]) \
        == ["bfloat16"]


def test_fit_refuses_an_unknown_precision_before_simulating(deblender, monkeypatch):
    monkeypatch.setattr(StarNetDeblender, "_batches", lambda *args: pytest.fail("simulated"))
    with pytest.raises(ValueError, match="precision must be one of 'float32', 'bfloat16'"):
        deblender.fit(n_steps=1, progress=False, precision="float16")
