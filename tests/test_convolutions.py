"""The convolution formulations: the 'cpu' path against lax's native convolutions, values
and gradients, layer by layer and for the whole network."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellcount_jax import convolutions, models


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
        got = convolutions.conv_z_as_batch(x, w, (1, 1, 1), padding, dimension_numbers=dn)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim,cin,cout", [(2, 6, 3), (2, 3, 6), (3, 1, 4), (3, 4, 2), (3, 2, 9)])
def test_cpu_convolution_gradients_match_lax(ndim, cin, cout):
    """conv2d / conv3d_folded (custom VJPs; the kernel gradient with swapped roles where the
    input has more channels, which the fold gives in 3D) vs jax.grad of lax's convolution,
    float64, symmetric and asymmetric paddings."""
    dn = ("NHWC", "HWIO", "NHWC") if ndim == 2 else ("NDHWC", "DHWIO", "NDHWC")
    conv = convolutions.conv2d_cpu if ndim == 2 else convolutions.conv_z_as_batch
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
    got = jax.grad(f(convolutions.pointwise_conv), (0, 1))(x, w)
    np.testing.assert_allclose(f(convolutions.pointwise_conv)(x, w), f(jax.lax.conv_general_dilated)(x, w), rtol=1e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _grads(impl, shape, dtype):
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    y = jax.random.uniform(jax.random.key(1), shape[:-1], dtype)
    m = models.SAUNet(features=8, impl=impl, dtype=dtype)
    p = jax.tree.map(lambda a: a.astype(dtype),
                     models.init_params(m, jax.random.key(2), shape))
    loss = lambda p: jnp.mean((m.apply({"params": p}, x) - y) ** 2)
    return convolutions.jit(jax.value_and_grad(loss))(p)


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
            out[impl] = jax.jit(fn)(p, x) if impl == "xla" else convolutions.jit(fn)(p, x)
        for a, b in zip(jax.tree.leaves(out["cpu"]), jax.tree.leaves(out["xla"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
