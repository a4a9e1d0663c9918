"""A user's own folder: train on it, then predict on new images of any size."""
import csv
import os

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from PIL import Image

from cellcount_jax import evaluation, postprocess
from cellcount_jax.data import synthetic_image
from test_launch import TINY, launch


def write_folder(root, n, shape, labeled=None, seed=0):
    """n synthetic PNGs; the first `labeled` (default all) get a dot CSV."""
    img_dir, dot_dir = os.path.join(root, "images"), os.path.join(root, "dots")
    os.makedirs(img_dir)
    os.makedirs(dot_dir)
    for i in range(n):
        img, dots = synthetic_image(seed + i, shape=shape, num_cells=(4, 8), radius=3.0)
        Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(img_dir, f"im{i}.png"))
        if labeled is None or i < labeled:
            with open(os.path.join(dot_dir, f"im{i}.csv"), "w") as f:
                f.write("y,x\n" + "".join(f"{y},{x}\n" for y, x in dots))
    return img_dir, dot_dir


def test_folder_train_then_predict(tmp_path):
    img_dir, dot_dir = write_folder(str(tmp_path / "train"), 4, (40, 36), labeled=2)
    wd = str(tmp_path / "run")
    overrides = [a for a in TINY if "data.shape" not in a and "num_" not in a]
    launch(f"--workdir={wd}", "--config.data.source=folder", f"--config.data.images={img_dir}",
           f"--config.data.annotations={dot_dir}", "--config.data.test_names=('im0',)",
           *overrides)
    new_img, new_dots = write_folder(str(tmp_path / "new"), 2, (44, 52), seed=10)
    out = str(tmp_path / "pred")
    launch(f"--workdir={wd}", "--mode=predict", f"--input={new_img}", f"--output={out}",
           f"--annotations={new_dots}", *overrides)
    rows = list(csv.DictReader(open(os.path.join(out, "counts.csv"))))
    assert [r["name"] for r in rows] == ["im0", "im1"]
    assert {"count_detections", "count_integration", "true_count", "tp"} <= set(rows[0])
    density = tifffile.imread(os.path.join(out, "im1_density.tif"))
    assert density.shape == (44, 52) and density.dtype == np.float32
    overlay = np.asarray(Image.open(os.path.join(out, "im1_overlay.png")))
    assert overlay.shape == (88 + 28, 104, 3)  # + the legend
    det = list(csv.DictReader(open(os.path.join(out, "im1_detections.csv"))))
    assert len(det) == int(rows[1]["count_detections"])
    if det:
        assert {"axis-0", "axis-1", "y_physical", "x_physical", "density"} <= set(det[0])
    # A single file works too.
    launch(f"--workdir={wd}", "--mode=predict", f"--input={os.path.join(new_img, 'im1.png')}",
           f"--annotations={os.path.join(new_dots, 'im1.csv')}", f"--output={out}/one",
           *overrides)
    one = list(csv.DictReader(open(os.path.join(out, "one", "counts.csv"))))
    assert [r["name"] for r in one] == ["im1"] and one[0]["true_count"] == rows[1]["true_count"]


def test_local_maxima_by_hand():
    d = np.zeros((12, 12))
    d[3, 3] = 2.0
    d[3, 4] = 1.0          # shoulder, not a peak
    d[8, 8] = d[8, 9] = 1.5  # plateau: one detection at its centre
    d[10, 1] = 0.2         # below threshold
    got = postprocess.local_maxima(d, 0.5)
    got = got[np.argsort(got[:, 0])]
    np.testing.assert_allclose(got, [[3, 3], [8, 8.5]])


@pytest.mark.parametrize("min_distance,spacing", [(0.0, None), (2.5, None), (4.0, (2.0, 1.0, 1.0)),
                                                  (3.0, (1.0, 0.5, 0.5))])
def test_local_maxima_with_a_minimum_distance_match_brute_force(min_distance, spacing):
    """A pixel is a peak iff no pixel within `min_distance` (physical units; at least the
    3^ndim neighbours) is higher, checked pixel by pixel."""
    rng = np.random.default_rng(1)
    d = ndimage.gaussian_filter(rng.random((9, 14, 15)), 1.0)  # ties have probability 0
    s = np.ones(3) if spacing is None else np.asarray(spacing)
    pix = np.array(list(np.ndindex(d.shape)))
    off = pix[:, None] - pix[None]                        # every pair of pixels
    near = np.all(np.abs(off) <= 1, -1) | (np.sum((off * s) ** 2, -1) <= min_distance ** 2)
    v = d.ravel()
    higher_near = np.any(near & (v[None] > v[:, None]), axis=1)
    expect = [tuple(p) for p in pix[(v > 0.45) & ~higher_near]]
    got = postprocess.local_maxima(d, 0.45, min_distance, spacing)
    assert len(expect) > 2
    np.testing.assert_array_equal(sorted(map(tuple, got.astype(int))), sorted(expect))


