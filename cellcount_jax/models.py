"""SAU-Net: a U-Net with self-attention at the bottleneck, for 2D and 3D (Guo et al. 2022).

One module serves both ranks: the spatial rank follows the input, NHWC for 2D and NDHWC for
3D. The network holds parameters only (instance norm, no batch statistics), so `apply` is a
pure function of `(params, x)`, plus a `'dropout'` rng when attention dropout is on.

The encoder and the decoder are callable on their own (`SAUNet.encode`, `SAUNet.decode`) so
that a train step can perturb encoder features between them (the paper's student branch).

`impl` picks how the convolutions are expressed, with the same parameters and the same values:
- 'xla': `lax` convolutions as written (3D kernels, transposed convolutions), what XLA's
  GPU/TPU backends optimise best;
- 'cpu': the 3x3(x3) convolutions through custom VJPs (`conv2d`, `conv3d_folded`) that call
  the native AVX-512 kernels of `native` (forward and input gradient on rows >= 32 wide,
  kernel gradient everywhere) where they run, and otherwise XLA formulations that suit
  XLA:CPU: a 3D convolution as one 2D convolution (z folded into the batch, the z taps into
  the channels) and a kernel gradient whose operands swap roles where that moves less data;
  2x2 max pooling as a reshape + max, a 2x2(x2) stride-2 transposed convolution as one matrix
  product + depth-to-space, the 1x1(x1) output convolution as a matrix product, and
  `compiler_options(impl)` for every jit of the model, which routes XLA:CPU's remaining
  convolutions to its Eigen kernels instead of the YNNPACK fusions. 2.5-7x faster training
  on CPU than 'xla'; see the README's Performance section.
- 'auto': 'cpu' on the CPU backend, 'xla' elsewhere (`resolve_impl`).
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cellcount_jax import native

LEVELS = 4
IMPLS = ("auto", "xla", "cpu")
# XLA:CPU library fusions kept on the 'cpu' path: YNNPACK for reductions only (not for
# convolutions or dots, where XLA's own Eigen kernels are faster on this network).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def resolve_impl(impl: str) -> str:
    """'auto' -> 'cpu' on the CPU backend, 'xla' on GPU/TPU; 'xla' and 'cpu' stay."""
    if impl not in IMPLS:
        raise ValueError(f"config.model.impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def compiler_options(impl: str):
    """XLA compiler options for jitting a model of this impl (None: XLA's defaults)."""
    options = _cpu_options() if resolve_impl(impl) == "cpu" else None
    return dict(options) if options else None


@functools.cache
def _cpu_options():
    # XLA versions without YNNPACK fusions do not know the option (and need none).
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(1.0).compile()
    except (RuntimeError, ValueError):
        return None
    return _CPU_OPTIONS


def jit(fn, impl: str, **kwargs):
    """`jax.jit` with the model's compiler options."""
    return jax.jit(fn, compiler_options=compiler_options(impl), **kwargs)


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
    fast = lambda x, g: native.conv_kernel_grad(x, g, kernel_shape[:nd], [lo for lo, _ in padding])
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


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **unused):
    """`lax.conv_general_dilated` for a 1x1(x1) kernel, channels last, stride 1: a matrix
    product over the channels (XLA:CPU runs the 3D one, and its gradient, as slow 3D
    convolutions)."""
    assert all(k == 1 for k in rhs.shape[:-2]) and feature_group_count == 1
    assert all(s == 1 for s in window_strides)
    return jnp.einsum("...c,co->...o", lhs, rhs.reshape(rhs.shape[-2:]), precision=precision)


def _norm(dtype, name=None):
    # eps as the reference implementation; scale and bias learned per channel. Statistics are
    # computed in float32 whatever the compute dtype.
    return nn.InstanceNorm(epsilon=1e-6, dtype=dtype, name=name)


