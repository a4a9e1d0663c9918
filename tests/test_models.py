"""SAU-Net: parameter counts of the reference architecture, shapes, and blocks vs numpy."""
import jax
import jax.numpy as jnp
import flax.linen as nn
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


@pytest.mark.parametrize("ndim", [2, 3])
def test_upconv_matches_flax_conv_transpose(ndim):
    x = jax.random.normal(jax.random.key(0), (2,) + (3,) * ndim + (4,))
    ref = nn.ConvTranspose(5, (2,) * ndim, strides=(2,) * ndim, padding="VALID")
    p = ref.init(jax.random.key(1), x)["params"]
    p = {"kernel": p["kernel"], "bias": jax.random.normal(jax.random.key(2), (5,))}
    want = ref.apply({"params": p}, x)
    for impl in ("xla", "cpu"):
        up = models.UpConv(5, impl)
        init = up.init(jax.random.key(1), x)["params"]  # same names, shapes and initial values
        jax.tree.map(np.testing.assert_array_equal, init, ref.init(jax.random.key(1), x)["params"])
        np.testing.assert_allclose(up.apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)


def test_conv_z_as_batch_matches_lax_3d_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))
    dn = ("NDHWC", "DHWIO", "NDHWC")
    for padding in ("SAME", [(1, 1), (1, 1), (1, 1)], "VALID"):
        want = jax.lax.conv_general_dilated(x, w, (1, 1, 1), padding, dimension_numbers=dn)
        got = models.conv_z_as_batch(x, w, (1, 1, 1), padding, dimension_numbers=dn)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim,cin,cout", [(2, 6, 3), (2, 3, 6), (3, 1, 4), (3, 4, 2), (3, 2, 9)])
def test_cpu_convolution_gradients_match_lax(ndim, cin, cout):
    """conv2d / conv3d_folded (custom VJPs; the kernel gradient with swapped roles where the
    input has more channels, which the fold gives in 3D) vs jax.grad of lax's convolution,
    float64, symmetric and asymmetric paddings."""
    dn = ("NHWC", "HWIO", "NHWC") if ndim == 2 else ("NDHWC", "DHWIO", "NDHWC")
    conv = models.conv2d_cpu if ndim == 2 else models.conv_z_as_batch
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2,) + (5, 7, 6)[-ndim:] + (cin,), jnp.float64)
        w = jax.random.normal(jax.random.key(1), (3,) * ndim + (cin, cout), jnp.float64)
        for padding in ("SAME", ((0, 2), (2, 0), (1, 0))[-ndim:]):
            def loss(f):  # a nonlinear function of the output, so that g is not constant
                return lambda x, w: jnp.sum(jnp.sin(f(x, w, (1,) * ndim, padding, dimension_numbers=dn)))
            want = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
            got = jax.jit(jax.grad(loss(conv), (0, 1)))(x, w)
            for a, b in zip(got, want):
                assert a.shape == b.shape and a.dtype == jnp.float64
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ndim", [2, 3])
def test_pointwise_conv_matches_lax(ndim):
    dn = ("NHWC", "HWIO", "NHWC") if ndim == 2 else ("NDHWC", "DHWIO", "NDHWC")
    x = jax.random.normal(jax.random.key(0), (2,) + (4, 5, 3)[-ndim:] + (6,))
    w = jax.random.normal(jax.random.key(1), (1,) * ndim + (6, 2))
    f = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1,) * ndim, "SAME", dimension_numbers=dn)))
    want = jax.grad(f(jax.lax.conv_general_dilated), (0, 1))(x, w)
    got = jax.grad(f(models.pointwise_conv), (0, 1))(x, w)
    np.testing.assert_allclose(f(models.pointwise_conv)(x, w), f(jax.lax.conv_general_dilated)(x, w), rtol=1e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _grads(impl, shape, dtype):
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    y = jax.random.uniform(jax.random.key(1), shape[:-1], dtype)
    m = models.SAUNet(features=8, impl=impl, dtype=dtype)
    p = jax.tree.map(lambda a: a.astype(dtype),
                     models.init_params(m, jax.random.key(2), shape))
    loss = lambda p: jnp.mean((m.apply({"params": p}, x) - y) ** 2)
    return models.jit(jax.value_and_grad(loss), impl)(p)


@pytest.mark.parametrize("shape", [(4, 32, 32, 3), (2, 8, 16, 16, 1)])
def test_cpu_impl_gradients_match_native_xla(shape):
    """The 'cpu' formulation (folded 3D convs, matmul upsampling, Eigen kernels, its compiler
    options) against jax.grad of XLA's native path, in float64 so that the comparison sees
    the formulation and not float32 rounding (which this randomly initialised network,
    instance norms on 2x2 bottlenecks, amplifies to percent-level differences between any
    two float32 kernels, native vs native included)."""
    with jax.enable_x64(True):
        l_xla, g_xla = _grads("xla", shape, jnp.float64)
        l_cpu, g_cpu = _grads("cpu", shape, jnp.float64)
    np.testing.assert_allclose(l_cpu, l_xla, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_xla)):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("ndim", [2, 3])
def test_cpu_impl_layer_gradients_float32(ndim):
    """float32, one layer at a time (well conditioned): 3x3(x3) convolution and upsampling
    gradients of the 'cpu' path, with its compiler options, vs jax.grad of the native path."""
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2,) + (8,) * ndim + (16,))
    for make in (lambda impl: models._conv(16, (3,) * ndim, impl, jnp.float32),
                 lambda impl: models.UpConv(16, impl)):
        p = make("xla").init(k[1], x)["params"]
        g = jax.random.normal(k[2], make("xla").apply({"params": p}, x).shape)
        out = {}
        for impl in ("xla", "cpu"):
            f = lambda p, x: jnp.vdot(make(impl).apply({"params": p}, x), g)
            fn = jax.grad(f, argnums=(0, 1))
            out[impl] = jax.jit(fn)(p, x) if impl == "xla" else models.jit(fn, impl)(p, x)
        for a, b in zip(jax.tree.leaves(out["cpu"]), jax.tree.leaves(out["xla"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
