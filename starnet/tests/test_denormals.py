import json
from importlib import resources

import numpy as np
import torch

from starnet import PowerLawPSF, StarFieldPrior, StarNetDeblender, simulate_starfield
from starnet.denormals import count_denormals, flush_denormals, zero_negligible_weights

PSF = PowerLawPSF(sigma1=1.0, sigma2=2.5, sigmap=3.0, beta=3.0, b=0.1, p0=0.01)
PRIOR = StarFieldPrior(mu=0.05, bands=['r'])
DENORMAL = 1e-40      # float32 stores it as a denormal


def small_deblender(seed=0):
    return StarNetDeblender(prior=PRIOR, psf=PSF, background=[686.0], hidden=8, tile_hidden=16,
                            stamp_size=7, seed=seed)


def put(weight, value, every, start=0):
    """Set every ``every``-th value of ``weight`` to ``value``, in place."""
    with torch.no_grad():
        index = torch.arange(weight.numel()).reshape(weight.shape)
        weight[index % every == start] = value


def with_denormals(deblender):
    """Set a fifth of the tile layer's weights to denormals, as Adam with L2 decay does."""
    put(deblender.encoder.tile_layers[0].weight, DENORMAL, 5)
    assert count_denormals(deblender.encoder) > 0
    return deblender


def test_zeroing_keeps_the_output_and_removes_denormals():
    layer = torch.nn.Conv2d(4, 8, 3)
    put(layer.weight, DENORMAL, 3)
    put(layer.weight, 1e-20, 7, start=1)     # normal, but far below float32 precision
    x = torch.rand(2, 4, 16, 16)
    before = layer(x)
    zeroed = zero_negligible_weights(layer)
    assert zeroed >= layer.weight.numel() // 3
    assert count_denormals(layer) == 0
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert zero_negligible_weights(layer) == 0    # nothing left to do


def test_normal_small_weights_are_kept():
    """Only weights negligible against their tensor's largest are zeroed."""
    layer = torch.nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-6, 2e-6, 3e-6]]))
    assert zero_negligible_weights(layer) == 0
    assert torch.all(layer.weight != 0)


def test_load_cleans_a_file_with_denormal_weights(tmp_path):
    deblender = with_denormals(small_deblender())
    image, _ = simulate_starfield((12, 12), prior=PRIOR, psf=PSF, background=686.0, seed=1,
                                  stamp_size=7)
    path = tmp_path / 'old.pt'
    deblender.save(path)
    # a file written before save cleaned the weights (and before files had checksums):
    # put the denormals back in it
    state = torch.load(path, weights_only=True)
    put(state['weights']['tile_layers.0.weight'], DENORMAL, 5)
    metadata = json.loads(state['metadata'])
    del metadata['weights_sha256'], metadata['sha256']
    state['metadata'] = json.dumps(metadata)
    torch.save(state, path)
    raw = state['weights']['tile_layers.0.weight']
    assert int(((raw != 0) & (raw.abs() < torch.finfo(torch.float32).tiny)).sum()) > 0
    loaded = StarNetDeblender.load(path)
    assert count_denormals(loaded.encoder) == 0
    reference = small_deblender()
    with torch.no_grad():
        reference.encoder.load_state_dict(state['weights'])
    a, b = loaded(image), reference(image)
    np.testing.assert_allclose(a['x_fit'], b['x_fit'], rtol=0, atol=0)


def test_save_writes_no_denormals(tmp_path):
    deblender = with_denormals(small_deblender())
    path = tmp_path / 'model.pt'
    deblender.save(path)
    weights = torch.load(path, weights_only=True)['weights']
    tiny = torch.finfo(torch.float32).tiny
    assert all(int(((w != 0) & (w.abs() < tiny)).sum()) == 0 for w in weights.values())


def test_bundled_model_files_hold_no_denormals():
    """Read the files themselves, not through load (which would clean them)."""
    folder = resources.files('starnet') / 'models'
    names = [p for p in folder.iterdir() if p.name.endswith('.pt')]
    assert names
    tiny = torch.finfo(torch.float32).tiny
    for path in names:
        state = torch.load(path, weights_only=True)
        for key in ('weights', 'background_weights'):
            for name, w in state.get(key, {}).items():
                assert int(((w != 0) & (w.abs() < tiny)).sum()) == 0, (path.name, name)


def test_training_decays_weights_without_gradient_geometrically():
    """Decoupled weight decay: a dead unit's weights shrink by (1 - lr wd) per step,
    never towards zero by a fixed step as Adam with L2 decay makes them (which is what
    puts them in the denormal range)."""
    deblender = small_deblender(seed=3)
    first = deblender.encoder.pixel_layers[0]
    with torch.no_grad():
        first.bias[0] = -1e6              # channel 0 is dead: its ReLU never opens
    before = first.weight[0].detach().clone()
    rate, decay, steps = 1e-2, 0.5, 3
    deblender.fit(n_epochs=1, batches_per_epoch=steps, batch_size=2, image_shape=(12, 12),
                  n_validation=2, learning_rate=rate, final_learning_rate=None,
                  weight_decay=decay, progress=False)
    torch.testing.assert_close(first.weight[0], before * (1 - rate * decay) ** steps)


def test_flush_denormals_restores_the_thread_state():
    tiny = torch.tensor([DENORMAL])
    outside = bool((tiny * 1.0 == 0).item())
    with flush_denormals() as supported:
        if supported:
            assert (torch.tensor([DENORMAL]) * 1.0).item() == 0
    assert bool((tiny * 1.0 == 0).item()) == outside
