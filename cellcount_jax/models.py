"""SAU-Net: a U-Net with self-attention at the bottleneck, for 2D and 3D (Guo et al. 2022).

One module serves both ranks: the spatial rank follows the input, NHWC for 2D and NDHWC for
3D. The network holds parameters only (instance norm, no batch statistics), so `apply` is a
pure function of `(params, x)`, plus a `'dropout'` rng when attention dropout is on.

The encoder and the decoder are callable on their own (`SAUNet.encode`, `SAUNet.decode`) so
that a train step can perturb encoder features between them (the paper's student branch).

`impl` ('auto' | 'xla' | 'cpu') picks how convolutions, pooling and upsampling are computed
(`convolutions`); the parameters and the float32 values do not depend on it (in bfloat16,
'cpu' rounds only the operands of the convolutions, the upsampling's products and the
attention's projections, 'xla' the whole network).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cellcount_jax import convolutions
from cellcount_jax.errors import InputError

LEVELS = 4

def _norm(dtype, name=None):
    # eps as the reference implementation; scale and bias learned per channel. Statistics are
    # computed in float32 whatever the compute dtype.
    return nn.InstanceNorm(epsilon=convolutions.NORM_EPS, dtype=dtype, name=name)


class ConvParams(nn.Module):
    """The parameters of `nn.Conv(features, kernel_size)` (same names, shapes and initial
    values), for layers that compute the convolution themselves."""
    features: int
    kernel_size: Sequence[int]

    @nn.compact
    def __call__(self, in_features):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            tuple(self.kernel_size) + (in_features, self.features), jnp.float32)
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,),
                                  jnp.float32)


class NormParams(nn.Module):
    """The parameters of `nn.InstanceNorm` (scale, bias) for `features` channels."""

    @nn.compact
    def __call__(self, features):
        return (self.param("scale", nn.initializers.ones_init(), (features,), jnp.float32),
                self.param("bias", nn.initializers.zeros_init(), (features,), jnp.float32))


def check_spatial(shape: Sequence[int], ndim: int, multiple: int = 2 ** (LEVELS - 1)):
    """Raise a clear error unless `shape` = (batch, *spatial, channels) fits the network."""
    if len(shape) != ndim + 2:
        raise InputError(f"SAU-Net {ndim}D expects a (batch, {'z, ' if ndim == 3 else ''}y, x, "
                         f"channels) array, got shape {tuple(shape)}")
    bad = [s for s in shape[1:-1] if s % multiple]
    if bad:
        raise InputError(f"spatial sizes {tuple(shape[1:-1])} must be multiples of {multiple} "
                         f"(three 2x poolings); pad or crop the input")



def _cpu_bf16(impl, dtype) -> bool:
    """Whether `impl` runs the CPU formulation with `dtype` bfloat16."""
    return (dtype is not None and convolutions.resolve_impl(impl) == "cpu"
            and jnp.dtype(dtype) == jnp.bfloat16)


def _conv(features, kernel, impl, dtype, conv_dtype=None, name=None):
    """nn.Conv, 'SAME', computing in `dtype`, with the convolution of `impl` in `conv_dtype`
    (default `dtype`)."""
    return nn.Conv(features, kernel, padding="SAME", dtype=dtype, name=name,
                   conv_general_dilated=convolutions.conv_fn(impl, kernel, conv_dtype or dtype))


class UpConv(nn.Module):
    """2x upsampling: nn.ConvTranspose(features, (2,)*ndim, strides 2, 'VALID'), same
    parameters ('kernel' (2,)*ndim + (in, out), 'bias') and values (`convolutions.upsample2`;
    its products in `conv_dtype` on the 'cpu' path)."""
    features: int
    impl: str = "xla"
    dtype: Any = jnp.float32
    conv_dtype: Any = None

    @nn.compact
    def __call__(self, x, add_bias: bool = True):
        """The upsampled x, or (it without the bias, the bias) if not add_bias."""
        nd = x.ndim - 2
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (2,) * nd + (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = convolutions.upsample2(x, kernel, self.impl, self.conv_dtype)
        return y + bias if add_bias else (y, bias)

class Block(nn.Module):
    """Two times [3x3(x3) conv with bias, SAME -> ReLU -> InstanceNorm] (activation before norm);
    the convolutions compute in `conv_dtype` (default `dtype`). On the 'cpu' path each layer is
    one `convolutions.conv_relu_norm`, the first returning `conv_dtype` (what the second
    convolution reads), the second `dtype`."""
    features: int
    dtype: Any = jnp.float32
    impl: str = "xla"
    conv_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        k = (3,) * (x.ndim - 2)
        if convolutions.resolve_impl(self.impl) == "cpu":
            conv_dtype = self.conv_dtype or self.dtype
            for i, out_dtype in enumerate((conv_dtype, self.dtype)):
                kernel, bias = ConvParams(self.features, k, name=f"Conv_{i}")(x.shape[-1])
                scale, beta = NormParams(name=f"InstanceNorm_{i}")(self.features)
                x = convolutions.conv_relu_norm(x, kernel, bias, scale, beta, conv_dtype, out_dtype)
            return x
        for _ in range(2):
            conv = _conv(self.features, k, self.impl, self.dtype, self.conv_dtype)
            x = _norm(self.dtype)(nn.relu(conv(x)))
        return x


class SelfAttention(nn.Module):
    """Non-local block at full width, no 1/sqrt(d) scaling, residual output t + x.
    dense_bf16: the four projections on the CPU's bf16 units (`convolutions.dot_bf16`)."""
    dropout: float = 0.3
    dtype: Any = jnp.float32
    dense_bf16: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        b, c = x.shape[0], x.shape[-1]
        ndim = x.ndim - 2
        flat = lambda t: t.reshape(b, -1, c)
        dot = convolutions.dot_bf16 if self.dense_bf16 else None
        dense = lambda name, **kw: nn.Dense(c, dtype=self.dtype, dot_general=dot, name=name, **kw)
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
    conv_dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        ndim = x.ndim - 2
        check_spatial(x.shape, ndim)
        skips = []
        for level in range(LEVELS - 1):
            x = Block(self.features * 2 ** level, self.dtype, self.impl, self.conv_dtype,
                      name=f"down{level}")(x)
            skips.append(x)
            x = convolutions.max_pool2(x, self.impl)
        x = Block(self.features * 2 ** (LEVELS - 1), self.dtype, self.impl, self.conv_dtype,
                  name="bottom")(x)
        x = SelfAttention(self.dropout, self.dtype, _cpu_bf16(self.impl, self.conv_dtype),
                          name="attention")(x, train)
        return tuple(skips) + (x,)


