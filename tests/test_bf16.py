"""bfloat16 convolutions on the CPU's bf16 units (oneDNN through the XLA FFI): values against
float32 `lax` convolutions of the same bf16 operands, the gradients of every convolution layer
of SAU-Net against float32 `jax.grad`, the whole network's gradient (trained parameters)
against the same bf16 rounding emulated in float32 and against XLA's own bfloat16 network, and
the fallback where the CPU has no bf16 units."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as flax_nn
import pytest
from jax import lax

from cellcount_jax import convolutions, models, native

needs_units = pytest.mark.skipif(not native.bf16_available(),
                                 reason="no bf16 units here, or oneDNN / its library missing")


def _lax_conv(x, k, padding):
    nd = x.ndim - 2
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    return lax.conv_general_dilated(x, k, (1,) * nd, padding, dimension_numbers=dn,
                                    precision=lax.Precision.HIGHEST)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


CASES = [  # input shape, kernel shape, padding
    ((2, 40, 36, 3), (3, 3, 3, 16), ((1, 1), (1, 1))),         # the RGB first layer
    ((2, 40, 36, 16), (3, 3, 16, 32), ((1, 1), (1, 1))),
    ((1, 12, 10, 64), (3, 3, 64, 32), ((1, 1), (1, 1))),        # a narrow bottleneck level
    ((2, 24, 20, 24), (3, 3, 24, 16), ((2, 0), (0, 2))),        # asymmetric padding
    ((1, 6, 20, 18, 1), (3, 3, 3, 1, 16), ((1, 1),) * 3),       # 3D, one channel
    ((2, 5, 12, 16, 16), (3, 3, 3, 16, 32), ((1, 1),) * 3),
    ((1, 3, 12, 10, 32), (3, 3, 3, 32, 32), ((1, 1),) * 3),     # as deep as the kernel
]


@needs_units
@pytest.mark.parametrize("shape,kshape,padding", CASES)
def test_bf16_convolution_and_kernel_gradient_match_float32(shape, kshape, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=kshape) / np.sqrt(np.prod(kshape[:-1])), jnp.bfloat16)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    y = jax.jit(lambda x, k: native.conv_bf16(x, k, padding))(x, k)
    ref = _lax_conv(f32(x), f32(k), padding)
    assert y.dtype == jnp.float32 and y.shape == ref.shape
    assert _rel(y, ref) < 1e-5  # float32 sums of exact products
    g = jnp.asarray(rng.normal(size=ref.shape), jnp.bfloat16)
    nd = x.ndim - 2
    dk = jax.jit(lambda x, g: native.conv_kernel_grad_bf16(
        x, g, kshape[:nd], [lo for lo, _ in padding]))(x, g)
    dk_ref = jax.vjp(lambda k: _lax_conv(f32(x), k, padding), f32(k))[1](f32(g))[0]
    assert dk.dtype == jnp.float32 and _rel(dk, dk_ref) < 1e-5  # float32 sums of exact products


@needs_units
def test_inputs_smaller_than_the_kernel():
    """A 2x2 (and 1x1) bottleneck with 3x3 kernels: oneDNN's forward is right; its kernel
    gradient is refused there (oneDNN 3.2 is wrong for some such 3D inputs) and the model's
    convolution takes XLA's for it."""
    rng = np.random.default_rng(3)
    for shape in [(2, 2, 2, 32), (1, 1, 1, 16), (1, 2, 3, 3, 16)]:
        nd = len(shape) - 2
        kshape = (3,) * nd + (shape[-1], 16)
        pads = ((1, 1),) * nd
        x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
        k = jnp.asarray(rng.normal(size=kshape) * 0.1, jnp.bfloat16)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        assert _rel(native.conv_bf16(x, k, pads), _lax_conv(f32(x), f32(k), pads)) < 1e-5
        with pytest.raises(ValueError, match="smaller than the kernel"):
            native.conv_kernel_grad_bf16(x, x, (3,) * nd, (1,) * nd)
        w = rng.normal(size=shape[:-1] + (16,)).astype(np.float32)
        loss16 = lambda x, k: jnp.sum(convolutions.conv_bf16(x, k, pads) * w)  # noqa: E731
        loss32 = lambda x, k: jnp.sum(_lax_conv(x, k, pads) * w)  # noqa: E731
        got = jax.grad(loss16, (0, 1))(f32(x), f32(k))
        ref = jax.grad(loss32, (0, 1))(f32(x), f32(k))
        assert all(_rel(a, b) < 1e-2 for a, b in zip(got, ref)), shape


