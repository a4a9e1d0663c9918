"""Feature noise: unlabeled rows only, one draw shared by those rows, U(1 - r, 1 + r)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellcount_jax import perturb


def feats():
    return tuple(jnp.ones((5, 16 // 2 ** i, 16 // 2 ** i, 4 * 2 ** i)) for i in range(4))


def test_noise_on_unlabeled_rows_shared_and_bounded():
    out = perturb.feature_noise(jax.random.key(0), feats(), first_row=2, rate=0.5)
    for f in out:
        f = np.asarray(f)
        np.testing.assert_array_equal(f[:2], 1.0)            # labeled rows untouched
        np.testing.assert_array_equal(f[2], f[3])           # one u for all unlabeled rows
        np.testing.assert_array_equal(f[2], f[4])
        assert 0.5 <= f[2:].min() and f[2:].max() <= 1.5
        assert f[2].std() > 0.2                              # ~ 1 / sqrt(12) for U(0.5, 1.5)


def test_bottleneck_only_and_reference_rate():
    out = perturb.feature_noise(jax.random.key(1), feats(), first_row=0, rate=1.0,
                                where="bottleneck")
    for f in out[:3]:
        np.testing.assert_array_equal(f, 1.0)
    b = np.asarray(out[3])
    assert 0.0 <= b.min() and b.max() <= 2.0 and abs(b.mean() - 1.0) < 0.1
    with pytest.raises(ValueError, match="noise_at"):
        perturb.feature_noise(jax.random.key(1), feats(), 0, 1.0, "decoder")
