"""How SAU-Net's convolutions, pooling and upsampling are computed: one set of parameters,
several formulations with the same float32 values.

`impl` picks the formulation:
- 'xla': `lax` convolutions as written (3D kernels, transposed convolutions), what XLA's
  GPU/TPU backends optimise best;
- 'cpu': the 3x3(x3) convolutions through custom VJPs (`conv2d`, `conv3d_folded`) that call
  the native AVX-512 kernels of `native` (forward and input gradient on rows >= 32 wide,
  kernel gradient everywhere) where they run, and otherwise XLA formulations that suit
  XLA:CPU: a 3D convolution as one 2D convolution (z folded into the batch, the z taps into
  the channels) and a kernel gradient whose operands swap roles where that moves less data;
  2x2 max pooling as a reshape + max, a 2x2(x2) stride-2 transposed convolution as one matrix
  product + depth-to-space (its backward pass a stride-2 convolution and per-tap
  contractions), the 1x1(x1) output convolution as a matrix product. Each 3x3(x3)
  convolution with its bias, ReLU and instance norm is one custom VJP (`conv_relu_norm`),
  the bias + ReLU + norm in one pass each way by the native kernels (`native.relu_norm`;
  `relu_norm` alone after the upsampling). 2.5-7x faster training on CPU than 'xla'; see
  docs/performance.md. In bfloat16 (`conv_bf16`, `conv_relu_norm`) the 3x3(x3) convolutions
  round their operands to bf16 and run on the CPU's bf16 units through oneDNN (float32
  accumulation and results); the first layer of each block gives the second its output, and
  takes its gradient back, in bf16; everything else stays float32.
- 'auto': 'cpu' on the CPU backend, 'xla' elsewhere (`resolve_impl`).

The network reaches them through `conv_fn(impl, kernel_size, dtype)` (the `conv_general_dilated` of
its `nn.Conv` layers), `conv_relu_norm`, `relu_norm`, `max_pool2` and `upsample2`. `jit` compiles with `compiler_options()`,
which on XLA:CPU routes the remaining convolutions to its Eigen kernels instead of the YNNPACK
fusions; `train.Parallel` uses the same options.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cellcount_jax import native
from cellcount_jax.errors import InputError

IMPLS = ("auto", "xla", "cpu")
# XLA:CPU library fusions kept on the CPU: YNNPACK for reductions only (not for
# convolutions or dots, where XLA's own Eigen kernels are faster on this network).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def resolve_impl(impl: str) -> str:
    """'auto' -> 'cpu' on the CPU backend, 'xla' on GPU/TPU; 'xla' and 'cpu' stay."""
    if impl not in IMPLS:
        raise InputError(f"config.model.impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def compiler_options(platform: str = None):
    """XLA compiler options for jitting the model on `platform` (default: the default
    backend); None: XLA's defaults."""
    if (platform or jax.default_backend()) != "cpu":
        return None
    options = _cpu_options()
    return dict(options) if options else None


@functools.cache
def _cpu_options():
    # XLA versions without YNNPACK fusions do not know the option (and need none).
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(1.0).compile()
    except (RuntimeError, ValueError):
        return None
    return _CPU_OPTIONS


def jit(fn, **kwargs):
    """`jax.jit` with `compiler_options()`."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)

def _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count):
    """Explicit ((lo, hi), ...) padding of a stride-1, undilated, ungrouped convolution."""
    assert feature_group_count == 1 and all(s == 1 for s in window_strides)
    assert all(d == 1 for d in (lhs_dilation or (1,))) and all(d == 1 for d in (rhs_dilation or (1,)))
    nd = lhs.ndim - 2
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:nd], (1,) * nd, padding)
    return tuple(tuple(p) for p in padding)


def conv_z_as_batch(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, precision=None, **unused):
    """`lax.conv_general_dilated` for NDHWC x DHWIO, stride 1, undilated, as one 2D
    convolution: z folded into the batch, the kernel's z taps into the input channels (the
    input stacked with its z-shifted copies), the kernel reshaped to (y, x, z * in, out)."""
    assert lhs.ndim == 5
    pads = _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count)
    return conv3d_folded(lhs, rhs, pads, precision)


def conv2d_cpu(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None, **unused):
    """`lax.conv_general_dilated` for NHWC x HWIO, stride 1, undilated, through `conv2d`."""
    assert lhs.ndim == 4
    pads = _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count)
    return conv2d(lhs, rhs, pads, precision)


def _conv2d(x, kernel, padding, precision):
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, precision=precision,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _fold(x, kz, zpad):
    """(n, d, h, w, c) -> (n * d_out, h, w, kz * c): each output plane's kz input planes."""
    n, d, h, w, c = x.shape
    d_out = d + sum(zpad) - kz + 1
    x = jnp.pad(x, ((0, 0), zpad, (0, 0), (0, 0), (0, 0)))
    return jnp.concatenate([x[:, i:i + d_out] for i in range(kz)], -1).reshape(n * d_out, h, w, kz * c)


