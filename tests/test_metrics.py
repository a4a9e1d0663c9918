"""Post-processing and metrics against hand-computed cases."""
import numpy as np
import pytest

from cellcount_jax import metrics, postprocess


def test_detect_components_and_centroids():
    d = np.zeros((20, 20))
    d[2:5, 2:5] = 1.0                 # centre (3, 3)
    d[10, 10], d[10, 11] = 1.0, 3.0   # weighted centre (10, 10.75)
    d[15, 15] = 0.2                   # below threshold
    d[18, 1] = 0.9                    # single pixel
    c = postprocess.detect(d, 0.5)
    expected = np.array([[3, 3], [10, 10.75], [18, 1]])
    np.testing.assert_allclose(c[np.lexsort(c.T[::-1])], expected[np.lexsort(expected.T[::-1])],
                               atol=1e-6)
    assert len(postprocess.detect(d, 0.5, min_size=2)) == 2
    assert postprocess.detect(np.zeros((5, 5)), 0.5).shape == (0, 2)


def test_detect_3d_diagonal_is_not_connected():
    d = np.zeros((4, 4, 4))
    d[1, 1, 1] = d[2, 2, 2] = 1.0
    assert len(postprocess.detect(d, 0.5)) == 2


def test_match_is_one_to_one_and_maximal():
    # Greedy nearest matching pairs p0-g1 (distance 1) and leaves p1 and g0 unmatched;
    # the maximum matching pairs p0-g0 and p1-g1.
    pred = np.array([[0.0, 2.0], [0.0, 4.5]])
    gt = np.array([[0.0, 0.0], [0.0, 3.0]])
    assert metrics.match(pred, gt, radius=2.0) == (2, 0, 0)
    # Two predictions on one cell: one is a false positive.
    assert metrics.match(np.array([[0, 0], [0, 1.0]]), np.array([[0, 0.5]]), 2.0) == (1, 1, 0)


def test_match_radius_is_inclusive_and_uses_spacing():
    assert metrics.match(np.array([[0, 3.0]]), np.array([[0, 0.0]]), 3.0) == (1, 0, 0)
    assert metrics.match(np.array([[0, 3.01]]), np.array([[0, 0.0]]), 3.0) == (0, 1, 1)
    # One z step of 4 units is too far for radius 3, one x step is not.
    p, g = np.array([[1.0, 0, 0]]), np.array([[0.0, 0, 0]])
    assert metrics.match(p, g, 3.0, spacing=(4.0, 1.0, 1.0)) == (0, 1, 1)
    assert metrics.match(p, g, 3.0, spacing=(2.0, 1.0, 1.0)) == (1, 0, 0)


def test_empty_inputs():
    assert metrics.match(np.zeros((0, 2)), np.array([[1.0, 1.0]]), 3) == (0, 0, 1)
    assert metrics.match(np.array([[1.0, 1.0]]), np.zeros((0, 2)), 3) == (0, 1, 0)
    assert metrics.detection_scores(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_evaluate_points_pools_counts():
    preds = [np.array([[0, 0], [5, 5], [9, 9]]), np.array([[1.0, 1.0]])]
    gts = [np.array([[0, 1], [5, 5]]), np.array([[1.0, 1.0], [7, 7], [8, 8]])]
    r = metrics.evaluate_points(preds, gts, radius=1.5)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 1, 2)
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["recall"] == pytest.approx(3 / 5)
    assert r["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert r["mae"] == pytest.approx((1 + 2) / 2)


def blobs(shape, centres, spacing, sigma=1.5):
    """Gaussian blobs of physical std `sigma` and height 1, summed."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * spacing
    out = np.zeros(shape)
    for c in centres:
        out += np.exp(-np.sum((grid - np.asarray(c) * spacing) ** 2, -1) / (2 * sigma ** 2))
    return out


def test_split_heavy_splits_two_merged_cells_on_their_axis():
    # Anisotropic 3D: 6 lone cells and two cells 2.4 apart in x whose sum has one maximum.
    spacing = np.array([2.0, 1.0, 1.0])
    lone = [(4, 8, 8), (4, 8, 24), (4, 24, 8), (12, 8, 8), (12, 24, 24), (12, 8, 24)]
    pair = [(8, 24, 14.8), (8, 24, 17.2)]
    m = blobs((16, 32, 32), lone + pair, spacing)
    found = postprocess.local_maxima(m, 0.3, spacing=spacing)
    assert len(found) == 7                           # the pair is one detection
    out = postprocess.split_heavy(m, found, 0.3, 1.5, spacing)
    assert len(out) == 8
    # every true centre has a detection within 0.5 (physical), the pair's two included
    truth = np.array(lone + pair, np.float64)
    d = np.linalg.norm((out[:, None] - truth[None]) * spacing, axis=-1)
    assert np.all(d.min(0) < 0.5), d.min(0)
    # the lone cells keep their detections exactly
    assert np.all(np.any(np.all(np.isclose(out[:, None], np.array(lone, np.float32)[None]),
                                -1), 0))


def test_split_heavy_leaves_maps_alone():
    spacing = np.array([1.0, 1.0])
    lone = [(6, 6), (6, 20), (20, 6), (20, 20), (13, 13)]
    m = blobs((28, 28), lone, spacing)
    found = postprocess.local_maxima(m, 0.3)
    np.testing.assert_array_equal(postprocess.split_heavy(m, found, 0.3, 1.5), found)  # none heavy
    pair = blobs((28, 28), [(13, 3), (13, 5)], spacing)
    few = postprocess.local_maxima(pair + blobs((28, 28), [(4, 20)], spacing), 0.3)
    assert len(postprocess.split_heavy(pair, few, 0.3, 1.5)) == len(few)  # too few to tell
    heavy = m + pair
    found = postprocess.local_maxima(heavy, 0.3)
    np.testing.assert_array_equal(postprocess.split_heavy(heavy, found, 0.3, 0.0), found)
    assert len(postprocess.detect_with(heavy, 0.3, "peaks", split=1.5)) == len(found) + 1
