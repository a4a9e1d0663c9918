"""The native CPU kernels: the convolution and its kernel gradient against float64 sums, the
fused bias + ReLU + instance norm (`native.relu_norm`) against a float64 formulation, and the
'cpu' layers built on them against flax's."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellcount_jax import convolutions, models, native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="native kernel not built or no AVX-512 on this CPU")


def reference(x, g, kernel, pads):
    """dk[t] = sum_p x[p + t - lo] g[p], x zero outside, by explicit shifts (float64)."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    out_sp = g.shape[1:-1]
    hi = [o + k - 1 - lo - s for o, k, (lo, _), s in zip(out_sp, kernel, pads, x.shape[1:-1])]
    xp = np.pad(x, [(0, 0)] + [(lo, h) for (lo, _), h in zip(pads, hi)] + [(0, 0)])
    dk = np.zeros(tuple(kernel) + (x.shape[-1], g.shape[-1]))
    for t in itertools.product(*(range(k) for k in kernel)):
        window = xp[(slice(None),) + tuple(slice(a, a + o) for a, o in zip(t, out_sp))]
        dk[t] = window.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    return dk


def check(x_shape, cout, kernel, pads):
    """The kernel gradient of a lax convolution with these paddings, native vs reference."""
    kx, kg = jax.random.split(jax.random.key(sum(x_shape) + cout))
    x = jax.random.normal(kx, x_shape, jnp.float32)
    nd = len(kernel)
    out_sp = [s + lo + hi - k + 1 for s, k, (lo, hi) in zip(x_shape[1:-1], kernel, pads)]
    g = jax.random.normal(kg, (x_shape[0], *out_sp, cout), jnp.float32)
    got = jax.jit(lambda x, g: native.conv_kernel_grad(x, g, kernel, [lo for lo, _ in pads]))(x, g)
    want = reference(x, g, kernel, pads)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and it is the gradient of lax's convolution
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (1,) * nd, pads, dimension_numbers=dn)
    lax_dk = jax.vjp(conv, jnp.zeros(tuple(kernel) + (x_shape[-1], cout)))[1](g)[0]
    np.testing.assert_allclose(got, lax_dk, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# Output channels 16/32/48/64/128 take the three register-block shapes (and 48 several
# 16-wide blocks); input channels 3, 13, 32 leave remainders of every block height.
@pytest.mark.parametrize("cin,cout", [(3, 32), (13, 16), (32, 48), (13, 64), (32, 128)])
@pytest.mark.parametrize("kernel,pads", [((3, 3), ((1, 1), (1, 1))), ((3, 3), ((0, 2), (2, 0))),
                                         ((2, 3), ((0, 0), (0, 0))), ((1, 1), ((0, 0), (0, 0)))])
def test_2d_matches_reference(cin, cout, kernel, pads):
    check((2, 9, 11, cin), cout, kernel, pads)


@pytest.mark.parametrize("cin,cout,pads", [(1, 32, ((1, 1),) * 3), (5, 16, ((0, 2), (2, 0), (1, 0))),
                                           (7, 64, ((0, 0),) * 3)])
def test_3d_matches_reference(cin, cout, pads):
    check((2, 5, 6, 7, cin), cout, (3, 3, 3), pads)


def test_many_chunks_over_the_thread_pool():
    # 4 x 64 rows of 64 pixels: dozens of chunks shared by the pool's threads.
    check((4, 64, 64, 24), 32, (3, 3), ((1, 1), (1, 1)))


def test_vmap():
    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
    g = jax.random.normal(jax.random.key(1), (3, 2, 6, 6, 16))
    got = jax.vmap(lambda x, g: native.conv_kernel_grad(x, g, (3, 3), (1, 1)))(x, g)
    for i in range(3):
        np.testing.assert_allclose(got[i], reference(x[i], g[i], (3, 3), ((1, 1), (1, 1))),
                                   rtol=1e-5, atol=1e-4)


def test_cpu_model_uses_it():
    """The 'cpu' formulation of a network with 16-multiple widths calls the native kernel in
    its backward pass where the output width is a multiple of 16; elsewhere, and in float64,
    it keeps XLA's convolutions."""
    def hlo(features, dtype):
        m = models.SAUNet(features=features, impl="cpu", dtype=dtype)
        x = jnp.zeros((1, 16, 16, 3), dtype)
        p = jax.tree.map(lambda a: a.astype(dtype), models.init_params(m, jax.random.key(0), x.shape))
        f = jax.grad(lambda p: m.apply({"params": p}, x).sum())
        return convolutions.jit(f).lower(p).as_text()
    assert hlo(16, jnp.float32).count(native.KERNEL_GRAD_TARGET) == 14  # every 3x3 convolution
    assert hlo(8, jnp.float32).count(native.KERNEL_GRAD_TARGET) == 10  # all but the 8-wide level
    with jax.enable_x64(True):
        assert native.KERNEL_GRAD_TARGET not in hlo(16, jnp.float64)


@pytest.mark.parametrize("shape,cout,kernel,pads", [
    ((2, 9, 11, 3), 32, (3, 3), ((1, 1), (1, 1))),      # edge pixels, block tails
    ((2, 9, 40, 13), 16, (3, 3), ((0, 2), (2, 0))),     # asymmetric padding
    ((1, 7, 37, 32), 64, (2, 3), ((0, 0), (0, 0))),     # 'VALID', even kernel
    ((2, 6, 33, 24), 48, (3, 3), ((1, 1), (1, 1))),     # several 16-wide output blocks
    ((2, 4, 5, 35, 7), 32, (3, 3, 3), ((1, 1),) * 3),
    ((1, 5, 6, 34, 16), 64, (3, 3, 3), ((0, 2), (2, 0), (1, 0))),
    ((4, 64, 64, 16), 32, (3, 3), ((1, 1), (1, 1))),    # many chunks over the pool
])
def test_conv_matches_lax(shape, cout, kernel, pads):
    nd = len(kernel)
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), tuple(kernel) + (shape[-1], cout))
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    with jax.enable_x64(True):  # reference in float64
        want = jax.lax.conv_general_dilated(np.asarray(x, np.float64), np.asarray(w, np.float64),
                                            (1,) * nd, pads, dimension_numbers=dn)
    got = jax.jit(lambda x, w: native.conv(x, w, pads))(x, w)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("ndim", [2, 3])
