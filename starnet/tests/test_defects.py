import numpy as np
import pytest
import torch

from starnet.defects import FrameDefects, saturate


def test_saturation_keeps_the_charge_of_an_isolated_star():
    """A bright star clipped at the full well: every pixel above the level is masked, the
    trails run along columns only, and the charge of a column whose excess fits its trail
    is kept."""
    rows = torch.arange(41.0)[:, None]
    cols = torch.arange(9.0)[None, :]
    star = 4e6 * torch.exp(-((rows - 20) ** 2 + (cols - 4) ** 2) / (2 * 1.2 ** 2))
    images = (star / (2 * np.pi * 1.2 ** 2))[None, None]
    level = 2e5
    clipped, mask = saturate(images, level)
    assert torch.all(mask[images > level])
    assert float(clipped.max()) == pytest.approx(level)
    # trails are vertical: a masked pixel's column holds a pixel above the level
    assert torch.all(mask.any(dim=-2) == (images > level).any(dim=-2))
    centre = images[0, 0, :, 4].sum()
    kept = clipped[0, 0, :, 4].sum()
    assert float(kept) == pytest.approx(float(centre), rel=level / float(centre) * 1.01)
    assert float(kept) <= float(centre) + level    # at most one partial pixel more


def test_defects_spoil_every_band_and_are_seeded():
    defects = FrameDefects(saturation_range=None, bad_column_rate=200.0, cosmic_ray_rate=50.0,
                           edge_probability=1.0)
    images = torch.full((4, 2, 32, 32), 700.0)
    first = defects.apply(images, generator=torch.Generator().manual_seed(1))
    again = defects.apply(images, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first[0], again[0])
    assert torch.equal(first[1], again[1])
    mask = first[1]
    assert torch.equal(mask[:, 0], mask[:, 1])        # columns, hits, edges: every band
    # every image has a masked edge strip: a full masked row or column at one side
    for m in mask[:, 0]:
        sides = [m[0].all(), m[-1].all(), m[:, 0].all(), m[:, -1].all()]
        assert any(bool(side) for side in sides)
    # unmasked pixels are untouched
    assert torch.all(first[0][~mask] == 700.0)


def test_unsaturated_images_keep_their_bright_stars():
    """With unsaturated_probability p, a fraction p of the images keeps every pixel
    (binomial bounds on 400 images), the others are clipped at their full well."""
    defects = FrameDefects(saturation_range=(1e5, 1e5), unsaturated_probability=0.25,
                           bad_column_rate=0.0, cosmic_ray_rate=0.0, edge_probability=0.0)
    images = torch.full((400, 2, 9, 9), 700.0)
    images[:, :, 4, 4] = 5e5
    out, mask = defects.apply(images, generator=torch.Generator().manual_seed(2))
    kept = (out == images).flatten(1).all(dim=1)
    assert torch.equal(~kept, mask.flatten(1).any(dim=1))   # clipped images are masked
    torch.testing.assert_close(out[~kept].amax(dim=(1, 2, 3)), torch.full(((~kept).sum(),), 1e5))
    assert 0.25 - 3 * 0.0217 < kept.float().mean() < 0.25 + 3 * 0.0217
    none = FrameDefects(saturation_range=(1e5, 1e5), bad_column_rate=0.0,
                        cosmic_ray_rate=0.0, edge_probability=0.0)
    assert none.apply(images)[1].flatten(1).any(dim=1).all()


@pytest.mark.parametrize(("name", "value"), [("bad_column_rate", -1.0),
                                             ("unsaturated_probability", 1.2),
                                             ("unsaturated_probability", -0.1),
                                             ("cosmic_ray_rate", float("nan")),
                                             ("edge_probability", 1.5)])
def test_defect_settings_are_checked(name, value):
    with pytest.raises(ValueError, match=name):
        FrameDefects(**{name: value})
    with pytest.raises(ValueError, match="saturation_range"):
        FrameDefects(saturation_range=(0.0, 1e5))