def _unfold(dxf, d, zpad):
    """The transpose of `_fold`: (n, d_out, h, w, kz, c) -> (n, d, h, w, c),
    dx[z] = sum_i dxf[z + lo - i, i]."""
    d_out, kz = dxf.shape[1], dxf.shape[-2]
    lo = zpad[0]
    nopad = [(0, 0, 0)] * 3
    return sum(lax.pad(dxf[..., i, :], jnp.zeros((), dxf.dtype),
                       [(0, 0, 0), (i - lo, d - d_out + lo - i, 0)] + nopad) for i in range(kz))


def _fold_kernel(kernel):
    """(z, y, x, in, out) -> (y, x, z * in, out), the channel order of `_fold`."""
    kz, ky, kx, cin, cout = kernel.shape
    return jnp.moveaxis(kernel, 0, 2).reshape(ky, kx, kz * cin, cout)


def _conv3d_folded(x, kernel, padding, precision):
    y = _conv2d(_fold(x, kernel.shape[0], padding[0]), _fold_kernel(kernel), padding[1:], precision)
    return y.reshape((x.shape[0], -1) + y.shape[1:])


def _kernel_grad(x, g, kernel_shape, padding, precision):
    """d/dkernel of sum(g * _conv2d(x, kernel)). XLA:CPU computes it as a convolution with
    batch and channels swapped, for which it transposes x to (in, y, x, batch) and g to
    (y, x, batch, out). Where x has more channels than g, the same sum is taken with the roles
    swapped, g as the input (batch <- its channels) and x as the kernel, so that the
    batch-minor transpose is of the smaller of the two:
    dk[a, b] = sum_{n,i,j} x[n, i, j] g[n, i - a + lo_y, j - b + lo_x]."""
    if x.shape[-1] <= g.shape[-1]:
        zeros = jnp.zeros(kernel_shape, x.dtype)
        return jax.vjp(lambda k: _conv2d(x, k, padding, precision), zeros)[1](g)[0]
    ky, kx = kernel_shape[:2]
    (ylo, yhi), (xlo, xhi) = padding
    pads = ((ky - 1 - ylo, ky - 1 - yhi), (kx - 1 - xlo, kx - 1 - xhi))
    dk = lax.conv_general_dilated(g, x, (1, 1), pads, precision=precision,
                                  dimension_numbers=("CHWN", "IHWO", "NHWC"))
    return jnp.flip(dk, (1, 2)).transpose(1, 2, 3, 0)


# The native convolution beats XLA:CPU's where rows are at least this wide; on narrower ones
# (the bottleneck levels) the edge pixels weigh too much.
NATIVE_MIN_WIDTH = 32


def _native_conv_or(xla_conv, x, kernel, padding):
    """A stride-1 convolution by `native.conv` where it runs (CPU backend, an AVX-512 CPU,
    float32, output channels a multiple of 16, rows at least NATIVE_MIN_WIDTH wide), else by
    `xla_conv(x, kernel)`."""
    if not (native.available(x.dtype, kernel.shape[-1]) and x.shape[-2] >= NATIVE_MIN_WIDTH
            and min(min(pad) for pad in padding) >= 0):
        return xla_conv(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=lambda x, k: native.conv(x, k, padding),
                                  default=xla_conv)


def _native_kernel_grad_or(xla_kernel_grad, x, g, kernel_shape, padding):
    """The kernel gradient by `native.conv_kernel_grad` where it runs, else by
    `xla_kernel_grad(x, g)`."""
    if not native.available(x.dtype, g.shape[-1]):
        return xla_kernel_grad(x, g)
    nd = x.ndim - 2
    pad_lo = [lo for lo, _ in padding]
    fast = lambda x, g: native.conv_kernel_grad(x, g, kernel_shape[:nd], pad_lo)
    return lax.platform_dependent(x, g, cpu=fast, default=xla_kernel_grad)