def _layers(ndim, features=16, size=(48, 40), depth=8, channels=None):
    """(input shape, kernel shape) of every 3x3(x3) convolution of SAU-Net (batch 1)."""
    spatial = (depth, *size) if ndim == 3 else size
    cin = channels or (3 if ndim == 2 else 1)
    out = []
    for level in range(models.LEVELS):
        f = features * 2 ** level
        s = tuple(v // 2 ** level for v in spatial)
        out += [((1, *s, cin), (3,) * ndim + (cin, f)), ((1, *s, f), (3,) * ndim + (f, f))]
        cin = f
    for level in reversed(range(models.LEVELS - 1)):
        f = features * 2 ** level
        s = tuple(v // 2 ** level for v in spatial)
        out += [((1, *s, 2 * f), (3,) * ndim + (2 * f, f)), ((1, *s, f), (3,) * ndim + (f, f))]
    return out


@needs_units
@pytest.mark.parametrize("ndim", [2, 3])
def test_every_layer_s_gradients_match_float32_jax_grad(ndim):
    """The model's bf16 convolution (`conv_bf16`, custom VJP): forward, input and kernel
    gradients within bf16 tolerance (1e-2) of float32 jax.grad."""
    rng = np.random.default_rng(1)
    for shape, kshape in _layers(ndim):
        x = rng.normal(size=shape).astype(np.float32)
        k = (rng.normal(size=kshape) / np.sqrt(np.prod(kshape[:-1]))).astype(np.float32)
        w = rng.normal(size=shape[:-1] + kshape[-1:]).astype(np.float32)
        pads = ((1, 1),) * ndim

        def loss16(x, k):
            y = convolutions.conv_bf16(x, k, pads)
            assert y.dtype == jnp.float32
            return jnp.sum(y * w)

        def loss32(x, k):
            return jnp.sum(_lax_conv(x, k, pads) * w)

        y, y_ref = jax.jit(convolutions.conv_bf16, static_argnums=2)(x, k, pads), _lax_conv(x, k, pads)
        dx, dk = jax.jit(jax.grad(loss16, (0, 1)))(x, k)
        rx, rk = jax.grad(loss32, (0, 1))(x, k)
        assert dx.dtype == dk.dtype == jnp.float32
        assert _rel(y, y_ref) < 1e-2 and _rel(dx, rx) < 1e-2 and _rel(dk, rk) < 1e-2, (shape, kshape)
        assert "cellcount_dnnl" in jax.jit(jax.grad(loss16, (0, 1))).lower(x, k).as_text()


@needs_units
@pytest.mark.parametrize("ndim", [2, 3])
def test_upsampling_and_attention_projections_match_float32_jax_grad(ndim):
    """The products that bfloat16 puts on the bf16 units besides the 3x3(x3) convolutions:
    every upsampling of SAU-Net (f = 32) against XLA's float32 transposed convolution, and
    the attention's projections (`nn.Dense` with `dot_bf16`) against float32 `nn.Dense`:
    output and input and kernel gradients within bf16 tolerance (1e-2), through oneDNN."""
    rng = np.random.default_rng(3)
    spatial = (8, 16, 16) if ndim == 3 else (32, 32)
    dn = ("NHWC", "HWIO", "NHWC") if ndim == 2 else ("NDHWC", "DHWIO", "NDHWC")
    for level in range(models.LEVELS - 1):
        cin, f = 64 * 2 ** level, 32 * 2 ** level
        s = tuple(v // 2 ** level for v in spatial)
        x = rng.normal(size=(2, *s, cin)).astype(np.float32)
        k = (rng.normal(size=(2,) * ndim + (cin, f)) / np.sqrt(cin)).astype(np.float32)
        w = rng.normal(size=(2, *(2 * v for v in s), f)).astype(np.float32)
        up16 = lambda x, k: jnp.sum(convolutions.upsample2(x, k, "cpu", jnp.bfloat16) * w)  # noqa: E731
        up32 = lambda x, k: jnp.sum(lax.conv_transpose(  # noqa: E731
            x, k, (2,) * ndim, "VALID", dimension_numbers=dn,
            precision=lax.Precision.HIGHEST) * w)
        (v16, g16), (v32, g32) = (jax.jit(jax.value_and_grad(fn, (0, 1)))(x, k)
                                  for fn in (up16, up32))
        errs = [_rel(v16, v32)] + [_rel(a, b) for a, b in zip(g16, g32)]
        assert max(errs) < 1e-2, (level, errs)
        assert "cellcount_dnnl" in jax.jit(jax.grad(up16, (0, 1))).lower(x, k).as_text()

    c = 256
    x = rng.normal(size=(2, *(v // 8 for v in spatial), c)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    dense16 = flax_nn.Dense(c, dot_general=convolutions.dot_bf16)
    dense32 = flax_nn.Dense(c, precision=lax.Precision.HIGHEST)
    params = dense32.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    loss = lambda net: lambda p, x: jnp.sum(net.apply(p, x) * w)  # noqa: E731
    (v16, (p16, x16)), (v32, (p32, x32)) = (jax.jit(jax.value_and_grad(loss(net), (0, 1)))(params, x)
                                            for net in (dense16, dense32))
    errs = ([_rel(v16, v32), _rel(x16, x32)]
            + [_rel(a, b) for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32))])
    assert max(errs) < 1e-2, errs
    assert "cellcount_dnnl" in jax.jit(jax.grad(loss(dense16))).lower(params, x).as_text()


@needs_units
@pytest.mark.parametrize("ndim", [2, 3])
def test_every_fused_layer_s_gradients_match_float32_jax_grad(ndim):
    """The model's bf16 layer (`conv_relu_norm`: bf16 convolution, bias, ReLU, instance norm,
    one custom VJP): the output and the gradients of the input, kernel, bias and norm
    parameters within bf16 tolerance (1e-2) of float32 jax.grad of the same layer at the
    bf16-rounded input and kernel. (At the unrounded ones, the convolution's rounding moves
    some pixels across the ReLU's kink, a difference in which pixels pass rather than in
    precision; the convolution alone is compared unrounded above.)"""
    rng = np.random.default_rng(2)
    for shape, kshape in _layers(ndim):
        c = kshape[-1]
        bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)  # noqa: E731
        x = bf(rng.normal(size=shape))
        k = bf(rng.normal(size=kshape) / np.sqrt(np.prod(kshape[:-1])))
        b, beta = (0.3 * rng.normal(size=c).astype(np.float32) for _ in range(2))
        scale = (1 + 0.2 * rng.normal(size=c)).astype(np.float32)
        w = rng.normal(size=shape[:-1] + (c,)).astype(np.float32)
        pads = ((1, 1),) * ndim

        def loss16(*a):
            out = convolutions.conv_relu_norm(*a, dtype=jnp.bfloat16, out_dtype=jnp.bfloat16)
            return jnp.sum(out.astype(jnp.float32) * w), out

        def loss32(x, k, b, scale, beta):
            out = convolutions._relu_norm_jnp(_lax_conv(x, k, pads), b, scale, beta)[0]
            return jnp.sum(out * w), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss16, (0, 1, 2, 3, 4), has_aux=True))(
            x, k, b, scale, beta)
        (_, ref), refs = jax.value_and_grad(loss32, (0, 1, 2, 3, 4), has_aux=True)(
            x, k, b, scale, beta)
        assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.float32 for g in grads)
        errs = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, refs)]
        assert max(errs) < 1e-2, (shape, kshape, errs)