def test_cpu_convolution_float32_gradients(ndim):
    """conv2d / conv3d_folded on the native path (rows >= NATIVE_MIN_WIDTH): values and both
    gradients against float64 jax.grad of lax's convolution."""
    shape = (2,) + (4, 5, 40)[-ndim:] + (16,)
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (3,) * ndim + (16, 32))
    dn = ("NHWC", "HWIO", "NHWC") if ndim == 2 else ("NDHWC", "DHWIO", "NDHWC")
    conv = convolutions.conv2d_cpu if ndim == 2 else convolutions.conv_z_as_batch
    pads = ((1, 1), (0, 2), (2, 0))[-ndim:]
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, (1,) * ndim, pads, dimension_numbers=dn)))
    assert native.CONV_TARGET in jax.jit(jax.grad(loss(conv), (0, 1))).lower(x, w).as_text()
    got = jax.jit(jax.value_and_grad(loss(conv), (0, 1)))(x, w)
    with jax.enable_x64(True):
        want = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(
            np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_kernel_grad_is_bitwise_reproducible():
    """Rows are summed in fixed parts whatever thread takes them: a resumed training run
    reproduces an uninterrupted one."""
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 24))
    g = jax.random.normal(jax.random.key(1), (4, 64, 64, 32))
    f = jax.jit(lambda x, g: native.conv_kernel_grad(x, g, (3, 3), (1, 1)))
    first = np.asarray(f(x, g))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(f(x, g)), first)


def _relu_norm64(y, b, scale, beta, eps=convolutions.NORM_EPS):
    """max(y + b, 0) through an instance norm, float64 jax.numpy (two-pass variance)."""
    z = jnp.maximum(y + b, 0)
    axes = tuple(range(1, y.ndim - 1))
    mean, var = z.mean(axes, keepdims=True), z.var(axes, keepdims=True)
    return (z - mean) / jnp.sqrt(var + eps) * scale + beta