class Decoder(nn.Module):
    features: int = 32
    dtype: Any = jnp.float32
    impl: str = "xla"
    conv_dtype: Any = None

    @nn.compact
    def __call__(self, feats):
        *skips, x = feats
        ndim = x.ndim - 2
        for level in reversed(range(LEVELS - 1)):
            f = self.features * 2 ** level
            up = UpConv(f, self.impl, self.dtype, self.conv_dtype, name=f"up{level}")
            if convolutions.resolve_impl(self.impl) == "cpu":
                y, bias = up(x, add_bias=False)
                scale, beta = NormParams(name=f"up_norm{level}")(f)
                x = convolutions.relu_norm(y, bias, scale, beta, self.dtype)
            else:
                x = _norm(self.dtype, f"up_norm{level}")(nn.relu(up(x)))
            x = Block(f, self.dtype, self.impl, self.conv_dtype, name=f"dec{level}")(
                jnp.concatenate([skips[level], x], axis=-1))
        y = _conv(1, (1,) * ndim, self.impl, self.dtype, name="head")(x)
        return nn.relu(y)[..., 0].astype(jnp.float32)


class SAUNet(nn.Module):
    """SAU-Net with `features` channels at the first level (f, 2f, 4f, 8f over 4 levels).

    `__call__(x, train)`: x (batch, [z,] y, x, channels) -> density (batch, [z,] y, x), >= 0.
    Spatial sizes must be multiples of 8. dtype: the compute dtype (e.g. bfloat16 on
    accelerators); parameters stay float32, norms and softmax compute in float32, the
    density comes back as float32. On the 'cpu' path bfloat16 applies to the matrix products
    that run on the CPU's bf16 units: the 3x3(x3) convolutions (`convolutions.conv_relu_norm`:
    their operands, and the gradients they take and give back, in bf16), the upsampling's
    products and the attention's four projections (`convolutions.conv_bf16`, 1x1(x1)); the
    rest computes in float32, as XLA:CPU runs its other bf16 operations in float32 with extra
    conversions.
    impl: 'xla' | 'cpu' | 'auto', see the module docstring; parameters do not depend on it.
    """
    features: int = 32
    dropout: float = 0.3
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        dtype = jnp.float32 if _cpu_bf16(self.impl, self.dtype) else self.dtype
        self.encoder = Encoder(self.features, self.dropout, dtype, self.impl, self.dtype)
        self.decoder = Decoder(self.features, dtype, self.impl, self.dtype)

    def encode(self, x, train: bool = False):
        """Returns (skip0, skip1, skip2, bottleneck): the features a student branch perturbs."""
        return self.encoder(x, train)

    def decode(self, feats):
        return self.decoder(feats)

    def __call__(self, x, train: bool = False):
        return self.decode(self.encode(x, train))


def init_params(model: SAUNet, rng, input_shape: Sequence[int]):
    """Parameters for inputs of `input_shape` (batch, *spatial, channels); batch may be 1."""
    # No parameter depends on the spatial size: initialise on the smallest input the network
    # takes (2^(LEVELS-1) per axis), as one compiled program, not op by op on a full crop.
    # XLA:CPU spends seconds optimising the unrolled random number generation of ~80
    # initialisers (5-9 s for the 2D and 3D networks); unoptimised it compiles in about 1.5 s
    # and runs in a fraction of a second, giving the same values to float32 rounding.
    shape = (1,) + (2 ** (LEVELS - 1),) * (len(input_shape) - 2) + tuple(input_shape[-1:])
    init = jax.jit(lambda r: model.init(r, jnp.zeros(shape, jnp.float32))["params"])
    options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
               if jax.default_backend() == "cpu" else None)
    return init.lower(rng).compile(compiler_options=options)(rng)


def count_params(params) -> int:
    return sum(p.size for p in jax.tree_util.tree_leaves(params))
