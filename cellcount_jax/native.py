"""Native CPU kernels (convolutions, bias + ReLU + instance norm), called from jitted code
through XLA's FFI.

`conv` (a stride-1 convolution, also the input gradient of one) and `conv_kernel_grad` (its
kernel gradient), register-blocked AVX-512 loops over channels-last arrays (`csrc/conv.cc`):
XLA:CPU runs the kernel gradient at a fifth of the matmul peak, and 3D convolutions or
32-64-channel ones at full resolution well below it. The library
is compiled when the package is installed (`setup.py`, optional: an install without a C++
compiler still works) and is used only where it can run: the CPU backend, an x86-64 CPU with
AVX-512 (F and BW), float32 operands, output channels a multiple of 16. Everywhere else `available`
says no and the model keeps its XLA formulation. `CELLCOUNT_JAX_NATIVE=0` switches it off.

`relu_norm` and `relu_norm_grad` (`csrc/norm.cc`): a convolution's bias, ReLU and instance
norm in two reads of the array each way, a group of images at a time (XLA:CPU makes 6-10
passes of them, with slow float32 -> bfloat16 conversions), the output and the gradient
written in float32 or bfloat16; in the same library, on the same CPUs.

`conv_bf16` and `conv_kernel_grad_bf16`: the same two for bfloat16 operands (float32
accumulation and results) through oneDNN (`csrc/dnnl_conv.cc`, the
onednn-cpu-gomp wheel), used where `bf16_units` names the CPU's bf16 matrix units (AMX-BF16,
AVX512-BF16; oneDNN picks its kernels for them at run time).
"""
import ctypes
import functools
import glob
import importlib.util
import os
import sys
import warnings

import jax
import numpy as np

KERNEL_GRAD_TARGET = "cellcount_conv_kernel_grad"
CONV_TARGET = "cellcount_conv"
RELU_NORM_TARGET = "cellcount_relu_norm"
RELU_NORM_GRAD_TARGET = "cellcount_relu_norm_grad"
BF16_CONV_TARGET = "cellcount_dnnl_conv"
BF16_KERNEL_GRAD_TARGET = "cellcount_dnnl_conv_kernel_grad"
BF16_UNITS = {0: None, 1: "avx512_bf16", 2: "amx_bf16"}


def _origin(module: str):
    """The file of a compiled extension of the package, or None (not built: the XLA
    formulation, silently; or switched off by CELLCOUNT_JAX_NATIVE=0)."""
    if os.environ.get("CELLCOUNT_JAX_NATIVE", "1") == "0":
        return None
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None and spec.origin else None


def _unusable(path: str, error: Exception):
    """None, with one warning that names why a built library cannot be used."""
    warnings.warn(f"cellcount_jax: the native CPU kernels in {os.path.basename(path)} are not "
                  f"used ({type(error).__name__}: {error}); the network runs in its XLA "
                  f"formulation (as with model.impl=xla). Reinstalling the package under this "
                  f"jaxlib builds them again.", RuntimeWarning, stacklevel=3)
    return None


def _check_jaxlib(lib):
    """Raises ImportError unless `lib` was compiled against the FFI of the running jaxlib."""
    import jaxlib
    lib.cc_jaxlib_version.restype = ctypes.c_char_p
    built = lib.cc_jaxlib_version().decode()
    if built != jaxlib.__version__:
        raise ImportError(f"built against jaxlib {built}, running under jaxlib "
                          f"{jaxlib.__version__}")


def _register(lib, targets):
    for name, symbol in targets:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")


@functools.cache
def _library():
    """The loaded library with its FFI targets registered, or None (not built, switched off,
    no AVX-512 here, or unusable: then with one warning)."""
    path = _origin("cellcount_jax._native")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        _check_jaxlib(lib)
        if not lib.cc_native_supported():
            return None
        _register(lib, [(KERNEL_GRAD_TARGET, "CcConvKernelGrad"), (CONV_TARGET, "CcConv"),
                        (RELU_NORM_TARGET, "CcReluNorm"),
                        (RELU_NORM_GRAD_TARGET, "CcReluNormGrad")])
    except Exception as e:  # noqa: BLE001 - any failure leaves the XLA formulation
        return _unusable(path, e)
    return lib


def available(dtype=np.float32, out_channels: int = 16) -> bool:
    """Whether `conv` and `conv_kernel_grad` run for these operands on this machine's CPU."""
    return (np.dtype(dtype) == np.float32 and out_channels % 16 == 0
            and _library() is not None)


def _check():
    if _library() is None:
        raise RuntimeError("the native CPU kernels are not available here (see native.available)")


