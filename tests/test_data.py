"""Synthetic data, targets of full images, augmentation, and input errors."""
import numpy as np
import pytest

from cellcount_jax.data import Dataset, make_targets, pad_dots, synthetic_image
from cellcount_jax.data.dataset import check_dots


def test_synthetic_is_deterministic_and_dots_are_inside():
    a, da = synthetic_image(3, shape=(64, 48), num_cells=(10, 20))
    b, db = synthetic_image(3, shape=(64, 48), num_cells=(10, 20))
    c, _ = synthetic_image(4, shape=(64, 48), num_cells=(10, 20))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(da, db)
    assert not np.array_equal(a, c)
    assert a.shape == (64, 48, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert 10 <= len(da) <= 20
    check_dots(da, (64, 48), "synthetic")


def test_synthetic_cells_are_bright_at_their_centres():
    img, dots = synthetic_image(0, shape=(96, 96), num_cells=(20, 20), radius=5.0)
    signal = img[..., -1]
    at_cells = signal[tuple(np.round(dots).astype(int).T)]
    assert np.median(at_cells) > np.percentile(signal, 75)


def test_synthetic_3d_anisotropic():
    img, dots = synthetic_image(1, shape=(16, 40, 40), spacing=(2.0, 1.0, 1.0), channels=1,
                                num_cells=(30, 40), radius=4.0)
    assert img.shape == (16, 40, 40, 1) and dots.shape[1] == 3
    check_dots(dots, (16, 40, 40), "synthetic 3d")


def test_clusters_touch():
    _, dots = synthetic_image(2, shape=(128, 128), num_cells=(80, 80), radius=5.0)
    d = np.linalg.norm(dots[:, None] - dots[None], axis=-1) + np.eye(len(dots)) * 1e9
    # Some neighbours closer than one cell diameter: overlapping cells.
    assert (d.min(1) < 10).mean() > 0.3


def test_augmentation_moves_image_and_target_together():
    rng = np.random.default_rng(0)
    images, dots = [], []
    for _ in range(3):
        img = np.zeros((40, 40, 1), np.float32)
        d = rng.integers(0, 40, (1, 2)).astype(np.float32)
        img[int(d[0, 0]), int(d[0, 1])] = 1.0
        images.append(img)
        dots.append(d)
    ds = Dataset(images, dots, make_targets(images, dots, "inverse_distance", 1.0), images)
    for seed in range(20):
        b = ds.sample(np.random.default_rng(seed), (40, 40), 3, 2)
        assert b["image"].shape == (3, 40, 40, 1) and b["target"].shape == (3, 40, 40)
        assert b["unlabeled"].shape == (2, 40, 40, 1)
        for x, t in zip(b["image"], b["target"]):
            assert np.unravel_index(np.argmax(x[..., 0]), (40, 40)) == \
                np.unravel_index(np.argmax(t), (40, 40))
    crops = ds.sample(np.random.default_rng(0), (16, 24), 4)
    assert crops["image"].shape == (4, 16, 24, 1) and "unlabeled" not in crops


def test_sampling_is_seeded():
    img, d = synthetic_image(0, shape=(32, 32), num_cells=(5, 8))
    ds = Dataset([img], [d], make_targets([img], [d], "gaussian", 1.0), [img])
    a = ds.sample(np.random.default_rng([0, 5]), (16, 16), 2, 2)
    b = ds.sample(np.random.default_rng([0, 5]), (16, 16), 2, 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_errors_are_clear():
    img = np.zeros((20, 20, 1), np.float32)
    with pytest.raises(ValueError, match="outside the image"):
        make_targets([img], [np.array([[5.0, 20.0]])], "inverse_distance", 1.0)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        make_targets([img], [np.array([[5.0, 2.0, 1.0]])], "inverse_distance", 1.0)
    with pytest.raises(ValueError, match="NaN"):
        check_dots(np.array([[np.nan, 1.0]]), (20, 20), "x.csv")
    ds = Dataset([img], [np.array([[5.0, 5.0]])], [np.zeros((20, 20), np.float32)])
    with pytest.raises(ValueError, match="larger than an image"):
        ds.sample(np.random.default_rng(0), (24, 16), 1)
    with pytest.raises(ValueError, match="unlabeled pool is empty"):
        ds.sample(np.random.default_rng(0), (16, 16), 1, 1)
    with pytest.raises(ValueError, match="exceed max_dots"):
        pad_dots(np.zeros((5, 2)), 4)
