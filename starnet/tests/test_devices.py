"""device=: where the network runs (the CPU in these tests; a GPU where one is lent, by
benchmarks/gpu_check.py)."""

import numpy as np
import pytest
import torch

from starnet import StarNetDeblender, simulate_starfield
from starnet.devices import as_device, on_device

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