def conv(x, kernel, padding):
    """y[n, p, co] = sum_{t, ci} x[n, p + t - lo, ci] kernel[t, ci, co], zero outside x.

    x: (n, *spatial, ci), kernel: (*kernel_spatial, ci, co), float32, 2D or 3D, channels
    last, stride 1; padding: ((lo, hi),) per spatial axis. Returns (n, *spatial_out, co),
    spatial_out = spatial + lo + hi - kernel_spatial + 1, as `lax.conv_general_dilated`.
    """
    _check()
    if any(p < 0 for pad in padding for p in pad):
        raise ValueError(f"native.conv: paddings must be >= 0, got {padding}")
    two_d = x.ndim == 4
    if two_d:
        x, kernel, padding = x[:, None], kernel[None], ((0, 0), *padding)
    out = [s + lo + hi - k + 1 for s, k, (lo, hi) in zip(x.shape[1:4], kernel.shape[:3], padding)]
    y = jax.ffi.ffi_call(CONV_TARGET, jax.ShapeDtypeStruct((x.shape[0], *out, kernel.shape[-1]),
                                                            np.float32),
                         vmap_method="sequential")(
        x, kernel, pz=np.int64(padding[0][0]), py=np.int64(padding[1][0]),
        px=np.int64(padding[2][0]))
    return y[:, 0] if two_d else y


def conv_kernel_grad(x, g, kernel_spatial, pad_lo):
    """dk[t, ci, co] = sum_{n, p} x[n, p + t - pad_lo, ci] * g[n, p, co], zero outside x.

    x: (n, *spatial_in, ci) and g: (n, *spatial_out, co), float32, 2D or 3D, channels last;
    kernel_spatial: the kernel's spatial shape; pad_lo: the low padding per spatial axis
    (the high padding is implied by the shapes). Returns (*kernel_spatial, ci, co), float32:
    the gradient of sum(g * conv(x, k, stride 1)) with respect to k.
    """
    _check()
    two_d = x.ndim == 4
    if two_d:  # as 3D with one plane
        x, g = x[:, None], g[:, None]
        kernel_spatial, pad_lo = (1, *kernel_spatial), (0, *pad_lo)
    kz, ky, kx = (int(k) for k in kernel_spatial)
    pz, py, px = (int(p) for p in pad_lo)
    out = jax.ShapeDtypeStruct((kz, ky, kx, x.shape[-1], g.shape[-1]), np.float32)
    dk = jax.ffi.ffi_call(KERNEL_GRAD_TARGET, out, vmap_method="sequential")(
        x, g, kz=np.int64(kz), ky=np.int64(ky), kx=np.int64(kx),
        pz=np.int64(pz), py=np.int64(py), px=np.int64(px))
    return dk[0] if two_d else dk


def relu_norm_available() -> bool:
    """Whether `relu_norm` and `relu_norm_grad` run on this machine's CPU."""
    return _library() is not None


def relu_norm(y, b, scale, beta, eps, out_dtype):
    """z = max(y + b, 0), normalised over the pixels of each image and channel: returns
    ((z - m) r scale + beta in `out_dtype` (float32 or bfloat16), stats (n, 2, c) = (m, r)),
    r = 1 / sqrt(var + eps). y: (n, *spatial, c) float32; b, scale, beta: (c,) float32."""
    _check()
    n, c = y.shape[0], y.shape[-1]
    return jax.ffi.ffi_call(RELU_NORM_TARGET,
                            (jax.ShapeDtypeStruct(y.shape, out_dtype),
                             jax.ShapeDtypeStruct((n, 2, c), np.float32)),
                            vmap_method="sequential")(y, b, scale, beta, eps=np.float32(eps))


def relu_norm_grad(y, b, scale, stats, g, dy_dtype):
    """The backward pass of `relu_norm` for the output gradient g (float32 or bfloat16):
    returns (dy in `dy_dtype`, sums (n, 3, c) = (sum g, sum g xhat, sum dy) over the pixels),
    whose sums over images are the gradients of beta, scale and b."""
    _check()
    n, c = y.shape[0], y.shape[-1]
    return jax.ffi.ffi_call(RELU_NORM_GRAD_TARGET,
                            (jax.ShapeDtypeStruct(y.shape, dy_dtype),
                             jax.ShapeDtypeStruct((n, 3, c), np.float32)),
                            vmap_method="sequential")(y, b, scale, stats, g)


