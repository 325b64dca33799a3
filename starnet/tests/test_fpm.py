from importlib.resources import files

import numpy as np
import pytest
from astropy.io import fits

from starnet.datasets.fpm import read_fpm_mask

SDSS = files("starnet") / "datasets" / "data" / "sdss"


def test_spans_match_the_objects_boxes_and_pixel_counts():
    """Each object's spans fill exactly its bounding box's rows and hold npix pixels."""
    path = SDSS / "fpM-002583-r2-0136.fit.gz"
    with fits.open(path) as hdul:
        table = hdul[2].data                     # SATUR
        first = table[:20]
    for row in first:
        single = np.zeros((1489, 2048), dtype=bool)
        spans = np.frombuffer(np.asarray(row["s"], dtype=np.uint8).tobytes(),
                              dtype=">i2").reshape(-1, 3)
        for y, x1, x2 in spans:
            single[y, x1:x2 + 1] = True
        rows, cols = np.nonzero(single)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == \
            (row["rmin"], row["rmax"], row["cmin"], row["cmax"])
        assert single.sum() == row["npix"]
    union = read_fpm_mask(path, planes=["SATUR"])
    assert union.sum() <= table["npix"].sum()
    # saturated stars are bright: the frame is high where SATUR says so
    from starnet.datasets import load_sdss_frame
    frame = load_sdss_frame(2583, 2, 136, ("r",)).data[0]
    assert np.median(frame[union]) > 20 * np.median(frame)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown fpM mask types"):
        read_fpm_mask(SDSS / "fpM-002583-r2-0136.fit.gz", planes=["SATURATED"])
    with pytest.raises(ValueError, match="is not an SDSS fpM file"):
        read_fpm_mask(SDSS / "photoField-002583-2.fits")