def _input_grad(xla_input_grad, g, kernel, padding):
    """d/dx of sum(g * conv(x, kernel)): the convolution of g with the flipped, transposed
    kernel, padded k - 1 - pad, natively where it runs."""
    nd = g.ndim - 2
    flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(nd))), -1, -2)
    pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape[:nd], padding))
    return _native_conv_or(lambda g, k: xla_input_grad(g), g, flipped, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, padding, precision=None):
    """Stride-1 2D convolution, NHWC x HWIO -> NHWC, `padding` ((lo, hi), (lo, hi)): native
    kernels where they run (`_native_conv_or`), else XLA's forward and input gradient and the
    kernel gradient by `_kernel_grad`."""
    return _native_conv_or(lambda x, k: _conv2d(x, k, padding, precision), x, kernel, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3d_folded(x, kernel, padding, precision=None):
    """Stride-1 3D convolution, NDHWC x DHWIO -> NDHWC, `padding` ((lo, hi),) * 3: native
    kernels where they run, else one 2D convolution of the z-folded input (`_fold`). Only x
    is kept for the backward pass (not its 3x larger fold)."""
    return _native_conv_or(lambda x, k: _conv3d_folded(x, k, padding, precision), x, kernel, padding)


def _conv_fwd(fn, x, kernel, padding, precision):
    return fn(x, kernel, padding, precision), (x, kernel)


def _conv2d_bwd(padding, precision, res, g):
    x, kernel = res
    dx = _input_grad(lambda g: jax.vjp(lambda x: _conv2d(x, kernel, padding, precision), x)[1](g)[0],
                     g, kernel, padding)
    dk = _native_kernel_grad_or(lambda x, g: _kernel_grad(x, g, kernel.shape, padding, precision),
                                x, g, kernel.shape, padding)
    return dx, dk.astype(kernel.dtype)


def _conv3d_folded_bwd(padding, precision, res, g):
    x, kernel = res
    kz, ky, kx, cin, cout = kernel.shape
    n, d, h, w = x.shape[:4]
    g2 = g.reshape((-1,) + g.shape[2:])

    def folded_input_grad(g):
        xf = jnp.zeros((g2.shape[0], h, w, kz * cin), x.dtype)  # its shape only
        dxf = jax.vjp(lambda xf: _conv2d(xf, _fold_kernel(kernel), padding[1:], precision),
                      xf)[1](g.reshape(g2.shape))[0]
        return _unfold(dxf.reshape((n, -1, h, w, kz, cin)), d, padding[0])

    def folded_kernel_grad(x, g):
        dk = _kernel_grad(_fold(x, kz, padding[0]), g.reshape(g2.shape), (ky, kx, kz * cin, cout),
                          padding[1:], precision)
        return jnp.moveaxis(dk.reshape(ky, kx, kz, cin, cout), 2, 0)

    dx = _input_grad(folded_input_grad, g, kernel, padding)
    dk = _native_kernel_grad_or(folded_kernel_grad, x, g, kernel.shape, padding)
    return dx, dk.astype(kernel.dtype)


conv2d.defvjp(functools.partial(_conv_fwd, conv2d.fun), _conv2d_bwd)
conv3d_folded.defvjp(functools.partial(_conv_fwd, conv3d_folded.fun), _conv3d_folded_bwd)


def _lax_conv(x, kernel, padding, out_dtype=jnp.float32):
    """Stride-1 `lax` convolution, channels last (NHWC x HWIO or NDHWC x DHWIO), float32
    accumulation, the result in out_dtype."""
    nd = x.ndim - 2
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    return lax.conv_general_dilated(x, kernel, (1,) * nd, padding, dimension_numbers=dn,
                                    preferred_element_type=jnp.float32).astype(out_dtype)


def _bf16_units_conv(x, kernel, padding, out_dtype=jnp.float32):
    """bf16 x and kernel -> out_dtype (float32 accumulation), by `native.conv_bf16` where
    the CPU has bf16 units."""
    if native.bf16_available() and min(min(pad) for pad in padding) >= 0:
        return lax.platform_dependent(
            x, kernel, cpu=lambda x, k: native.conv_bf16(x, k, padding, out_dtype),
            default=lambda x, k: _lax_conv(x, k, padding, out_dtype))
    return _lax_conv(x, kernel, padding, out_dtype)


def _bf16_kernel_grad(x, g, kernel_shape, padding):
    """d/dkernel of sum(g * conv(x, kernel)) for bf16 x and g, float32, by
    `native.conv_kernel_grad_bf16` where it runs."""
    nd = x.ndim - 2
    xla = lambda x, g: jax.vjp(lambda k: _lax_conv(x.astype(jnp.float32), k, padding),  # noqa: E731
                               jnp.zeros(kernel_shape, jnp.float32))[1](g.astype(jnp.float32))[0]
    # oneDNN 3.2's bf16 kernel gradient is wrong for 3D inputs shallower than the kernel
    # (e.g. 2 planes, 3x3x3; found by tests/test_bf16.py): inputs smaller than the kernel
    # along any axis take XLA's.
    if not (native.bf16_available() and min(min(pad) for pad in padding) >= 0
            and all(s >= k for s, k in zip(x.shape[1:-1], kernel_shape[:nd]))):
        return xla(x, g)
    fast = lambda x, g: native.conv_kernel_grad_bf16(x, g, kernel_shape[:nd],  # noqa: E731
                                                     [lo for lo, _ in padding])
    return lax.platform_dependent(x, g, cpu=fast, default=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_bf16(x, kernel, padding):
    """Stride-1 2D or 3D convolution (NHWC x HWIO, NDHWC x DHWIO), `padding` ((lo, hi),) per
    spatial axis, of x and kernel rounded to bfloat16, with float32 accumulation (forward,
    input gradient and kernel gradient alike), a float32 result, the input gradient in x's
    dtype (written in bf16 directly where x is bf16): on the CPU's bf16 units through
    oneDNN (`native.conv_bf16`) where it has some, else XLA's convolution of the bf16
    operands. Only the bf16 copies of x and kernel are kept for the backward pass."""
    return _bf16_units_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), padding)