@functools.cache
def _dnnl_library():
    """The oneDNN bf16 library (`csrc/dnnl_conv.cc`) with its FFI targets registered, or None:
    not built, oneDNN (the onednn-cpu-gomp wheel) not installed, or no bf16 units here."""
    path = _origin("cellcount_jax._dnnl")
    if path is None:
        return None
    # The onednn-cpu-gomp wheel puts libdnnl.so.3 in the environment's lib/, where the
    # library's dependency does not look. Loaded first (RTLD_LOCAL: its symbols stay out of
    # the process's global scope), it is the one that dependency resolves to, by its soname.
    dnnl = _libdnnl()
    try:
        if dnnl:
            ctypes.CDLL(dnnl, mode=ctypes.RTLD_LOCAL)
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            if dnnl is None:
                return None  # no oneDNN (the cpu-bf16 extra) installed
            raise
        _check_jaxlib(lib)
        if not lib.cc_dnnl_bf16_isa():
            return None
        _register(lib, [(BF16_CONV_TARGET, "CcDnnlConv"),
                        (BF16_KERNEL_GRAD_TARGET, "CcDnnlConvKernelGrad")])
    except Exception as e:  # noqa: BLE001 - any failure leaves the XLA formulation
        return _unusable(path, e)
    return lib


def _libdnnl():
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        dist = distribution("onednn-cpu-gomp")
        found = [dist.locate_file(f) for f in dist.files or () if str(f).endswith("libdnnl.so.3")]
    except PackageNotFoundError:
        found = glob.glob(os.path.join(sys.prefix, "lib", "libdnnl.so.3"))
    return str(found[0]) if found else None


def bf16_units():
    """The CPU's bfloat16 matrix units the bf16 convolutions use: 'amx_bf16',
    'avx512_bf16', or None (no such units, or oneDNN or its library missing)."""
    lib = _dnnl_library()
    return BF16_UNITS[lib.cc_dnnl_bf16_isa()] if lib else None


def bf16_available() -> bool:
    """Whether `conv_bf16` and `conv_kernel_grad_bf16` run on this machine's CPU."""
    return _dnnl_library() is not None


def _as_3d(x, kernel_spatial, padding):
    if x.ndim == 4:  # 2D as 3D with one plane
        return x[:, None], (1, *kernel_spatial), ((0, 0), *padding), True
    return x, tuple(kernel_spatial), tuple(padding), False


def conv_bf16(x, kernel, padding, out_dtype=np.float32):
    """`conv` of bfloat16 operands: x (n, *spatial, ci) and kernel (*kernel_spatial, ci, co)
    bf16, float32 accumulation, the result in out_dtype (float32 or bfloat16, rounded to
    nearest even) (oneDNN on the CPU's bf16 units)."""
    if _dnnl_library() is None:
        raise RuntimeError("the bf16 convolutions are not available here (native.bf16_units)")
    nd = x.ndim - 2
    x, ks, padding, two_d = _as_3d(x, kernel.shape[:nd], padding)
    kernel = kernel[None] if two_d else kernel
    out = [s + lo + hi - k + 1 for s, k, (lo, hi) in zip(x.shape[1:4], ks, padding)]
    y = jax.ffi.ffi_call(BF16_CONV_TARGET,
                         jax.ShapeDtypeStruct((x.shape[0], *out, kernel.shape[-1]), out_dtype),
                         vmap_method="sequential")(
        x, kernel, pz=np.int64(padding[0][0]), py=np.int64(padding[1][0]),
        px=np.int64(padding[2][0]))
    return y[:, 0] if two_d else y


def conv_kernel_grad_bf16(x, g, kernel_spatial, pad_lo):
    """`conv_kernel_grad` of bf16 x and g, float32 result (oneDNN, the CPU's bf16 units);
    the input must be at least as large as the kernel along every axis."""
    if _dnnl_library() is None:
        raise RuntimeError("the bf16 convolutions are not available here (native.bf16_units)")
    two_d = x.ndim == 4
    if two_d:
        x, g = x[:, None], g[:, None]
        kernel_spatial, pad_lo = (1, *kernel_spatial), (0, *pad_lo)
    if any(s < k for s, k in zip(x.shape[1:4], kernel_spatial)):
        raise ValueError(f"native.conv_kernel_grad_bf16: input {x.shape[1:4]} smaller than the "
                         f"kernel {tuple(kernel_spatial)} along an axis: oneDNN 3.2 gets 3D "
                         f"inputs with fewer planes than the kernel wrong")
    out = jax.ShapeDtypeStruct((*kernel_spatial, x.shape[-1], g.shape[-1]), np.float32)
    dk = jax.ffi.ffi_call(BF16_KERNEL_GRAD_TARGET, out, vmap_method="sequential")(
        x, g, pz=np.int64(pad_lo[0]), py=np.int64(pad_lo[1]), px=np.int64(pad_lo[2]))
    return dk[0] if two_d else dk
