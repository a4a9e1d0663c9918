"""The cells' size: the scale-space estimate on synthetic cells of known radius, and prediction
on images whose cells are larger than the model's training cells (`--diameter`)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from cellcount_jax import cellsize, metrics, model_folder, predict, volumes
from cellcount_jax.data import io, synthetic_image
from cellcount_jax.errors import InputError

CELLCOUNT = os.path.join(os.path.dirname(sys.executable), "cellcount")

# (shape, spacing, mean radius in physical units, number of cells)
CASES = {
    "2d_r4": ((256, 256), (1.0, 1.0), 4.0, (40, 80)),
    "2d_r8": ((256, 256), (1.0, 1.0), 8.0, (15, 30)),
    "3d_z2_r4": ((64, 128, 128), (2.0, 1.0, 1.0), 4.0, (30, 60)),
    "3d_r6": ((64, 128, 128), (1.0, 1.0, 1.0), 6.0, (20, 40)),
}


@pytest.fixture(scope="module")
def cells():
    """{case: (image, dots, spacing, radius)} of `synthetic_image`."""
    out = {}
    for name, (shape, spacing, radius, n) in CASES.items():
        image, dots = synthetic_image(0, shape=shape, num_cells=n, radius=radius,
                                      spacing=spacing)
        out[name] = image, dots, spacing, radius
    return out


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.0, 1.0, 1.0)])
def test_the_response_is_the_scale_normalised_laplacian_of_gaussian(spacing):
    """Against `scipy.ndimage.gaussian_laplace`'s terms (each axis's Gaussian second
    derivative, over its spacing squared, times -sigma^d), at the scales of 1.5 pixels or more
    on every axis, away from the edges, subsampled grids included."""
    shape = (128, 128) if len(spacing) == 2 else (48, 96, 96)
    image, _ = synthetic_image(3, shape=shape, num_cells=(20, 40), radius=5.0, spacing=spacing)
    a = image.mean(-1).astype(np.float64)
    checked = 0
    for sigma, response, stride in cellsize.scale_space(a, spacing):
        pixels = sigma / np.asarray(spacing)
        if pixels.min() < 1.5 or np.any(8 * pixels > shape):
            continue
        reference = -sigma ** a.ndim * sum(
            ndimage.gaussian_filter(a, pixels, order=[2 * (j == i) for j in range(a.ndim)])
            / spacing[i] ** 2 for i in range(a.ndim))
        reference = reference[tuple(slice(None, None, k) for k in stride)]
        inner = tuple(slice(int(np.ceil(3 * p / k)), -int(np.ceil(3 * p / k)))
                      for p, k in zip(pixels, stride))
        error = np.abs(response - reference)[inner].max() / np.abs(reference).max()
        assert error < 0.04, (sigma, stride, error)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("case", list(CASES))
def test_the_diameter_of_synthetic_cells_is_twice_their_radius(cells, case):
    image, dots, spacing, radius = cells[case]
    record = cellsize.of_training_set([image], [dots], spacing)
    assert record["polarity"] == "bright" and record["estimator"] == cellsize.ESTIMATOR
    assert json.loads(json.dumps(record)) == record
    assert abs(record["diameter"] / (2 * radius) - 1) < 0.15, record
    without_dots = cellsize.estimate(image, spacing)
    assert abs(without_dots / (2 * radius) - 1) < 0.15, without_dots


def _upsampled(image, dots, factor=2):
    """`image` (*spatial, C) and its dots zoomed by `factor` (linear; pixel centres map to
    pixel centres: a pixel's centre d goes to (d + 0.5) * factor - 0.5)."""
    zoom = (factor,) * (image.ndim - 1) + (1,)
    big = ndimage.zoom(image, zoom, order=1, grid_mode=True, mode="nearest")
    return big, (dots + 0.5) * factor - 0.5


def test_the_diameter_follows_the_cells_size(cells):
    small, dots, spacing, _ = cells["2d_r4"]
    large = cells["2d_r8"]
    ratio = (cellsize.of_training_set([large[0]], [large[1]], spacing)["diameter"]
             / cellsize.of_training_set([small], [dots], spacing)["diameter"])
    assert abs(ratio / 2 - 1) < 0.15, ratio
    assert abs(cellsize.estimate(large[0], spacing) / cellsize.estimate(small, spacing) / 2
               - 1) < 0.15
    # The same cells seen twice as large.
    big, big_dots = _upsampled(small, dots)
    ratio = (cellsize.of_training_set([big], [big_dots], spacing)["diameter"]
             / cellsize.of_training_set([small], [dots], spacing)["diameter"])
    assert abs(ratio / 2 - 1) < 0.15, ratio
    ratio = cellsize.estimate(big, spacing) / cellsize.estimate(small, spacing)
    assert abs(ratio / 2 - 1) < 0.15, ratio


def test_dark_cells_on_a_bright_background(cells):
    """Stained nuclei in bright field: the polarity comes from the image at the dots, and the
    dark image with its polarity gives the bright one's diameter."""
    image, dots, spacing, _ = cells["2d_r4"]
    dark = 1.0 - image
    bright_record = cellsize.of_training_set([image], [dots], spacing)
    dark_record = cellsize.of_training_set([dark], [dots], spacing)
    assert dark_record["polarity"] == "dark"
    assert dark_record["diameter"] == pytest.approx(bright_record["diameter"], rel=1e-3)
    assert cellsize.estimate(dark, spacing, "dark") == pytest.approx(
        cellsize.estimate(image, spacing, "bright"), rel=1e-3)
    with pytest.raises(InputError, match="polarity"):
        cellsize.estimate(dark, spacing, "grey")


def test_nearest_dot_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    dots = rng.uniform(0, 50, (40, 3))
    spacing = (2.5, 1.0, 0.5)
    d = np.linalg.norm((dots[:, None] - dots[None]) * spacing, axis=-1)
    np.fill_diagonal(d, np.inf)
    assert cellsize.nearest_dot_distance(dots, spacing) == pytest.approx(np.median(d.min(1)))
    assert np.isnan(cellsize.nearest_dot_distance(dots[:1], spacing))
    # Pooled over images: the median of every dot's distance within its own image.
    record = cellsize.of_training_set([np.zeros((50, 50, 50, 1))] * 2, [dots[:20], dots[20:]],
                                      spacing)
    pooled = [np.where(np.eye(20, dtype=bool), np.inf, part).min(1)
              for part in (d[:20, :20], d[20:, 20:])]
    assert record["nearest_dot_distance"] == pytest.approx(np.median(np.concatenate(pooled)),
                                                           abs=1e-4)


class _Recorder(volumes.Volume):
    """A volume that keeps the boxes it is asked for."""

    def __init__(self, array):
        self.array, self.shape, self.channels = array, array.shape[:-1], array.shape[-1]
        self.dtype, self.name, self.boxes = array.dtype, "recorded", []

    def _read(self, index):
        self.boxes.append(index)
        return self.array[index]


def test_a_large_image_is_estimated_on_one_central_block(cells, monkeypatch):
    image = cells["2d_r4"][0]
    monkeypatch.setattr(cellsize, "BLOCK_VOXELS", 128 * 128)
    volume = _Recorder(np.tile(image, (1, 2, 1)))  # 256 x 512
    diameter = cellsize.estimate(volume, (1.0, 1.0))
    assert len(volume.boxes) == 1
    box = volume.boxes[0]
    size = np.array([s.stop - s.start for s in box])
    assert np.prod(size) <= 128 * 128 and np.all(size >= 100)
    centre = np.array([(s.start + s.stop) / 2 for s in box])
    assert np.all(np.abs(centre - (128, 256)) <= 1)
    assert diameter == cellsize.estimate(volume.array[box], (1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Prediction on cells of another size


MODEL = os.path.join(os.path.dirname(__file__), "..", "pretrained", "vgg2d_cpu")


@pytest.fixture(scope="module")
def shipped():
    """Synthetic cells of about the size of the shipped model's training cells, and their
    dots."""
    image, dots = synthetic_image(2, shape=(96, 96), num_cells=(25, 35), radius=5.0)
    return image, dots


def _model(cell_size=True):
    """The shipped model, without flips and input zoom (faster; the same detections in the
    image and in the image on a finer grid, resampled back)."""
    predictor = model_folder.load_model(MODEL)
    predictor.record.update(test_time_augmentation=False, zoom=1.0)
    if not cell_size:
        del predictor.record["cell_size"]
    return predictor


def _twice(image):
    """The image on a grid twice as fine: pixel j of the result is at j / 2 of the image (the
    resampling convention of prediction, `tiling.Resampled`), so every other pixel is the
    image's own."""
    n = np.array(image.shape[:-1])
    return ndimage.zoom(image, tuple((2 * n - 1) / n) + (1,), order=1)


def test_cells_twice_as_large_are_found_in_the_input_pixels(shipped):
    image, dots = shipped
    predictor = _model()
    diameter = predictor.cell_diameter
    assert diameter == pytest.approx(9.6, abs=0.5)  # the VGG cells' (shipped record)
    big = _twice(image)
    assert big.shape == (191, 191, 3)
    plain = predictor.detect(image)
    rescaled = predictor.detect(big, diameter=2 * diameter)
    assert len(plain) > 10 and len(rescaled) == len(plain)
    np.testing.assert_allclose(rescaled.pixels / 2, plain.pixels, atol=1e-4)
    np.testing.assert_allclose(rescaled.physical, rescaled.pixels, atol=1e-4)
    assert rescaled.count_integration == pytest.approx(plain.count_integration, rel=1e-4)
    # On the cells: as many found near their dots in the large image as in the small one.
    tp = metrics.match(plain.pixels, dots, 5.0)[0]
    assert tp >= 0.8 * len(dots) and metrics.match(rescaled.pixels, 2 * dots, 10.0)[0] == tp
    # In physical units: the same cells at half the spacing.
    rescaled = predictor.detect(big, spacing=0.5, diameter=diameter)
    np.testing.assert_allclose(rescaled.pixels / 2, plain.pixels, atol=1e-4)
    np.testing.assert_allclose(rescaled.physical, plain.pixels, atol=1e-4)
    # Estimated: about twice that of the image at the model's scale.
    zoom, estimated = predictor.input_zoom(big, diameter="auto")
    assert abs(estimated / (2 * cellsize.estimate(image, (1.0, 1.0))) - 1) < 0.15
    assert np.allclose(zoom, diameter / estimated)


def test_predict_with_a_diameter_writes_detections_in_the_input_pixels(shipped, tmp_path,
                                                                      capsys):
    image, _ = shipped
    predictor = _model()
    for name, array in (("small", image), ("big", _twice(image))):
        os.makedirs(tmp_path / name)
        tifffile.imwrite(tmp_path / name / "cells.tif", array, photometric="rgb")
    predict.predict_paths(predictor, str(tmp_path / "small"), str(tmp_path / "out_small"),
                          density="none", progress=False)
    diameter = 2 * predictor.cell_diameter
    rows = predict.predict_paths(predictor, str(tmp_path / "big"), str(tmp_path / "out_big"),
                                 diameter=diameter, density="none", progress=False)
    assert f"cells: cells {diameter:.4g} pixels across (given)" in capsys.readouterr().out
    plain = io.read_dots_csv(str(tmp_path / "out_small" / "cells_detections.csv"), 2)
    big = io.read_dots_csv(str(tmp_path / "out_big" / "cells_detections.csv"), 2)
    assert len(big) == len(plain) > 10
    rows_of = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_allclose(rows_of(big / 2), rows_of(plain), atol=2e-3)
    assert np.all(big >= 0) and np.all(big <= 190)
    settings = json.load(open(tmp_path / "out_big" / "cells_run.json"))["settings"]
    assert settings["diameter"] == {"given": diameter, "used": round(diameter, 4),
                                    "model": predictor.cell_diameter}
    assert settings["grid_zoom"] == [0.5, 0.5] and settings["grid_shape"] == [96, 96]
    counts = list(csv.DictReader(open(tmp_path / "out_big" / "counts.csv")))
    assert float(counts[0]["diameter"]) == pytest.approx(diameter, abs=1e-3)
    assert rows[0]["count_detections"] == len(big)
    # 'auto' estimates it; the same settings again resume the finished run.
    first = predict.predict_paths(predictor, str(tmp_path / "big"), str(tmp_path / "out_auto"),
                                  diameter="auto", density="none", progress=False)
    again = predict.predict_paths(predictor, str(tmp_path / "big"), str(tmp_path / "out_auto"),
                                  diameter="auto", density="none", progress=False)
    assert "(estimated)" in capsys.readouterr().out
    assert again == first


def test_a_diameter_needs_a_model_with_a_cell_size(shipped, tmp_path):
    image, _ = shipped
    predictor = _model(cell_size=False)
    assert predictor.cell_diameter is None
    assert len(predictor.detect(image)) > 10  # without a diameter: as before
    for diameter in (10, "auto"):
        with pytest.raises(InputError, match="no cell size"):
            predictor.detect(image, diameter=diameter)
    tifffile.imwrite(tmp_path / "image.tif", image, photometric="rgb")
    with pytest.raises(InputError, match="no cell size"):
        predict.predict_paths(predictor, str(tmp_path / "image.tif"), str(tmp_path / "out"),
                              diameter=10, progress=False)


def test_a_diameter_must_be_a_positive_number_or_auto(shipped):
    predictor = _model()
    for bad in (0, -3, "ten", float("nan")):
        with pytest.raises(InputError, match="--diameter must be a positive number"):
            predictor.input_zoom(shipped[0], diameter=bad)
    out = subprocess.run([CELLCOUNT, "predict", f"--model={MODEL}", "--input=x.png",
                          "--diameter=ten"], capture_output=True, text=True, timeout=300)
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and err == ["error: --diameter=ten: expected the cells' "
                                           "diameter (a number) or 'auto'"], out.stderr


def test_the_training_record_has_the_cell_size():
    from cellcount_jax import data
    from conftest import tiny_config
    config = tiny_config()
    record = model_folder.new_record(config, data.load(config), 1.0)
    size = record["cell_size"]
    assert set(size) == {"diameter", "nearest_dot_distance", "polarity", "estimator"}
    assert size["polarity"] == "bright" and json.loads(json.dumps(record)) == record
    assert abs(size["diameter"] / (2 * config.data.radius) - 1) < 0.3