def _conv_bf16_fwd(x, kernel, padding):
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    # Empty arrays carry the operands' dtypes (a residual must be an array).
    dtypes = (jnp.zeros(0, x.dtype), jnp.zeros(0, kernel.dtype))
    return _bf16_units_conv(xb, kb, padding), (xb, kb, dtypes)


def _conv_bf16_grads(xb, kb, padding, g, dx_dtype):
    """(dx in dx_dtype, dk float32) of conv_bf16 for bf16 x, kernel and output gradient g.
    The input gradient is the convolution of g with the flipped, transposed kernel."""
    gb = g.astype(jnp.bfloat16)
    nd = xb.ndim - 2
    flipped = jnp.swapaxes(jnp.flip(kb, tuple(range(nd))), -1, -2)
    pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kb.shape[:nd], padding))
    return (_bf16_units_conv(gb, flipped, pads, dx_dtype),
            _bf16_kernel_grad(xb, gb, kb.shape, padding))


def _conv_bf16_bwd(padding, res, g):
    xb, kb, (x_like, k_like) = res
    dx_dtype = x_like.dtype if x_like.dtype in _NATIVE_OUT else jnp.float32
    dx, dk = _conv_bf16_grads(xb, kb, padding, g, dx_dtype)
    return dx.astype(x_like.dtype), dk.astype(k_like.dtype)


conv_bf16.defvjp(_conv_bf16_fwd, _conv_bf16_bwd)


def conv_bf16_general(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, precision=None, **unused):
    """`lax.conv_general_dilated` for channels-last operands, stride 1, undilated, through
    `conv_bf16` (float32 result)."""
    pads = _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count)
    return conv_bf16(lhs, rhs, pads)


def dot_bf16(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: channels-last features (n, *spatial,
    in), 2D or 3D, times a matrix (in, out) as a 1x1(x1) `conv_bf16` (bfloat16 operands,
    float32 sums and result, on the CPU's bf16 units). Other contractions take
    `lax.dot_general`."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (lhs.ndim in (4, 5) and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,)
            and tuple(rc) == (0,) and not lb and not rb):
        nd = lhs.ndim - 2
        return conv_bf16(lhs, rhs.reshape((1,) * nd + rhs.shape), ((0, 0),) * nd)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


NORM_EPS = 1e-6  # the reference implementation's instance norm epsilon
_NATIVE_OUT = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # what the native kernels write


def _expand(v, ndim):
    """(n, c) -> (n, 1, ..., 1, c) against an (n, *spatial, c) array of rank ndim."""
    return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[-1],))


