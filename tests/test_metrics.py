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
