"""Losses against scipy/numpy re-implementations and hand-computed cases."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cellcount_jax import losses


def reference_focal_weight(t, strict_threshold=None):
    """Per image: peaks = maximum_filter(3) == t (borders padded -inf), then a 5-tap
    normalised Gaussian (sigma 1) per axis with zero padding."""
    out = []
    k1 = np.exp(-0.5 * (np.arange(5) - 2) ** 2)
    k1 /= k1.sum()
    for img in t:
        peaks = ndimage.maximum_filter(img, size=3, mode="constant", cval=-np.inf) == img
        if strict_threshold is not None:
            peaks &= img > strict_threshold
        kernel = k1
        for _ in range(img.ndim - 1):
            kernel = np.multiply.outer(kernel, k1)
        out.append(ndimage.convolve(peaks.astype(float), kernel, mode="constant"))
    return np.stack(out)


@pytest.mark.parametrize("shape", [(2, 16, 20), (1, 6, 10, 8)])
def test_focal_weight_matches_scipy(shape):
    rng = np.random.default_rng(0)
    t = np.maximum(rng.normal(size=shape), 0).astype(np.float32)  # zero plateaus included
    w = np.asarray(losses.focal_weight(jnp.asarray(t)))
    np.testing.assert_allclose(w, reference_focal_weight(t), atol=1e-6)
    w = np.asarray(losses.focal_weight(jnp.asarray(t), "strict", 0.5))
    np.testing.assert_allclose(w, reference_focal_weight(t, 0.5), atol=1e-6)


def test_reference_peaks_cover_flat_background():
    t = np.zeros((1, 12, 12), np.float32)
    t[0, 6, 6] = 1.0
    ref = np.asarray(losses.focal_weight(jnp.asarray(t)))
    strict = np.asarray(losses.focal_weight(jnp.asarray(t), "strict", 0.0))
    # Reference quirk: the zero plateau is all "peaks", weight ~1 far from the cell.
    assert ref[0, 2, 2] == pytest.approx(1.0)
    # Strict: only the real peak, weights vanish 3 pixels away.
    assert strict[0, 0, 0] == 0 and strict[0, 6, 6] > 0 and strict[0, 6, 9] == 0


def test_focal_consistency_reduction_by_hand():
    t = np.zeros((1, 8, 8), np.float32)
    t[0, 4, 4] = 2.0
    s = t.copy()
    s[0, 4, 4] = 3.0
    s[0, 0, 0] = 1.0  # far from the only strict peak: no weight
    w = reference_focal_weight(t, 0.0)
    expected = np.sum(w * (s - t) ** 2) / np.count_nonzero(w)
    got = losses.focal_consistency(jnp.asarray(s), jnp.asarray(t), peaks="strict")
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert np.count_nonzero(w) == 25


def test_mse():
    assert float(losses.mse(jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 0.0]]))) == 5.0


def test_peak_weighted_mse_by_hand():
    pred = jnp.array([[0.0, 1.0], [2.0, 0.0]])
    target = jnp.array([[4.0, 2.0], [0.0, 1.0]])  # peak 4: weights 1 + 10 (t / 4)^2
    w = 1 + 10 * np.array([[1.0, 0.25], [0.0, 1 / 16]])
    err = np.array([[16.0, 1.0], [4.0, 1.0]])
    assert np.isclose(float(losses.peak_weighted_mse(pred, target)), np.mean(w * err))
    mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    assert np.isclose(float(losses.peak_weighted_mse(pred, target, mask=mask)),
                      (w * err)[np.asarray(mask) > 0].sum() / 3)
    assert np.isclose(float(losses.peak_weighted_mse(pred, target, weight=0.0)),
                      float(losses.mse(pred, target)))
    assert np.isclose(float(losses.peak_weighted_mse(pred, target, power=1.0)),
                      np.mean((1 + 10 * np.asarray(target) / 4) * err))


def custom_l1(pred, target):
    return jnp.mean(jnp.abs(pred - target))


def test_get_by_name_and_by_path():
    assert losses.get("mse") is losses.mse
    assert losses.get("focal_consistency") is losses.focal_consistency
    assert losses.get("test_losses:custom_l1") is custom_l1
    with pytest.raises(ValueError, match="unknown loss"):
        losses.get("nope")
    # Only declared losses, of the right kind: not the module's helpers.
    for helper in ("takes_mask", "focal_weight", "get", "masked_mean", "jnp"):
        with pytest.raises(ValueError, match="unknown loss"):
            losses.get(helper)
    with pytest.raises(ValueError, match="unknown consistency loss 'mse'"):
        losses.get("mse", "consistency")
    assert losses.get("peak_weighted_mse", "supervised") is losses.peak_weighted_mse
    with pytest.raises(ValueError, match="cannot import"):
        losses.get("no_such_module:fn")
    with pytest.raises(ValueError, match="peaks"):
        losses.focal_weight(jnp.zeros((1, 4, 4)), "loose")


def test_the_readme_s_loss_example_takes_regions_and_held_out_bands(tmp_path, monkeypatch):
    """The README's `mylosses.huber`, as printed there, is found by name, takes `mask=` (what
    regions of interest and config.data.holdout need) and averages over the masked pixels."""
    import os
    import re
    import sys
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"```python\n# mylosses.py\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "mylosses.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mylosses", None)
    huber = losses.get("mylosses:huber", "supervised")
    assert losses.takes_mask(huber)
    rng = np.random.default_rng(0)
    pred, target = rng.normal(0, 20, (2, 8, 8)), rng.normal(0, 20, (2, 8, 8))
    mask = (rng.random((2, 8, 8)) < 0.3).astype(np.float32)
    err = np.abs(pred - target)
    per_pixel = np.where(err < 10, 0.5 * err ** 2, 10 * (err - 5))
    got = float(huber(jnp.asarray(pred), jnp.asarray(target), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, per_pixel[mask == 1].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(huber(jnp.asarray(pred), jnp.asarray(target))),
                               per_pixel.mean(), rtol=1e-5)