def _emulated_bf16_conv():
    """conv_bf16's rounding emulated with float32 `lax` convolutions: operands and output
    gradient rounded to bf16, everything computed in float32."""
    bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def conv(x, k, padding):
        return _lax_conv(bf(x), bf(k), padding)

    def fwd(x, k, padding):  # empty arrays carry the operands' dtypes
        return conv(x, k, padding), (bf(x), bf(k), jnp.zeros(0, x.dtype), jnp.zeros(0, k.dtype))

    def bwd(padding, res, g):
        x, k, x_like, k_like = res
        dx, dk = jax.vjp(lambda x, k: _lax_conv(x, k, padding), x, k)[1](bf(g))
        return dx.astype(x_like.dtype), dk.astype(k_like.dtype)

    conv.defvjp(fwd, bwd)
    return conv


@needs_units
def test_the_bf16_network_s_gradient_is_as_close_to_float32_as_bf16_rounding_allows(monkeypatch):
    """The whole 2D network (trained parameters, a synthetic image): its parameter gradient
    in bfloat16 is as far from float32 as the same rounding emulated in float32, and as XLA's
    own bfloat16 network. (Per parameter the two differ: a sum that lands on the other side
    of a bf16 rounding boundary changes the next layer's input, and instance norms amplify
    it; the gradient as a whole is what training follows.)"""
    from cellcount_jax import checkpoints
    from cellcount_jax.data import synthetic_set
    from cellcount_jax.data.dataset import make_targets
    images, dots = synthetic_set(0, 2, shape=(64, 64), num_cells=(30, 60), radius=4.0,
                                 spacing=(1.0, 1.0), channels=3)
    x = np.stack(images).astype(np.float32)
    x = (x - x.mean()) / x.std()
    t = np.stack(make_targets(images, dots, "inverse_distance", 100.0, (1.0, 1.0)))
    _, params = checkpoints.restore_params(os.path.join(os.path.dirname(__file__), "..",
                                                        "pretrained", "vgg2d_cpu"))

    def grads(dtype, impl):
        net = models.SAUNet(features=16, dropout=0.0, dtype=dtype, impl=impl)
        loss = lambda p: jnp.mean((net.apply({"params": p}, x, train=False) - t) ** 2)  # noqa: E731
        g = jax.jit(jax.grad(loss))(params)
        return np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])

    ref = grads(jnp.float32, "xla")
    ours = grads(jnp.bfloat16, "cpu")
    xla_bf16 = grads(jnp.bfloat16, "xla")
    # The layers composed of conv_bf16 and jax.numpy norms, conv_bf16 emulated.
    monkeypatch.setattr(native, "relu_norm_available", lambda: False)
    monkeypatch.setattr(convolutions, "conv_bf16", _emulated_bf16_conv())
    emulated = grads(jnp.bfloat16, "cpu")
    err = {k: np.linalg.norm(v - ref) / np.linalg.norm(ref)
           for k, v in [("ours", ours), ("emulated", emulated), ("xla_bf16", xla_bf16)]}
    # ours and the emulation differ only in the order of float32 sums.
    assert err["ours"] <= 1.5 * err["emulated"] and err["ours"] <= 1.5 * err["xla_bf16"], err
    assert np.dot(ours, ref) / np.linalg.norm(ours) / np.linalg.norm(ref) > 0.98, err