def _relu_norm_jnp(y, b, scale, beta, out_dtype=jnp.float32):
    """(out, stats (n, 2, c) = mean and 1 / std) of max(y + b, 0) through flax's InstanceNorm
    (fast variance), by jax.numpy in y's dtype, out in out_dtype."""
    z = jax.nn.relu(y + b)
    axes = tuple(range(1, y.ndim - 1))
    mean = z.mean(axes)
    r = lax.rsqrt(jnp.maximum((z * z).mean(axes) - mean * mean, 0.0) + NORM_EPS)
    out = (z - _expand(mean, y.ndim)) * _expand(r * scale, y.ndim) + beta
    return out.astype(out_dtype), jnp.stack([mean, r], 1)


def _relu_norm_fwd(y, b, scale, beta, out_dtype):
    """`_relu_norm_jnp` by `native.relu_norm` on the CPU."""
    return lax.platform_dependent(
        y, b, scale, beta, default=lambda *a: _relu_norm_jnp(*a, out_dtype),
        cpu=lambda *a: native.relu_norm(*a, NORM_EPS, out_dtype))


def _relu_norm_bwd(y, b, scale, stats, g, dy_dtype):
    """(dy, (db, dscale, dbeta)) of `_relu_norm_fwd` for the output gradient g:
    `native.relu_norm_grad` on the CPU, jax.numpy elsewhere."""
    def other(y, b, scale, stats, g):
        axes = tuple(range(1, y.ndim - 1))
        pixels = np.prod(y.shape[1:-1])
        m, r = _expand(stats[:, 0], y.ndim), _expand(stats[:, 1], y.ndim)
        g = g.astype(jnp.float32)
        x = y + b
        xhat = (jax.nn.relu(x) - m) * r
        s1, s2 = g.sum(axes), (g * xhat).sum(axes)
        dy = jnp.where(x > 0, r * scale * (g - _expand(s1 / pixels, y.ndim)
                                           - xhat * _expand(s2 / pixels, y.ndim)), 0.0)
        return dy.astype(dy_dtype), jnp.stack([s1, s2, dy.sum(axes)], 1)

    dy, sums = lax.platform_dependent(
        y, b, scale, stats, g, default=other,
        cpu=lambda *a: native.relu_norm_grad(*a, dy_dtype))
    sums = sums.sum(0)
    return dy, (sums[2], sums[1], sums[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bias_relu_norm(y, b, scale, beta, out_dtype):
    return _relu_norm_fwd(y, b, scale, beta, out_dtype)[0]


def _bias_relu_norm_fwd(y, b, scale, beta, out_dtype):
    out, stats = _relu_norm_fwd(y, b, scale, beta, out_dtype)
    return out, (y, b, scale, stats)


def _bias_relu_norm_bwd(out_dtype, res, g):
    dy, grads = _relu_norm_bwd(*res, g, jnp.float32)
    return (dy,) + grads


_bias_relu_norm.defvjp(_bias_relu_norm_fwd, _bias_relu_norm_bwd)


def relu_norm(y, b, scale, beta, out_dtype=jnp.float32):
    """max(y + b, 0) through an instance norm (the statistics over the pixels of each image
    and channel, eps NORM_EPS, then times scale plus beta; flax's `InstanceNorm`), in
    `out_dtype`; y (n, *spatial, c) float32. With the native kernels (`native.relu_norm`) one
    pass each way, the output written in out_dtype; else by jax.numpy."""
    if not (native.relu_norm_available() and y.dtype == jnp.float32
            and jnp.dtype(out_dtype) in _NATIVE_OUT):
        return _relu_norm_jnp(y, b, scale, beta, out_dtype)[0]
    b, scale, beta = (v.astype(jnp.float32) for v in (b, scale, beta))
    return _bias_relu_norm(y, b, scale, beta, jnp.dtype(out_dtype))


def _conv_cpu(x, kernel, padding):
    """The float32 'cpu' convolution (`conv2d`, `conv3d_folded`) without its VJP."""
    return (conv2d if x.ndim == 4 else conv3d_folded).fun(x, kernel, padding)


def _conv_cpu_grads(x, kernel, padding, g):
    """(dx, dk) of `_conv_cpu` for the output gradient g."""
    bwd = _conv2d_bwd if x.ndim == 4 else _conv3d_folded_bwd
    return bwd(padding, None, (x, kernel), g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _conv_relu_norm(x, kernel, b, scale, beta, padding, bf16, out_dtype):
    return _conv_relu_norm_fwd(x, kernel, b, scale, beta, padding, bf16, out_dtype)[0]


def _conv_relu_norm_fwd(x, kernel, b, scale, beta, padding, bf16, out_dtype):
    x_like = jnp.zeros(0, x.dtype)  # x's dtype, that of its gradient
    if bf16:
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
        y = _bf16_units_conv(x, kernel, padding)
    else:
        y = _conv_cpu(x, kernel, padding)
    out, stats = _relu_norm_fwd(y, b, scale, beta, out_dtype)
    return out, (x, kernel, y, b, scale, stats, x_like)


def _conv_relu_norm_bwd(padding, bf16, out_dtype, res, g):
    x, kernel, y, b, scale, stats, x_like = res
    dy, grads = _relu_norm_bwd(y, b, scale, stats, g, jnp.bfloat16 if bf16 else jnp.float32)
    if bf16:
        dx, dk = _conv_bf16_grads(x, kernel, padding, dy, x_like.dtype)
    else:
        dx, dk = _conv_cpu_grads(x, kernel, padding, dy)
    return (dx, dk) + grads


_conv_relu_norm.defvjp(_conv_relu_norm_fwd, _conv_relu_norm_bwd)


def conv_relu_norm(x, kernel, b, scale, beta, dtype=jnp.float32, out_dtype=jnp.float32):
    """One SAU-Net convolution layer on the 'cpu' path: the 3x3(x3) 'SAME' convolution of x
    and kernel (in `dtype`: float32, or bfloat16 on the CPU's bf16 units as `conv_bf16`),
    its bias b, ReLU and instance norm (scale, beta) as `relu_norm`, returned in
    `out_dtype`. With the native kernels one custom VJP whose convolution gradients take
    the norm's gradient in the convolution's dtype (bf16: written directly, and the input
    gradient comes back in x's dtype); else the layer composed of `conv_fn` and jax.numpy."""
    nd = x.ndim - 2
    padding = tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:nd])
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    if not bf16:  # as nn.Conv: the operands in the compute dtype
        x, kernel, b = x.astype(dtype), kernel.astype(dtype), b.astype(dtype)
    if not (native.relu_norm_available() and (bf16 or jnp.dtype(dtype) == jnp.float32)
            and jnp.dtype(out_dtype) in _NATIVE_OUT):
        y = conv_fn("cpu", kernel.shape[:nd], dtype)(x, kernel, (1,) * nd, padding)
        return _relu_norm_jnp(y, b, scale, beta, out_dtype)[0]
    # float32 operands inside the custom VJP (astype's own VJP gives the gradients the
    # parameters' dtypes).
    kernel, b, scale, beta = (v.astype(jnp.float32) for v in (kernel, b, scale, beta))
    return _conv_relu_norm(x, kernel, b, scale, beta, padding, bf16, jnp.dtype(out_dtype))


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **unused):
    """`lax.conv_general_dilated` for a 1x1(x1) kernel, channels last, stride 1: a matrix
    product over the channels (XLA:CPU runs the 3D one, and its gradient, as slow 3D
    convolutions)."""
    assert all(k == 1 for k in rhs.shape[:-2]) and feature_group_count == 1
    assert all(s == 1 for s in window_strides)
    return jnp.einsum("...c,co->...o", lhs, rhs.reshape(rhs.shape[-2:]), precision=precision)

