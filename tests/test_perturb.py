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


def test_intensity_perturbs_the_student_rows_only():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, (6, 32, 32, 1)), jnp.float32)
    assert perturb.intensity(jax.random.key(0), x, 2, 0.0) is x
    out = np.asarray(perturb.intensity(jax.random.key(0), x, 2, 0.4))
    xs = np.asarray(x)
    np.testing.assert_array_equal(out[:2], xs[:2])
    for r in range(2, 6):
        # out = (1 + c) x + (b + n) sd: regress out on x; slope 1 + c, offset b sd, residual
        # spread 0.2 sd (the noise), with |c|, |b| <= 0.4
        slope, offset = np.polyfit(xs[r].ravel(), out[r].ravel(), 1)
        sd = xs[r].std()
        assert 0.6 - 0.02 <= slope <= 1.4 + 0.02
        assert abs(offset) <= 0.4 * sd + 0.1
        resid = out[r].ravel() - (slope * xs[r].ravel() + offset)
        assert abs(resid.std() / sd - 0.2) < 0.02
    assert len({round(float(np.polyfit(xs[r].ravel(), out[r].ravel(), 1)[0]), 4)
                for r in range(2, 6)}) == 4                 # each row its own draw


def test_feature_dropout_drops_whole_channels_of_unlabeled_rows():
    out = perturb.feature_dropout(jax.random.key(3), feats(), first_row=2, rate=0.25)
    kept = []
    for f in out:
        f = np.asarray(f)
        np.testing.assert_array_equal(f[:2], 1.0)
        # each (row, channel) is all 0 or all 1 / 0.75
        per_channel = f[2:].reshape(3, -1, f.shape[-1])
        assert np.all(per_channel.min(1) == per_channel.max(1))
        assert np.all(np.isclose(per_channel, 0.0) | np.isclose(per_channel, 1 / 0.75))
        kept.append((per_channel[:, 0] > 0).mean())
    assert 0.6 < np.mean(np.concatenate([np.ravel(k) for k in kept])) < 0.9
    unchanged = feats()
    assert perturb.feature_dropout(jax.random.key(3), unchanged, 2, 0.0) is unchanged
