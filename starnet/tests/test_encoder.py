import numpy as np
import pytest
import torch

from starnet.encoder import StarNetEncoder, conditioning_map, normalize_image, pool_cells
from starnet.posterior import TiledPosterior
from starnet.tiles import TileCatalog

BACKGROUND = 700.0


def sky(shape, *, seed=0):
    """Noisy sky with a few bright pixels, (n_images, n_bands, rows, cols)."""
    generator = torch.Generator().manual_seed(seed)
    image = BACKGROUND + BACKGROUND ** 0.5 * torch.randn(shape, generator=generator)
    spikes = torch.rand(shape, generator=generator) < 0.05
    return image + 3000.0 * spikes


def encoder_of(**kwargs):
    torch.manual_seed(0)
    settings = dict(n_bands=2, hidden=8, tile_hidden=16)
    settings.update(kwargs)
    return StarNetEncoder(**settings).eval()


def flat_parameters(posterior):
    """All parameters of each tile, (n_images, tile_rows, tile_cols, n_values)."""
    parts = [posterior.count_logits, posterior.loc_mean, posterior.loc_sd,
             posterior.log_flux_mean, posterior.log_flux_sd]
    return torch.cat([p.reshape(*p.shape[:3], -1) for p in parts], dim=-1)


@pytest.mark.parametrize(('tile_size', 'max_sources', 'rows', 'cols'),
                         [(2, 3, 13, 9), (3, 2, 10, 11), (4, 1, 16, 7), (1, 3, 5, 6)])
def test_output_grid_and_shapes(tile_size, max_sources, rows, cols):
    encoder = encoder_of(tile_size=tile_size, max_sources=max_sources)
    with torch.no_grad():
        posterior = encoder(sky((2, 2, rows, cols)), torch.tensor(BACKGROUND))
    assert isinstance(posterior, TiledPosterior)
    grid = (2, int(np.ceil(rows / tile_size)), int(np.ceil(cols / tile_size)))
    n_slots = max_sources * (max_sources + 1) // 2
    assert posterior.count_logits.shape == (*grid, max_sources + 1)
    assert posterior.max_sources == max_sources
    assert posterior.loc_mean.shape == posterior.loc_sd.shape == (*grid, n_slots, 2)
    assert posterior.log_flux_mean.shape == posterior.log_flux_sd.shape == (*grid, n_slots, 2)
    assert torch.all(posterior.loc_sd > 0) and torch.all(posterior.log_flux_sd > 0)


def test_wrong_number_of_bands():
    with pytest.raises(ValueError, match=r'\(n_images, 2, rows, cols\)'):
        encoder_of()(sky((1, 3, 8, 8)), torch.tensor(BACKGROUND))
    with pytest.raises(ValueError, match=r'\(n_images, 2, rows, cols\)'):
        encoder_of()(sky((2, 8, 8)), torch.tensor(BACKGROUND))