def test_calibration_chooses_a_minimum_distance_for_cells_with_two_bumps():
    """Each cell's map has a second, lower bump 3 px from its peak: the 3x3 peaks count it
    twice, a minimum distance of one radius (5) counts it once."""
    d = np.zeros((40, 40))
    dots = np.array([[8, 8], [8, 28], [28, 8], [28, 28]], np.float32)
    for y, x in dots.astype(int):
        d[y, x], d[y, x + 3] = 2.0, 1.5
    chosen = evaluation.calibrate([d], [dots], [0.5, 1.0], 5.0, detector="auto",
                                  min_distances=(0.0, 2.5, 5.0))
    assert chosen == {"name": "peaks", "threshold": 0.5, "min_distance": 5.0, "split": 0.0}
    r = evaluation.score([d], [dots], 0.5, [5.0], detector="peaks", min_distance=0.0)[0]
    assert (r["tp"], r["fp"]) == (4, 4)


def test_integration_readout_counts_gaussian_mass():
    from cellcount_jax.data import make_targets
    rng = np.random.default_rng(0)
    dots = [rng.uniform(8, 56, (k, 2)).astype(np.float32) for k in (5, 9, 14)]
    maps = make_targets([np.zeros((64, 64, 1))] * 3, dots, "gaussian", 100.0)
    mass = sum(m.sum() for m in maps) / sum(len(d) for d in dots)
    assert mass == pytest.approx(100.0, rel=1e-3)
    r, _, rows = evaluation.score(maps, dots, 100.0 / (8 * np.pi) / 2, [3.0], None,
                                  "peaks", 1, mass)
    assert r["mae_integration"] < 0.05
    assert [round(x["integrated_count"]) for x in rows] == [5, 9, 14]


@pytest.mark.parametrize("spacing", [None, (2.0, 0.5, 0.5)])
def test_close_pairs_match_brute_force_and_tiles_add_up(spacing):
    from scipy.spatial.distance import pdist
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 30, (200, 3))
    s = np.ones(3) if spacing is None else np.asarray(spacing)
    expect = int(np.sum(pdist(pts * s) <= 4.0))
    assert expect > 10
    assert postprocess.close_pairs(pts, 4.0, spacing) == expect
    # two tiles split at z = 15, each seeing every point: their shares add up
    left = pts[:, 0] < 15
    halves = [postprocess.close_pairs(pts, 4.0, spacing, own) for own in (left, ~left)]
    assert sum(halves) == expect and min(halves) > 0


def _merged(points, distance):
    """Detections that miss crowded cells: each point closer than `distance` to an earlier
    kept one is merged into it."""
    kept = []
    for p in points:
        if all(np.hypot(*(p - q)) >= distance for q in kept):
            kept.append(p)
    return np.array(kept)


def test_crowding_fit_is_least_squares_and_corrects_merged_counts():
    """Cells at random, and detections that merge cells closer than 3 px: the corrected
    count, fitted on 8 images, counts 40 others with a fraction of the detections' error."""
    rng = np.random.default_rng(0)
    dots = [rng.uniform(0, 128, (rng.integers(150, 400), 2)) for _ in range(48)]
    preds = [_merged(d, 3.0) for d in dots]
    crowd = evaluation.crowding(preds[:8], dots[:8], 10.0)
    pairs = np.array([postprocess.close_pairs(p, 10.0) for p in preds[:8]])
    missed = np.array([len(d) - len(p) for p, d in zip(preds[:8], dots[:8])])
    c, *_ = np.linalg.lstsq(pairs[:, None], missed, rcond=None)
    assert crowd == pytest.approx({"distance": 10.0, "per_pair": float(c[0])})
    raw = np.mean([abs(len(p) - len(d)) for p, d in zip(preds[8:], dots[8:])])
    corrected = np.mean([abs(evaluation.corrected_count(p, crowd) - len(d))
                         for p, d in zip(preds[8:], dots[8:])])
    assert raw > 5 and corrected < raw / 3