def conv_fn(impl: str, kernel_size, dtype=jnp.float32):
    """The `conv_general_dilated` of an `nn.Conv` with this kernel size under `impl`; with
    dtype bfloat16 on the 'cpu' path, `conv_bf16_general` for the kernels larger than 1x1(x1)
    (the layer itself then computes in float32)."""
    if resolve_impl(impl) == "xla":
        return lax.conv_general_dilated
    if all(k == 1 for k in kernel_size):
        return pointwise_conv
    if jnp.dtype(dtype) == jnp.bfloat16:
        return conv_bf16_general
    return conv2d_cpu if len(kernel_size) == 2 else conv_z_as_batch


def max_pool2(x, impl):
    """2x max pooling, stride 2 (spatial sizes even). On the 'cpu' path a reshape + max,
    whose gradient is an elementwise mask instead of XLA:CPU's slow select-and-scatter;
    ties (equal values in a window) then share the gradient instead of the first taking it."""
    nd = x.ndim - 2
    if resolve_impl(impl) == "xla":
        return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + (2,) * nd + (1,),
                                 (1,) + (2,) * nd + (1,), "VALID")
    split = [x.shape[0]] + [v for s in x.shape[1:-1] for v in (s // 2, 2)] + [x.shape[-1]]
    return x.reshape(split).max(axis=tuple(range(2, 2 + 2 * nd, 2)))


def upsample2(x, kernel, impl, dtype=None):
    """2x upsampling by a 2x2(x2) stride-2 transposed convolution, as
    `nn.ConvTranspose(features, (2,)*ndim, strides 2, 'VALID')` without its bias: x
    (n, *spatial, in), kernel (2,)*ndim + (in, out). On the 'cpu' path one matrix product per
    pixel, out[2i + a] = x[i] @ kernel[1 - a], then depth-to-space; with dtype bfloat16 the
    products are a 1x1(x1) `conv_bf16` (the CPU's bf16 units, float32 result)."""
    nd = x.ndim - 2
    if resolve_impl(impl) == "xla":
        dn = lax.conv_dimension_numbers(x.shape, kernel.shape,
                                        ("NHWC", "HWIO", "NHWC") if nd == 2
                                        else ("NDHWC", "DHWIO", "NDHWC"))
        return lax.conv_transpose(x, kernel, (2,) * nd, "VALID", dimension_numbers=dn)
    if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16:
        w = _tap_matrix(kernel)
        y = conv_bf16(x, w.reshape((1,) * nd + w.shape), ((0, 0),) * nd)
        return _depth_to_space(y, kernel.shape[-1])
    return _upsample2_cpu(x, kernel)


def _tap_matrix(kernel):
    """(in, taps * out) of a (2,)*nd + (in, out) kernel, taps in flipped order, so that tap
    index a reads kernel[1 - a]."""
    nd = kernel.ndim - 2
    w = jnp.flip(kernel, tuple(range(nd))).reshape((-1,) + kernel.shape[-2:])
    return jnp.moveaxis(w, 0, 1).reshape(kernel.shape[-2], -1)


def _depth_to_space(y, features):
    """(n, *spatial, taps * features) -> (n, *(2 * spatial), features), tap a of pixel i at
    2i + a."""
    nd = y.ndim - 2
    y = y.reshape(y.shape[:-1] + (2,) * nd + (features,))
    # (n, s1, .., snd, a1, .., and, f) -> (n, s1, a1, .., snd, and, f)
    perm = [0] + [p for i in range(nd) for p in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
    return y.transpose(perm).reshape((y.shape[0],) + tuple(2 * s for s in y.shape[1:1 + nd])
                                     + (features,))


@jax.custom_vjp
def _upsample2_cpu(x, kernel):
    """`upsample2` on the 'cpu' path in float32. Its backward pass: dx[i] = sum_a g[2i + a]
    kernel[1 - a]^T, a stride-2 convolution of g, and dk[1 - a] = sum_i x[i]^T g[2i + a], one
    contraction per tap over a strided view of g; 2-3x faster on XLA:CPU than the transpose
    of the depth-to-space and the matrix products that autodiff gives."""
    return _depth_to_space(x @ _tap_matrix(kernel), kernel.shape[-1])


def _upsample2_cpu_bwd(res, g):
    x, kernel = res
    nd = x.ndim - 2
    flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(nd))), -1, -2)
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    dx = lax.conv_general_dilated(g, flipped, (2,) * nd, "VALID", dimension_numbers=dn)
    taps = [jnp.einsum("...c,...f->cf", x, g[(slice(None),) + tuple(slice(t, None, 2) for t in tap)])
            for tap in itertools.product(range(2), repeat=nd)]
    return dx, jnp.flip(jnp.stack(taps).reshape(kernel.shape), tuple(range(nd)))


_upsample2_cpu.defvjp(lambda x, kernel: (_upsample2_cpu(x, kernel), (x, kernel)), _upsample2_cpu_bwd)