def check_spatial(shape: Sequence[int], ndim: int, multiple: int = 2 ** (LEVELS - 1)):
    """Raise a clear error unless `shape` = (batch, *spatial, channels) fits the network."""
    if len(shape) != ndim + 2:
        raise ValueError(f"SAU-Net {ndim}D expects a (batch, {'z, ' if ndim == 3 else ''}y, x, "
                         f"channels) array, got shape {tuple(shape)}")
    bad = [s for s in shape[1:-1] if s % multiple]
    if bad:
        raise ValueError(f"spatial sizes {tuple(shape[1:-1])} must be multiples of {multiple} "
                         f"(three 2x poolings); pad or crop the input")


def _conv(features, kernel, impl, dtype, name=None):
    """nn.Conv, 'SAME'; on the 'cpu' path through `conv2d` (a 3D kernel z-folded)."""
    if resolve_impl(impl) == "xla":
        conv = lax.conv_general_dilated
    else:
        conv = conv2d_cpu if len(kernel) == 2 else conv_z_as_batch
    return nn.Conv(features, kernel, padding="SAME", dtype=dtype, name=name,
                   conv_general_dilated=conv)


def max_pool2(x, impl):
    """2x max pooling, stride 2 (spatial sizes even). On the 'cpu' path a reshape + max,
    whose gradient is an elementwise mask instead of XLA:CPU's slow select-and-scatter;
    ties (equal values in a window) then share the gradient instead of the first taking it."""
    nd = x.ndim - 2
    if resolve_impl(impl) == "xla":
        return nn.max_pool(x, (2,) * nd, strides=(2,) * nd)
    split = [x.shape[0]] + [v for s in x.shape[1:-1] for v in (s // 2, 2)] + [x.shape[-1]]
    return x.reshape(split).max(axis=tuple(range(2, 2 + 2 * nd, 2)))


class UpConv(nn.Module):
    """2x upsampling: nn.ConvTranspose(features, (2,)*ndim, strides 2, 'VALID'), same
    parameters ('kernel' (2,)*ndim + (in, out), 'bias') and values; on the 'cpu' path one
    matrix product per pixel, out[2i + a] = x[i] @ kernel[1 - a], then depth-to-space."""
    features: int
    impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        nd = x.ndim - 2
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (2,) * nd + (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if resolve_impl(self.impl) == "xla":
            dn = lax.conv_dimension_numbers(x.shape, kernel.shape,
                                            ("NHWC", "HWIO", "NHWC") if nd == 2
                                            else ("NDHWC", "DHWIO", "NDHWC"))
            y = lax.conv_transpose(x, kernel, (2,) * nd, "VALID", dimension_numbers=dn)
            return y + bias
        # (in, taps * out) with taps in flipped order, so tap index a reads kernel[1 - a].
        w = jnp.flip(kernel, tuple(range(nd))).reshape(-1, x.shape[-1], self.features)
        w = jnp.moveaxis(w, 0, 1).reshape(x.shape[-1], -1)
        y = (x @ w).reshape(x.shape[:-1] + (2,) * nd + (self.features,))
        # (n, s1, .., snd, a1, .., and, f) -> (n, s1, a1, .., snd, and, f)
        perm = [0] + [p for i in range(nd) for p in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
        y = y.transpose(perm).reshape((x.shape[0],) + tuple(2 * s for s in x.shape[1:-1])
                                      + (self.features,))
        return y + bias


class Block(nn.Module):
    """Two times [3x3(x3) conv with bias, SAME -> ReLU -> InstanceNorm] (activation before norm)."""
    features: int
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        k = (3,) * (x.ndim - 2)
        for _ in range(2):
            x = _norm(self.dtype)(nn.relu(_conv(self.features, k, self.impl, self.dtype)(x)))
        return x


class SelfAttention(nn.Module):
    """Non-local block at full width, no 1/sqrt(d) scaling, residual output t + x."""
    dropout: float = 0.3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        b, c = x.shape[0], x.shape[-1]
        ndim = x.ndim - 2
        flat = lambda t: t.reshape(b, -1, c)
        dense = lambda name, **kw: nn.Dense(c, dtype=self.dtype, name=name, **kw)
        theta = flat(dense("theta")(x))
        phi = flat(dense("phi")(x))
        g = flat(dense("g")(x))
        logits = jnp.einsum("bqc,bkc->bqk", theta, phi).astype(jnp.float32)
        a = jax.nn.softmax(logits, axis=-1).astype(g.dtype)
        a = nn.Dropout(self.dropout, deterministic=not train)(a)
        t = jnp.einsum("bqk,bkc->bqc", a, g).reshape(x.shape)
        # The reference uses a bias on this projection in 3D only.
        t = dense("out", use_bias=(ndim == 3))(t)
        return x + _norm(self.dtype, "out_norm")(nn.relu(t))


class Encoder(nn.Module):
    features: int = 32
    dropout: float = 0.3
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        ndim = x.ndim - 2
        check_spatial(x.shape, ndim)
        skips = []
        for level in range(LEVELS - 1):
            x = Block(self.features * 2 ** level, self.dtype, self.impl, name=f"down{level}")(x)
            skips.append(x)
            x = max_pool2(x, self.impl)
        x = Block(self.features * 2 ** (LEVELS - 1), self.dtype, self.impl, name="bottom")(x)
        x = SelfAttention(self.dropout, self.dtype, name="attention")(x, train)
        return tuple(skips) + (x,)


class Decoder(nn.Module):
    features: int = 32
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, feats):
        *skips, x = feats
        ndim = x.ndim - 2
        for level in reversed(range(LEVELS - 1)):
            f = self.features * 2 ** level
            x = UpConv(f, self.impl, self.dtype, name=f"up{level}")(x)
            x = _norm(self.dtype, f"up_norm{level}")(nn.relu(x))
            x = Block(f, self.dtype, self.impl, name=f"dec{level}")(
                jnp.concatenate([skips[level], x], axis=-1))
        conv = lax.conv_general_dilated if resolve_impl(self.impl) == "xla" else pointwise_conv
        y = nn.Conv(1, (1,) * ndim, dtype=self.dtype, name="head", conv_general_dilated=conv)(x)
        return nn.relu(y)[..., 0].astype(jnp.float32)


class SAUNet(nn.Module):
    """SAU-Net with `features` channels at the first level (f, 2f, 4f, 8f over 4 levels).

    `__call__(x, train)`: x (batch, [z,] y, x, channels) -> density (batch, [z,] y, x), >= 0.
    Spatial sizes must be multiples of 8. dtype: the compute dtype (e.g. bfloat16 on
    accelerators); parameters stay float32, norms and softmax compute in float32, the
    density comes back as float32. impl: 'xla' | 'cpu' | 'auto', see the module docstring;
    parameters do not depend on it.
    """
    features: int = 32
    dropout: float = 0.3
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        self.encoder = Encoder(self.features, self.dropout, self.dtype, self.impl)
        self.decoder = Decoder(self.features, self.dtype, self.impl)

    def encode(self, x, train: bool = False):
        """Returns (skip0, skip1, skip2, bottleneck): the features a student branch perturbs."""
        return self.encoder(x, train)

    def decode(self, feats):
        return self.decoder(feats)

    def __call__(self, x, train: bool = False):
        return self.decode(self.encode(x, train))


def init_params(model: SAUNet, rng, input_shape: Sequence[int]):
    """Parameters for inputs of `input_shape` (batch, *spatial, channels); batch may be 1."""
    shape = (1,) + tuple(input_shape[1:])
    return model.init(rng, jnp.zeros(shape, jnp.float32))["params"]


def count_params(params) -> int:
    return sum(p.size for p in jax.tree_util.tree_leaves(params))
