"""Losses as pure functions, chosen by name in the config.

Supervised losses: `fn(pred, target, **options) -> scalar`, both (batch, *spatial), with the
keyword options of config.loss.supervised_options. A loss that takes `mask=` and `axis_name=`
is always given the device axis name, and where the labeled images have regions of interest
(or a held-out calibration band) a 0/1 `mask` of the same shape: the loss must then ignore
the pixels where it is 0.
Consistency losses: `fn(student, teacher, *, axis_name=None, **options) -> scalar`, both
(batch, *spatial); the teacher output is already under `stop_gradient`. Under `pmap` or
`shard_map` the step passes the device `axis_name`: a loss whose normaliser is not a fixed
fraction of the batch (such as a count of pixels) must `psum` it over that axis, so that
several devices give the same update as one.

`get(name, kind)` resolves a name: one of the losses this module declares for that kind
(SUPERVISED: `'mse'`, `'peak_weighted_mse'`; CONSISTENCY: `'focal_consistency'`,
`'consistency_mse'`), or `'package.module:function'` for a function defined anywhere else.
"""
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from cellcount_jax.errors import InputError


def masked_mean(x, mask=None, axis_name=None):
    """The mean of x over its pixels, or over the pixels where `mask` is 1 in the global
    batch (the count psummed over `axis_name`): what a supervised loss given `mask=` returns."""
    if mask is None:
        return jnp.mean(x)
    count = jnp.sum(mask)
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name) / jax.lax.psum(1, axis_name)
    return jnp.sum(mask * x) / jnp.maximum(count, 1.0)


def mse(pred, target, *, mask=None, axis_name=None):
    """Pixel mean squared error against the (already scaled) target map; with a `mask`, the
    mean over the masked pixels of the global batch."""
    return masked_mean((pred - target) ** 2, mask, axis_name)


def peak_weighted_mse(pred, target, *, mask=None, axis_name=None, weight: float = 10.0,
                      power: float = 2.0):
    """`mse` with each pixel's squared error weighted by 1 + weight * (target / peak)^power,
    where peak is the largest target value of the global batch (a dot's value): the few
    pixels at and around each dot, where touching cells are told apart, count as much as the
    slowly varying background between cells. weight 0 is `mse`. Select it with
    config.loss.supervised='peak_weighted_mse' and its options in
    config.loss.supervised_options."""
    peak = jnp.max(target)
    if axis_name is not None:
        peak = jax.lax.pmax(peak, axis_name)
    w = 1.0 + weight * (target / jnp.maximum(peak, 1e-12)) ** power
    return masked_mean(w * (pred - target) ** 2, mask, axis_name)


def _max_filter_3(x):
    """3x3 (3x3x3) maximum filter over the spatial axes of (batch, *spatial), edges padded -inf."""
    window = (1,) + (3,) * (x.ndim - 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, (1,) * x.ndim, "SAME")


def _gaussian_blur(x, size: int = 5, sigma: float = 1.0):
    """Zero-padded 'SAME' convolution with a normalised size^ndim Gaussian, separably."""
    w = np.exp(-0.5 * (np.arange(size) - size // 2) ** 2 / sigma ** 2)
    w = jnp.asarray(w / w.sum(), x.dtype)
    for axis in range(1, x.ndim):
        x = jnp.moveaxis(x, axis, -1)
        shape = x.shape
        y = jax.vmap(lambda r: jnp.convolve(r, w, mode="same"))(x.reshape(-1, shape[-1]))
        x = jnp.moveaxis(y.reshape(shape), -1, axis)
    return x


def focal_weight(teacher, peaks: str = "reference", threshold: float = 0.0):
    """Focal weights around the teacher's local maxima (the paper's focal consistency).

    peaks: 'reference' marks every pixel equal to its 3x3(x3) neighbourhood maximum, so flat
    zero background also counts (the reference implementation's behaviour); 'strict' also
    requires teacher > threshold (the paper's text: weights concentrate on cells).
    The peak map is blurred with a normalised 5-tap Gaussian of sigma 1 per axis.
    """
    is_peak = _max_filter_3(teacher) == teacher
    if peaks == "strict":
        is_peak &= teacher > threshold
    elif peaks != "reference":
        raise InputError(f"config.loss.peaks must be 'reference' or 'strict', got {peaks!r}")
    return jax.lax.stop_gradient(_gaussian_blur(is_peak.astype(teacher.dtype)))


def focal_consistency(student, teacher, *, axis_name=None, peaks: str = "reference",
                      threshold: float = 0.0):
    """sum(w (S - T)^2) / count(w != 0) with w = focal_weight(T) (the reference's reduction)."""
    w = focal_weight(teacher, peaks, threshold)
    count = jnp.sum(w != 0).astype(student.dtype)
    if axis_name is not None:
        # The normaliser of the global batch; the step averages gradients over devices.
        count = jax.lax.psum(count, axis_name) / jax.lax.psum(1, axis_name)
    return jnp.sum(w * (student - teacher) ** 2) / jnp.maximum(count, 1.0)


def consistency_mse(student, teacher, *, axis_name=None):
    """Plain mean squared consistency (no focal weighting), for ablations."""
    return jnp.mean((student - teacher) ** 2)


def takes_mask(fn) -> bool:
    """Whether a supervised loss accepts `mask=` (and `axis_name=`)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in params) or {"mask", "axis_name"} <= {
        p.name for p in params}


SUPERVISED = {"mse": mse, "peak_weighted_mse": peak_weighted_mse}
CONSISTENCY = {"focal_consistency": focal_consistency, "consistency_mse": consistency_mse}


def get(name: str, kind: str = None):
    """The loss called `name` (see the module docstring); kind: 'supervised' or
    'consistency' (None: either) names the declared losses it may be."""
    if ":" in name:
        module, fn = name.split(":", 1)
        try:
            loss = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise InputError(f"cannot import loss {name!r}: {e}") from e
        if not callable(loss):
            raise InputError(f"loss {name!r} is not a function")
        return loss
    declared = {"supervised": SUPERVISED, "consistency": CONSISTENCY,
                None: {**SUPERVISED, **CONSISTENCY}}[kind]
    if name not in declared:
        raise InputError(f"unknown {kind + ' ' if kind else ''}loss {name!r}; one of "
                         f"{sorted(declared)}, or 'package.module:function'")
    return declared[name]