@pytest.mark.parametrize('tile_size', [2, 3])
def test_receptive_field_window(tile_size):
    # the pixels that influence a tile's parameters (non-zero gradient) fill exactly the
    # documented window: receptive_field pixels wide, centred on the tile
    encoder = encoder_of(tile_size=tile_size, hidden=16, tile_hidden=32)
    assert encoder.receptive_field == 5 * tile_size + 6
    reach = (encoder.receptive_field - tile_size) // 2
    image = sky((1, 2, 48, 48)).requires_grad_()
    i, j = 7, 8                                   # a tile far from the image edges
    weights = torch.randn(flat_parameters(encoder(image, torch.tensor(BACKGROUND))).shape[-1],
                          generator=torch.Generator().manual_seed(2))
    value = flat_parameters(encoder(image, torch.tensor(BACKGROUND)))[0, i, j] @ weights
    value.backward()
    influence = (image.grad[0] != 0).any(dim=0).numpy()
    rows, cols = np.nonzero(influence)
    assert (rows.min(), rows.max()) == (i * tile_size - reach, (i + 1) * tile_size - 1 + reach)
    assert (cols.min(), cols.max()) == (j * tile_size - reach, (j + 1) * tile_size - 1 + reach)
    window = influence[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert window.shape == (encoder.receptive_field,) * 2
    assert window.mean() > 0.9


def test_receptive_field_perturbation():
    encoder = encoder_of(tile_size=2)
    image = sky((1, 2, 40, 40))
    i, j = 10, 9
    with torch.no_grad():
        reference = flat_parameters(encoder(image, torch.tensor(BACKGROUND)))[0, i, j]

    def change(band, row, col):
        perturbed = image.clone()
        perturbed[0, band, row, col] += 20000.0
        with torch.no_grad():
            out = flat_parameters(encoder(perturbed, torch.tensor(BACKGROUND)))[0, i, j]
        return (out - reference).abs().max().item()

    far = encoder.receptive_field // 2 + 2        # farther than this from the tile
    assert change(0, 2 * i, 2 * j) > 1e-4
    assert change(1, 2 * i + 1, 2 * j + 1) > 1e-4
    for pixel in [(0, 2 * i - far - 1, 2 * j), (1, 2 * i + 1 + far + 1, 2 * j),
                  (0, 2 * i, 2 * j - far - 1), (1, 2 * i, 2 * j + 1 + far + 1)]:
        assert change(*pixel) < 1e-6, pixel


def test_normalize_image_is_per_pixel():
    generator = torch.Generator().manual_seed(1)
    image = sky((2, 3, 6, 7))
    background = 500.0 + 400.0 * torch.rand((2, 3, 6, 7), generator=generator)
    reference = normalize_image(image, background)
    assert reference.shape == (2, 6, 6, 7)
    for index in [(0, 0, 2, 3), (1, 2, 5, 0), (0, 1, 0, 6)]:
        image_n, band, row, col = index
        perturbed = image.clone()
        perturbed[index] = background[index] + 5000.0
        changed = (normalize_image(perturbed, background) != reference).nonzero().tolist()
        assert sorted(changed) == [[image_n, band, row, col], [image_n, 3 + band, row, col]]


def test_signal_to_noise_channel_is_asinh_to_float32_rounding():
    """The first channel, asinh of the excess over its noise, against numpy's float64
    asinh: relative error at float32 rounding from 1e-6 to 1e6 sky sigmas, either sign,
    and finite for absurd values."""
    z = np.concatenate([np.logspace(-6, 6, 200), -np.logspace(-6, 6, 200), [0.0]])
    background = torch.tensor(400.0)
    image = (background + torch.tensor(z * 20.0)).float()[None, None, None]
    got = normalize_image(image, background)[0, 0, 0].double().numpy()
    expected = np.arcsinh((image[0, 0, 0].double().numpy() - 400.0) / 20.0)
    np.testing.assert_allclose(got, expected, rtol=3e-6, atol=1e-12)
    huge = normalize_image(torch.tensor([[[[3e38, -3e38]]]]), torch.tensor(1.0))
    assert torch.isfinite(huge).all()


def test_normalize_image_empty_sky_is_zero():
    background = torch.tensor([686.0, 1123.0]).reshape(1, 2, 1, 1)
    image = background.expand(1, 2, 4, 5)
    assert torch.all(normalize_image(image, background) == 0)


def test_batch_equals_images_one_by_one():
    encoder = encoder_of()
    images = sky((3, 2, 12, 10), seed=4)
    background = torch.tensor([700.0, 900.0]).reshape(1, 2, 1, 1)
    for mode in (encoder.eval, encoder.train):
        mode()
        with torch.no_grad():
            batch = flat_parameters(encoder(images, background))
            for n in range(3):
                alone = flat_parameters(encoder(images[n:n + 1], background))
                torch.testing.assert_close(batch[n:n + 1], alone, rtol=1e-5, atol=1e-5)


def test_odd_size_padding_is_empty_sky():
    # the encoder pads images to whole tiles with zero normalised input: the same as
    # padding the image with its background
    encoder = encoder_of(tile_size=2)
    image = sky((1, 2, 13, 9), seed=5)
    padded = torch.nn.functional.pad(image, (0, 1, 0, 1), value=BACKGROUND)
    with torch.no_grad():
        odd = flat_parameters(encoder(image, torch.tensor(BACKGROUND)))
        even = flat_parameters(encoder(padded, torch.tensor(BACKGROUND)))
    torch.testing.assert_close(odd, even, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_size", [2, 3])
def test_chunked_equals_one_shot(tile_size):
    torch.manual_seed(3)
    encoder = StarNetEncoder(n_bands=2, tile_size=tile_size, hidden=8, tile_hidden=16).eval()
    image = 700.0 + 40 * torch.randn(1, 2, 61, 74)
    image[0, :, 30, 40] += 5000.0
    background = torch.full_like(image, 700.0)
    with torch.no_grad():
        whole = encoder(image, background)
        chunked = encoder(image, background, chunk_tiles=5)
    for name in ("count_logits", "loc_mean", "loc_sd", "log_flux_mean", "log_flux_sd"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name),
                                   rtol=1e-4, atol=1e-4)


def _random_tiles(grid_shape, n_images=1, max_sources=3, n_bands=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (n_images, *grid_shape)
    return TileCatalog(
        counts=torch.randint(0, max_sources + 1, shape, generator=generator),
        locs=torch.rand(*shape, max_sources, 2, generator=generator),
        fluxes=1000 + 5000 * torch.rand(*shape, max_sources, n_bands, generator=generator),
        n_dropped=0)


def test_checkerboard_colors():
    encoder = StarNetEncoder(n_bands=1, n_colors=4, hidden=4, tile_hidden=8)
    colors = encoder.tile_colors((4, 4))
    assert colors.tolist()[:2] == [[0, 1, 0, 1], [2, 3, 2, 3]]
    # no two tiles that touch (diagonals included) share a colour
    for di, dj in [(0, 1), (1, 0), (1, 1), (1, -1)]:
        a = colors[max(di, 0):4 + min(di, 0), max(dj, 0):4 + min(dj, 0)]
        b = colors[max(-di, 0):4 + min(-di, 0), max(-dj, 0):4 + min(-dj, 0)]
        assert torch.all(a != b)
    with pytest.raises(ValueError, match="n_colors must be 1, 2 or 4"):
        StarNetEncoder(n_bands=1, n_colors=3)


def test_checkerboard_tiles_see_decided_neighbours():
    torch.manual_seed(0)
    encoder = StarNetEncoder(n_bands=2, n_colors=4, hidden=8, tile_hidden=16).eval()
    image = 700.0 + 30 * torch.randn(1, 2, 16, 16)
    background = torch.full_like(image, 700.0)
    features = encoder.features(image, background)
    colors = encoder.tile_colors(features.shape[-2:])[None]
    tiles = _random_tiles((8, 8))
    other = _random_tiles((8, 8), seed=1)
    with torch.no_grad():
        # colour-1 tiles see the catalogs of colour-0 tiles, and nothing else
        decided = colors < 1
        q = encoder.tile_posterior(features, conditioning_map(tiles, decided, 8.0))
        changed_own = tiles.where(colors != 1, other)          # colour-1 catalogs differ
        q_own = encoder.tile_posterior(features, conditioning_map(changed_own, decided, 8.0))
        changed_neighbour = tiles.where(colors != 0, other)    # colour-0 catalogs differ
        q_neighbour = encoder.tile_posterior(features,
                                             conditioning_map(changed_neighbour, decided, 8.0))
    torch.testing.assert_close(q_own.count_logits, q.count_logits)
    assert not torch.allclose(q_neighbour.count_logits[colors == 1], q.count_logits[colors == 1])


def test_checkerboard_decide_and_joint_log_prob():
    torch.manual_seed(0)
    encoder = StarNetEncoder(n_bands=2, n_colors=2, hidden=8, tile_hidden=16).eval()
    image = 700.0 + 30 * torch.randn(1, 2, 12, 12)
    background = torch.full_like(image, 700.0)
    with torch.no_grad():
        features = encoder.features(image, background)
        posterior, mode = encoder.decide(features, lambda q: q.mode())
        # the mode of the assembled posterior is the catalog that was decided
        again = posterior.mode()
        torch.testing.assert_close(again.counts, mode.counts)
        # the joint log density of the decided catalog, tile by tile, equals the assembled
        # posterior's density of it (each tile conditioned on its predecessors' choices)
        torch.testing.assert_close(encoder.joint_log_prob(features, mode),
                                   posterior.log_prob(mode))
    with pytest.raises(ValueError, match="conditioning map"):
        encoder.tile_posterior(features)


def conditioned_encoder(*, seed=0, **kwargs):
    """An encoder with every input (mask, PSF map, context), its PSF modulation made
    non-trivial (it starts as the identity)."""
    torch.manual_seed(seed)
    settings = dict(n_bands=2, hidden=8, tile_hidden=16, mask_channel=True,
                    psf_features=3, context_cells=4, context_hidden=8)
    settings.update(kwargs)
    encoder = StarNetEncoder(**settings).eval()
    with torch.no_grad():
        for parameter in encoder.psf_embedding[-1].parameters():
            parameter.normal_(0.0, 0.3)
    return encoder


def test_conditioned_chunked_equals_one_shot():
    """With a mask, a PSF map that varies over the image and the context branch, the
    block-by-block posterior equals the one-shot one, also for blocks not a multiple of
    the context cell and an image not a multiple of the tile size."""
    encoder = conditioned_encoder()
    generator = torch.Generator().manual_seed(5)
    image = sky((1, 2, 83, 97), seed=1)
    mask = torch.rand(1, 2, 83, 97, generator=generator) < 0.05
    psf = torch.randn(1, 6, 42, 49, generator=generator)
    background = torch.full_like(image, BACKGROUND)
    with torch.no_grad():
        whole = encoder(image, background, mask=mask, psf=psf)
        chunked = encoder(image, background, mask=mask, psf=psf, chunk_tiles=6)
        features = encoder.features(image, background, mask=mask, psf=psf, chunk_tiles=7)
        via_features = encoder.tile_posterior(features)
    torch.testing.assert_close(flat_parameters(chunked), flat_parameters(whole),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flat_parameters(via_features), flat_parameters(whole),
                               rtol=1e-4, atol=1e-4)


def influence_window(encoder, image, i, j, **inputs):
    """Rows and columns of the pixels whose values change tile (i, j)'s parameters."""
    image = image.clone().requires_grad_()
    out = flat_parameters(encoder(image, torch.tensor(BACKGROUND), **inputs))[0, i, j]
    out.sum().backward()
    rows, cols = np.nonzero((image.grad[0] != 0).any(dim=0).numpy())
    return (rows.min(), rows.max()), (cols.min(), cols.max())


def test_context_branch_widens_the_window():
    """Without context a tile reads receptive_field pixels; with it, pixels as far as
    the context cells reach, and no farther than context_field."""
    image = sky((1, 2, 160, 160), seed=2)
    plain = encoder_of(tile_size=2)
    (r0, r1), _ = influence_window(plain, image, 40, 40)
    assert r1 - r0 + 1 == plain.receptive_field
    context = encoder_of(tile_size=2, context_cells=4, context_hidden=8)
    (r0, r1), (c0, c1) = influence_window(context, image, 40, 40)
    assert r1 - r0 + 1 > 2 * plain.receptive_field
    assert r1 - r0 + 1 <= context.context_field and c1 - c0 + 1 <= context.context_field


def test_partial_cells_pool_the_pixels_they_hold():
    """The mean and maximum of a cell cut by the image edge are those of its pixels,
    computed here one cell at a time."""
    features = torch.randn(2, 3, 13, 10, generator=torch.Generator().manual_seed(5))
    mean, maximum = pool_cells(features, 4)
    assert mean.shape == maximum.shape == (2, 3, 4, 3)
    for i in range(4):
        for j in range(3):
            cell = features[..., 4 * i:4 * i + 4, 4 * j:4 * j + 4].flatten(-2)
            torch.testing.assert_close(mean[..., i, j], cell.mean(-1))
            torch.testing.assert_close(maximum[..., i, j], cell.max(-1).values)


def test_context_of_a_uniform_image_ignores_where_the_image_ends():
    """On an image of one value, a partial context cell reads what a whole one does:
    the context of a 36 x 36 image (last cells 4 of 8 pixels) equals that of 40 x 40."""
    encoder = encoder_of(tile_size=2, context_cells=4, context_hidden=8)
    x = torch.full((1, 4, 40, 40), 0.7)
    with torch.no_grad():
        torch.testing.assert_close(encoder._context(x[..., :36, :36]), encoder._context(x))


def test_masked_pixels_values_are_ignored():
    """A masked pixel's value does not reach the posterior; the mask itself does."""
    encoder = conditioned_encoder()
    image = sky((1, 2, 24, 24), seed=3)
    mask = torch.zeros(1, 2, 24, 24, dtype=torch.bool)
    mask[..., 10:13, 5] = True
    changed = image.clone()
    changed[..., 10:13, 5] += 10000.0
    psf = torch.zeros(1, 6)
    with torch.no_grad():
        first = flat_parameters(encoder(image, torch.tensor(BACKGROUND), mask=mask, psf=psf))
        second = flat_parameters(encoder(changed, torch.tensor(BACKGROUND), mask=mask, psf=psf))
        unmasked = flat_parameters(encoder(image, torch.tensor(BACKGROUND), psf=psf))
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, unmasked)


def test_psf_descriptor_modulates_and_a_constant_map_equals_one_psf():
    encoder = conditioned_encoder()
    image = sky((2, 2, 20, 22), seed=4)
    psf = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = flat_parameters(encoder(image, torch.tensor(BACKGROUND), psf=psf))
        as_map = flat_parameters(encoder(image, torch.tensor(BACKGROUND),
                                         psf=psf[..., None, None].expand(-1, -1, 10, 11)))
        other = flat_parameters(encoder(image, torch.tensor(BACKGROUND), psf=psf + 1.0))
    torch.testing.assert_close(as_map, one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, one)
    # a new encoder starts as the identity modulation: the PSF has no effect yet
    fresh = encoder_of(psf_features=3)
    with torch.no_grad():
        torch.testing.assert_close(
            flat_parameters(fresh(image, torch.tensor(BACKGROUND), psf=psf)),
            flat_parameters(fresh(image, torch.tensor(BACKGROUND), psf=psf + 1.0)))


def test_config_rebuilds_the_architecture():
    encoder = conditioned_encoder()
    rebuilt = StarNetEncoder(**encoder.config())
    rebuilt.load_state_dict(encoder.state_dict())
    assert rebuilt.config() == encoder.config()
    assert encoder_of().config() == {"n_bands": 2, "tile_size": 2, "max_sources": 3,
                                     "hidden": 8, "tile_hidden": 16, "n_colors": 1,
                                     "log_flux_offset": pytest.approx(np.log(3000.0))}


def test_conditioned_inputs_are_checked():
    image = sky((1, 2, 16, 16))
    with pytest.raises(ValueError, match="reads the PSF: give psf, 6"):
        conditioned_encoder()(image, torch.tensor(BACKGROUND))
    with pytest.raises(ValueError, match=r"psf must have shape \(n_images, 6\) or "
                                         r"\(n_images, 6, 8, 8\)"):
        conditioned_encoder()(image, torch.tensor(BACKGROUND), psf=torch.zeros(1, 6, 3, 3))
    with pytest.raises(ValueError, match="takes no mask"):
        encoder_of()(image, torch.tensor(BACKGROUND), mask=image > 0)
    with pytest.raises(ValueError, match="takes no PSF"):
        encoder_of()(image, torch.tensor(BACKGROUND), psf=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="context_cells must be 0 or at least 4"):
        encoder_of(context_cells=2)
