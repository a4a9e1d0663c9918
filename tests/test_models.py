"""SAU-Net: parameter counts of the reference architecture, shapes, and blocks vs numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellcount_jax import models


def test_parameter_counts_match_the_reference():
    m = models.SAUNet()
    p2 = models.init_params(m, jax.random.key(0), (1, 16, 16, 3))
    p3 = models.init_params(m, jax.random.key(0), (1, 8, 8, 8, 1))
    assert models.count_params(p2) == 2_192_289
    assert models.count_params(p3) == 5_866_657


@pytest.mark.parametrize("shape", [(2, 24, 32, 3), (1, 8, 16, 24, 1)])
def test_shapes_and_encode_decode(shape):
    m = models.SAUNet(features=4)
    p = models.init_params(m, jax.random.key(1), shape)
    x = jax.random.normal(jax.random.key(2), shape)
    y = m.apply({"params": p}, x)
    assert y.shape == shape[:-1]
    assert float(y.min()) >= 0
    feats = m.apply({"params": p}, x, method=models.SAUNet.encode)
    spatial = np.array(shape[1:-1])
    for level, f in enumerate(feats):
        assert f.shape == (shape[0], *(spatial // 2 ** level), 4 * 2 ** level)
    np.testing.assert_allclose(m.apply({"params": p}, feats, method=models.SAUNet.decode), y,
                               rtol=1e-6, atol=1e-6)


def test_dropout_only_when_training():
    m = models.SAUNet(features=4)
    x = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))
    p = models.init_params(m, jax.random.key(1), x.shape)
    a = m.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)})
    b = m.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(m.apply({"params": p}, x), m.apply({"params": p}, x))


def test_rejects_bad_shapes():
    m = models.SAUNet(features=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        m.init(jax.random.key(0), jnp.zeros((1, 20, 16, 3)))
    with pytest.raises(ValueError, match="multiples of 8"):
        m.init(jax.random.key(0), jnp.zeros((1, 8, 12, 16, 1)))


def np_instance_norm(x, scale, bias, eps=1e-6):
    axes = tuple(range(1, x.ndim - 1))
    mu = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("ndim", [2, 3])
def test_self_attention_matches_numpy(ndim):
    shape = (2,) + (4,) * ndim + (8,)
    x = np.asarray(jax.random.normal(jax.random.key(0), shape), np.float64)
    layer = models.SelfAttention()
    p = layer.init(jax.random.key(1), jnp.asarray(x, jnp.float32), False)["params"]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64) + 0.1, p)  # non-trivial norm params
    got = layer.apply({"params": p}, jnp.asarray(x, jnp.float32), False)

    flat = x.reshape(2, -1, 8)
    lin = lambda name: flat @ p[name]["kernel"] + p[name]["bias"]
    logits = np.einsum("bqc,bkc->bqk", lin("theta"), lin("phi"))  # no 1/sqrt(d)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    t = (a @ lin("g")) @ p["out"]["kernel"]
    if ndim == 3:
        t = t + p["out"]["bias"]
    else:
        assert "bias" not in p["out"]
    t = np.maximum(t, 0).reshape(shape)
    ref = x + np_instance_norm(t, p["out_norm"]["scale"], p["out_norm"]["bias"])
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


def test_block_is_conv_relu_norm():
    from scipy import signal
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 6, 7, 2)), np.float64)
    blk = models.Block(3)
    p = blk.init(jax.random.key(1), jnp.asarray(x, jnp.float32))["params"]
    got = blk.apply({"params": p}, jnp.asarray(x, jnp.float32))

    def conv(h, k, b):  # 'SAME' cross-correlation, (H, W, Cin) x (3, 3, Cin, Cout)
        out = np.zeros(h.shape[:2] + (k.shape[-1],))
        for o in range(k.shape[-1]):
            for i in range(k.shape[-2]):
                out[..., o] += signal.correlate2d(h[..., i], k[..., i, o], mode="same")
        return out + b

    h = x[0]
    for j in range(2):
        c, n = p[f"Conv_{j}"], p[f"InstanceNorm_{j}"]
        h = np_instance_norm(np.maximum(conv(h, np.asarray(c["kernel"]), c["bias"]), 0)[None],
                             np.asarray(n["scale"]), np.asarray(n["bias"]))[0]
    np.testing.assert_allclose(got[0], h, rtol=1e-4, atol=1e-4)