@pytest.mark.skipif(native.bf16_units() != "amx_bf16",
                    reason="no AMX here: the AVX512-BF16 path is the one the tests above run")
def test_the_avx512_bf16_path_of_an_amx_cpu():
    """On a CPU with AMX, the tests above ran oneDNN's AMX kernels; here they run again with
    oneDNN limited to AVX512-BF16 (the path of CPUs without AMX, e.g. AMD Zen 4/5)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")
    units = subprocess.run([sys.executable, "-c", "from cellcount_jax import native;"
                            "print(native.bf16_units())"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert units.stdout.strip() == "avx512_bf16", units.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "match_float32 or smaller_than_the_kernel"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]


def test_without_bf16_units_bf16_convolutions_fall_back_to_xla():
    """oneDNN limited to AVX-512 without bf16 (as on a CPU without bf16 units): no units are
    reported, the bf16 convolution lowers to XLA's and still computes it."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from cellcount_jax import convolutions, native
assert native.bf16_units() is None
x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 16)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 16, 16)) * 0.1, jnp.float32)
w = jnp.asarray(np.random.default_rng(2).normal(size=(1, 16, 16, 16)), jnp.float32)
pads = ((1, 1), (1, 1))
loss = lambda conv: lambda x, k: jnp.sum(conv(x, k) * w)
ours = jax.jit(jax.value_and_grad(loss(lambda x, k: convolutions.conv_bf16(x, k, pads)), (0, 1)))
assert "cellcount_dnnl" not in ours.lower(x, k).as_text()
ref_conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST)
bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
(v, grads), (rv, rgrads) = ours(x, k), jax.value_and_grad(loss(ref_conv), (0, 1))(bf(x), bf(k))
rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
assert rel(v, rv) < 1e-3 and all(rel(a, b) < 1e-2 for a, b in zip(grads, rgrads))
print("fallback ok")
"""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr[-2000:]


def test_auto_dtype_is_bfloat16_exactly_for_2d_models_where_the_cpu_has_bf16_units():
    from configs import quickstart, synthetic3d
    from cellcount_jax import train
    c3 = synthetic3d.get_config()
    assert c3.model.dtype == "auto" and train.compute_dtype(c3) == "float32"
    c = quickstart.get_config()
    c.model.dtype = "auto"
    c.model.impl = "cpu"
    assert train.compute_dtype(c) == ("bfloat16" if native.bf16_available() else "float32")
    c.data.ndim = 3
    assert train.compute_dtype(c) == "float32"
    c.data.ndim = 2
    c.model.impl = "xla"  # the formulation for accelerators keeps float32 by default
    assert train.compute_dtype(c) == "float32"
    c.model.dtype = "float16"
    with pytest.raises(Exception, match="must be 'float32', 'bfloat16' or 'auto'"):
        train.compute_dtype(c)