@pytest.mark.parametrize("shape", [
    (3, 5, 7, 12),          # channels not a multiple of 16
    (2, 40, 33, 16),        # several chunks of pixels per image
    (2, 3, 9, 10, 48),      # 3D
    (3, 128, 100, 104),     # one image per group (images larger than the group's bytes)
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_norm_matches_float64(shape, dtype):
    """`native.relu_norm` and `relu_norm_grad`: the output (in float32 or rounded to bf16),
    the statistics, the input gradient and the parameter gradients against jax.vjp of a
    float64 formulation; with a bf16 output gradient, against the same rounded gradient."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    c = shape[-1]
    y = rng.normal(size=shape).astype(np.float32)
    y[0, ..., 0] = -1.0  # a channel that is all zero after the ReLU: variance 0
    b, beta = (rng.normal(size=c).astype(np.float32) * 0.3 for _ in range(2))
    scale = (1 + 0.2 * rng.normal(size=c)).astype(np.float32)
    g = np.asarray(jnp.asarray(rng.normal(size=shape), dtype), np.float64)
    out, stats = jax.jit(lambda *a: native.relu_norm(*a, convolutions.NORM_EPS, dtype))(
        y, b, scale, beta)
    dy, sums = jax.jit(lambda *a: native.relu_norm_grad(*a, dtype))(
        y, b, scale, stats, jnp.asarray(g, dtype))
    assert out.dtype == dy.dtype == dtype and stats.shape == (shape[0], 2, c)
    with jax.enable_x64(True):
        args = [np.asarray(a, np.float64) for a in (y, b, scale, beta)]
        want, vjp = jax.vjp(_relu_norm64, *args)
        want_dy, want_db, want_ds, want_dbeta = (np.asarray(v) for v in vjp(g))
        z = np.maximum(args[0] + args[1], 0).reshape(shape[0], -1, c)
        want_mean, want_var = z.mean(1), z.var(1)
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -8  # bf16: half an ulp of rounding, and more
    scale_of = lambda a: float(np.abs(a).max())  # noqa: E731
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol * scale_of(want))
    np.testing.assert_allclose(stats[:, 0], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[:, 1], 1 / np.sqrt(want_var + convolutions.NORM_EPS), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dy, np.float64), want_dy, rtol=tol,
                               atol=tol * scale_of(want_dy))
    for got, want_sum in zip((sums[:, 2], sums[:, 1], sums[:, 0]), (want_db, want_ds, want_dbeta)):
        np.testing.assert_allclose(got.sum(0), want_sum, rtol=1e-4, atol=1e-4 * scale_of(want_sum))


def test_relu_norm_rounds_to_nearest_even():
    """The bf16 output is XLA's rounding of the float32 one, NaN included."""
    y = np.random.default_rng(0).normal(size=(2, 64, 64, 16)).astype(np.float32)
    y[1, 3, 4, 5] = np.nan
    zeros, ones = np.zeros(16, np.float32), np.ones(16, np.float32)
    f = jax.jit(lambda y, dtype: native.relu_norm(y, zeros, ones, zeros, 1e-6, dtype)[0],
                static_argnums=1)
    want = np.asarray(f(y, jnp.float32).astype(jnp.bfloat16)).view(np.uint16)
    got = np.asarray(f(y, jnp.bfloat16)).view(np.uint16)
    assert np.isnan(np.asarray(f(y, jnp.bfloat16), np.float32)[1, ..., 5]).all()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(np.delete(got[1], 5, -1), np.delete(want[1], 5, -1))


@pytest.mark.parametrize("ndim", [2, 3])
def test_fused_layers_match_flax_float32(ndim):
    """A 'cpu' Block (two `conv_relu_norm` layers) against the 'xla' one (nn.Conv, ReLU,
    nn.InstanceNorm): the same parameter names and initial values, and values and gradients
    within float32 rounding; `relu_norm` (the decoder's norm after upsampling) against
    jax.grad of flax's InstanceNorm of the ReLU."""
    k = jax.random.split(jax.random.key(ndim), 3)
    x = jax.random.normal(k[0], (2,) + (8,) * ndim + (16,))
    blocks = {impl: models.Block(32, impl=impl) for impl in ("xla", "cpu")}
    p = blocks["xla"].init(k[1], x)["params"]
    same = jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
                        blocks["cpu"].init(k[1], x)["params"], p)
    assert all(jax.tree.leaves(same))
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k[2], a.shape), p)  # biases, norms
    w = jax.random.normal(k[2], x.shape[:-1] + (32,))
    out = {}
    for impl, blk in blocks.items():
        f = lambda p, x: jnp.vdot(blk.apply({"params": p}, x), w)  # noqa: E731,B023
        out[impl] = convolutions.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, x)
        hlo = convolutions.jit(jax.grad(f)).lower(p, x).as_text()
        assert (native.RELU_NORM_GRAD_TARGET in hlo) == (impl == "cpu")
    for a, b in zip(jax.tree.leaves(out["cpu"]), jax.tree.leaves(out["xla"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))

    y = jax.random.normal(k[0], x.shape[:-1] + (32,))
    b, scale, beta = (p["Conv_0"]["bias"], p["InstanceNorm_0"]["scale"], p["InstanceNorm_0"]["bias"])
    norm = models._norm(jnp.float32)
    flax_f = lambda y, b, s, t: jnp.vdot(norm.apply(  # noqa: E731
        {"params": {"scale": s, "bias": t}}, jax.nn.relu(y + b)), w)
    ours_f = lambda *a: jnp.vdot(convolutions.relu_norm(*a), w)  # noqa: E731
    want = jax.jit(jax.value_and_grad(flax_f, argnums=(0, 1, 2, 3)))(y, b, scale, beta)
    got = jax.jit(jax.value_and_grad(ours_f, argnums=(0, 1, 2, 3)))(y, b, scale, beta)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_fused_layers_take_parameters_of_other_dtypes():
    """bfloat16 parameters (and a float16 output, which the kernels do not write) go through
    the fused layers as through flax's, with gradients in the parameters' dtypes."""
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (1, 8, 8, 16))
    p = [jax.random.normal(kk, s).astype(jnp.bfloat16)
         for kk, s in zip(jax.random.split(k[1], 4), [(3, 3, 16, 16), (16,), (16,), (16,)])]
    f = lambda p: convolutions.conv_relu_norm(x, *p).astype(jnp.float32).sum()  # noqa: E731
    grads = jax.jit(jax.grad(f))(p)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 4
    out = convolutions.relu_norm(x, *p[1:], out_dtype=jnp.float16)
    assert out.dtype == jnp.float16 and bool(jnp.isfinite(out).all())
