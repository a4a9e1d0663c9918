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


def test_percentile_normaliser_matches_numpy_and_ignores_exposure():
    from cellcount_jax.normalise import Normaliser
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 50.0, size=(40, 30, 2)).astype(np.float32)
    n = Normaliser.fit("percentile", [image], (1.0, 99.8))
    got = n(image)
    for c in range(2):
        lo, hi = np.percentile(image[..., c], [1.0, 99.8])
        np.testing.assert_allclose(got[..., c], (image[..., c] - lo) / (hi - lo), rtol=1e-5,
                                   atol=1e-5)
    # A brighter or dimmer exposure of the same scene gives the same network input.
    np.testing.assert_allclose(n(image * 3.0 + 7.0), got, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(n(image * 0.3), got, rtol=1e-4, atol=1e-4)
    assert Normaliser.from_json(n.to_json()) == n
    with pytest.raises(ValueError, match="percentiles"):
        Normaliser.fit("percentile", [image], (99.0, 1.0))


def test_intensity_augmentation():
    from cellcount_jax.data.dataset import intensity_augment
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(32, 32, 1)).astype(np.float32)
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(intensity_augment(rng, x), x)
    assert rng.bit_generator.state == np.random.default_rng(5).bit_generator.state  # no draws
    # Contrast about the mean: the mean stays, the spread scales by a factor in [0.7, 1.3].
    for seed in range(5):
        y = intensity_augment(np.random.default_rng(seed), x, contrast=0.3)
        assert y.mean() == pytest.approx(x.mean(), abs=1e-4)
        assert 0.7 - 1e-5 <= y.std() / x.std() <= 1.3 + 1e-5
        # Brightness: one constant shift of at most 0.2 standard deviations.
        d = intensity_augment(np.random.default_rng(seed), x, brightness=0.2) - x
        assert np.ptp(d) < 1e-4 and abs(d.mean()) <= 0.2 * x.std() + 1e-5
        # Gamma keeps the range and the order of the values.
        g = intensity_augment(np.random.default_rng(seed), x, gamma=0.5)
        assert g.min() == pytest.approx(x.min(), abs=1e-4) and g.max() == pytest.approx(x.max(), abs=1e-4)
        assert np.all(np.diff(g.ravel()[np.argsort(x, axis=None)]) >= -1e-5)  # order kept
    n = intensity_augment(np.random.default_rng(3), x, noise=0.1) - x
    assert 0 < n.std() <= 0.1 * x.std() * 1.1


def test_brightness_field():
    """The field multiplies each channel's signal above its 10 % quantile by exp(s g), g a
    unit-variance Gaussian field of the given sigma: its log has sd s, and its autocorrelation
    at lag d is that of Gaussian-filtered white noise, exp(-d^2 / (4 sigma^2))."""
    from cellcount_jax.data.dataset import intensity_augment
    rng = np.random.default_rng(0)
    x = (2.0 + rng.uniform(1.0, 2.0, size=(256, 256, 1))).astype(np.float32)
    x = np.concatenate([x, 20 - 3 * x], -1)  # near one channel's 10 % quantile, not the other's
    sigma = (4.0, 2.0)  # pixels along y, x
    y = intensity_augment(np.random.default_rng(1), x, field=0.4, field_sigma=sigma)
    lo = np.quantile(x.reshape(-1, 2), 0.1, axis=0, method="lower")
    far = np.abs(x - lo) > 0.05
    ratio = (y - lo) / np.where(far, x - lo, 1)
    # One field for both channels, in the signal above the background.
    both = far[..., 0] & far[..., 1]
    np.testing.assert_allclose(ratio[..., 0][both], ratio[..., 1][both], rtol=2e-3)
    field = np.where(far[..., 0], ratio[..., 0], ratio[..., 1])
    assert far.any(-1).all()
    g = np.log(field[10:-10, 10:-10])
    assert g.std() == pytest.approx(0.4, rel=0.15) and abs(g.mean()) < 0.1
    g = (g - g.mean()) / g.std()
    for axis, s in enumerate(sigma):
        for lag in (s, 2 * s):
            a = np.take(g, np.arange(g.shape[axis] - int(lag)), axis)
            b = np.take(g, np.arange(int(lag), g.shape[axis]), axis)
            assert np.mean(a * b) == pytest.approx(np.exp(-lag ** 2 / (4 * s ** 2)), abs=0.08)
    # 0 leaves it out.
    np.testing.assert_array_equal(intensity_augment(np.random.default_rng(1), x, field=0.0), x)


def test_an_annotation_of_another_image_is_named(tmp_path):
    import warnings
    from PIL import Image
    from cellcount_jax.data import read_folder
    imgs, dots = tmp_path / "images", tmp_path / "dots"
    imgs.mkdir()
    dots.mkdir()
    for i in range(3):
        img, d = synthetic_image(i, shape=(96, 96), num_cells=(12, 20), radius=4.0)
        Image.fromarray((img * 255).astype(np.uint8)).save(imgs / f"im{i}.png")
        if i == 2:  # the dots of an unrelated image
            d = synthetic_image(40, shape=(96, 96), num_cells=(12, 20), radius=4.0)[1]
        (dots / f"im{i}.csv").write_text("y,x\n" + "".join(f"{y},{x}\n" for y, x in d))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        read_folder(str(imgs), str(dots), 2)
    messages = [str(w.message) for w in seen if "background" in str(w.message)]
    assert len(messages) == 1 and "im2.csv" in messages[0]
