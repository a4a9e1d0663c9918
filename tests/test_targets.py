"""Targets against scipy: the exact EDT plus the paper's formula, and gaussian_filter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cellcount_jax import targets


def reference_idk(shape, dots, spacing):
    seeds = np.zeros(shape, bool)
    seeds[tuple(np.round(dots).astype(int).T)] = True
    d = ndimage.distance_transform_edt(~seeds, sampling=spacing)
    return 1.0 / (d ** (0.02 * d + 0.75) + 1.0)


def padded(dots, extra=3):
    return np.concatenate([dots, np.full((extra, dots.shape[1]), 0.0)]).astype(np.float32)


CASES = [
    ((64, 48), 30, (1.0, 1.0)),
    ((33, 70), 1, (1.0, 1.0)),            # one dot: distances up to the far corner
    ((40, 40), 200, (0.5, 1.7)),          # dense and anisotropic
    ((12, 20, 18), 15, (2.5, 1.0, 1.0)),  # light-sheet-like z spacing
    ((9, 31, 7), 4, (0.8, 1.1, 1.3)),
]


@pytest.mark.parametrize("shape,n,spacing", CASES)
def test_inverse_distance_matches_scipy(shape, n, spacing):
    rng = np.random.default_rng(n)
    dots = np.stack([rng.integers(0, s, n) for s in shape], 1).astype(np.float32)
    m = np.asarray(targets.inverse_distance(padded(dots), n, shape, spacing))
    assert np.abs(m - reference_idk(shape, dots, spacing)).max() <= 1e-5


def test_touching_and_border_dots():
    shape = (20, 25)
    dots = np.array([[0, 0], [0, 1], [1, 1], [19, 24], [19, 0], [10, 12], [10, 13], [11, 12]],
                    np.float32)
    m = np.asarray(targets.inverse_distance(padded(dots), len(dots), shape, (1.0, 1.0)))
    assert np.abs(m - reference_idk(shape, dots, (1.0, 1.0))).max() <= 1e-5
    # Touching dots stay separate peaks of value 1 (the point of the kernel).
    assert m[10, 12] == m[10, 13] == 1.0


def test_hand_computed_values():
    m = np.asarray(targets.inverse_distance(np.array([[2.0, 2.0]]), 1, (5, 5)))
    assert m[2, 2] == 1.0
    assert m[2, 3] == pytest.approx(1 / (1 ** 0.77 + 1))
    d = np.sqrt(8.0)
    assert m[0, 0] == pytest.approx(1 / (d ** (0.02 * d + 0.75) + 1), rel=1e-6)


def test_no_dots_gives_zeros_and_padding_is_ignored():
    m = targets.inverse_distance(np.zeros((4, 3), np.float32), 0, (8, 16, 16))
    assert np.all(np.asarray(m) == 0)
    # Padded rows at (0, 0) must not become dots.
    m = np.asarray(targets.inverse_distance(np.array([[5.0, 5.0], [0, 0], [0, 0]]), 1, (8, 8)))
    assert m[0, 0] < 1 and m[5, 5] == 1


def test_cutoff():
    dots = np.array([[3.0, 3.0]], np.float32)
    full = np.asarray(targets.inverse_distance(dots, 1, (200, 200)))
    cut = np.asarray(targets.inverse_distance(dots, 1, (200, 200), cutoff=0.01))
    assert full.min() < 0.01 and np.all(full > 0)
    np.testing.assert_array_equal(cut, np.where(full < 0.01, 0, full))


def test_jit_vmap_over_batch_with_traced_counts():
    shape = (32, 32)
    rng = np.random.default_rng(0)
    dots = rng.integers(0, 32, (3, 10, 2)).astype(np.float32)
    counts = np.array([10, 4, 0])
    fn = jax.jit(jax.vmap(lambda d, n: targets.inverse_distance(d, n, shape)))
    out = np.asarray(fn(dots, counts))
    for i, n in enumerate(counts):
        ref = reference_idk(shape, dots[i, :n], (1, 1)) if n else np.zeros(shape)
        assert np.abs(out[i] - ref).max() <= 1e-5


@pytest.mark.parametrize("shape,spacing,sigma", [((50, 60), (1.0, 1.0), 2.0),
                                                 ((10, 30, 20), (2.0, 1.0, 1.0), 1.5)])
def test_gaussian_matches_scipy(shape, spacing, sigma):
    rng = np.random.default_rng(1)
    dots = np.stack([rng.integers(0, s, 12) for s in shape], 1).astype(np.float32)
    dots[1] = dots[0]  # two dots on one pixel count twice
    g = np.asarray(targets.gaussian_density(padded(dots), 12, shape, sigma, spacing))
    counts = np.zeros(shape)
    np.add.at(counts, tuple(dots.astype(int).T), 1)
    ref = ndimage.gaussian_filter(counts, [sigma / s for s in spacing], mode="constant")
    assert np.abs(g - ref).max() <= 1e-5


def test_gaussian_sums_to_count_away_from_borders():
    dots = np.array([[20, 20], [30, 25], [31, 25]], np.float32)
    g = targets.gaussian_density(dots, 3, (64, 64), 2.0)
    assert float(jnp.sum(g)) == pytest.approx(3.0, rel=1e-5)


def test_make_target_fn_scales_and_rejects_unknown_kind():
    fn = targets.make_target_fn("inverse_distance", (16, 16), scale=100.0)
    assert float(fn(np.array([[4.0, 4.0]]), 1)[4, 4]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="target.kind"):
        targets.make_target_fn("disk", (16, 16))


@pytest.mark.parametrize("shape,n,spacing", [((20, 50, 40), 1, (2.5, 1.0, 1.0)),
                                             ((9, 31, 70), 3, (1.0, 0.7, 1.3)),
                                             ((30, 30, 30), 400, (1.0, 1.0, 1.0))])
def test_distance_bound_covers_every_pixel(shape, n, spacing):
    rng = np.random.default_rng(n)
    dots = np.stack([rng.integers(0, s, n) for s in shape], 1).astype(np.float32)
    seeds = np.ones(shape, bool)
    seeds[tuple(dots.astype(int).T)] = False
    true_max = ndimage.distance_transform_edt(seeds, sampling=spacing).max() ** 2
    bound = float(targets.distance_bound(padded(dots), n, shape, spacing))
    assert true_max <= bound <= (np.sqrt(true_max) + 2 * np.linalg.norm(8 * np.array(spacing))) ** 2
