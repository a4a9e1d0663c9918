"""The input zoom: the network sees each window resampled, its density comes back on the
image's grid, and calibration chooses the zoom with the detector."""
import os

import numpy as np
import pytest
from ml_collections import ConfigDict
from scipy import ndimage

from cellcount_jax import evaluation
from cellcount_jax.data import synthetic_image
from cellcount_jax.errors import InputError
from cellcount_jax.model_folder import load_model

MODEL = os.path.join(os.path.dirname(__file__), "..", "pretrained", "vgg2d_cpu")


@pytest.fixture(scope="module")
def models():
    plain, zoomed = load_model(MODEL), load_model(MODEL)
    for p in (plain, zoomed):
        p.record["test_time_augmentation"] = False
    plain.record["zoom"], zoomed.record["zoom"] = 1.0, 1.25
    return plain, zoomed


def test_zoomed_density_is_the_network_on_the_resampled_window(models):
    plain, zoomed = models
    img, _ = synthetic_image(5, shape=(60, 44), num_cells=(8, 12), radius=4.0)
    x = zoomed.normaliser.image(img.astype(np.float32))
    big = ndimage.zoom(x, (1.25, 1.25, 1), order=1)
    assert big.shape[:2] == (75, 55)
    ref = ndimage.zoom(plain.network(big), (60 / 75, 44 / 55), order=1)
    got = zoomed.network(x)
    assert got.shape == (60, 44)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_zoomed_detections_stay_on_the_cells(models):
    """Isolated cells: the zoomed model finds each at the same place (the grids line up)."""
    _, zoomed = models
    img = np.zeros((96, 80, 3), np.float32) + 40
    cells = np.array([[20, 16], [24, 60], [52, 36], [76, 14], [80, 62]], np.float32)
    yy, xx = np.mgrid[:96, :80]
    for y, x in cells:
        img[..., 0] += 150 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0 ** 2))
        img[..., 2] += 60 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0 ** 2))
    d = zoomed.density(img)
    peaks = np.argwhere((d == ndimage.maximum_filter(d, 5)) & (d > 0.5 * d.max()))
    dist = np.linalg.norm(peaks[:, None] - cells[None], axis=-1)
    assert len(peaks) == len(cells) and dist.min(1).max() <= 1.5


class _Stub:
    """A predictor whose maps find every cell at zoom 1.1 and half of them otherwise."""

    def __init__(self, best=1.1):
        self.record, self.best, self.seen = {"zoom": 1.0}, best, []

    @property
    def zoom(self):
        return self.record["zoom"]

    def density(self, image, normalised=False):
        self.seen.append(self.zoom)
        d = np.zeros(image.shape[:-1], np.float32)
        for i, (y, x) in enumerate(_DOTS):
            if self.zoom == self.best or i % 2 == 0:
                d[y, x] = 1.0
        return d


_DOTS = np.array([[5, 5], [5, 20], [20, 5], [20, 20], [12, 30], [30, 12]])


def _splits():
    class Split:
        images = [np.zeros((36, 36, 1), np.float32)]
        dots = [_DOTS.astype(np.float32)]
        rois = None
        targets = [np.ones((36, 36), np.float32)]
    from cellcount_jax.data import Splits
    return Splits(train=Split, calibration=Split, spacing=(1.0, 1.0))


def _config(zooms):
    c = ConfigDict({"eval": {"radius": 3.0, "detector": "peaks", "min_size": 1,
                             "min_distance_fractions": (0.0,), "threshold_fractions": (0.5,)},
                    "data": {"holdout": 0.0}})
    if zooms is not None:
        c.predict = {"zooms": zooms}
    return c


def test_calibration_chooses_the_zoom_with_the_best_f1():
    p = _Stub()
    evaluation.calibrate_record(_config((1.0, 1.1, 1.2)), p, _splits())
    assert p.record["zoom"] == 1.1 and p.seen == [1.0, 1.1, 1.2]
    assert p.record["detector"]["threshold"] == 0.5


def test_calibration_keeps_the_first_zoom_on_a_tie_and_defaults_to_one():
    p = _Stub(best=None)
    evaluation.calibrate_record(_config((1.0, 1.1)), p, _splits())
    assert p.record["zoom"] == 1.0
    p = _Stub()
    evaluation.calibrate_record(_config(None), p, _splits())
    assert p.record["zoom"] == 1.0 and p.seen == [1.0]
    with pytest.raises(InputError, match="zooms"):
        evaluation.zooms(_config((1.0, 0.0)))
