"""Training targets from dot annotations: the inverse distance kernel and a Gaussian baseline.

All functions are jittable with static shapes: dots travel as a padded `(max_dots, ndim)`
array of pixel coordinates (`[z,] y, x`) plus the number of valid rows `num_dots`; rows past
`num_dots` are ignored. Coordinates are rounded to the nearest pixel and must lie inside the
image (the data loaders check this; inside jit nothing can be raised). Distances are physical:
pixel offsets times the per-axis `spacing`.
"""
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cellcount_jax.errors import InputError

# Squared distance standing for "no seed reached yet"; finite so that BIG + d^2 stays ordered.
_BIG = 1e20


def _spacing(spacing, ndim):
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (ndim,)))
    if min(spacing) <= 0:
        raise InputError(f"spacing must be positive, got {spacing}")
    return spacing


def rasterize(dots, num_dots, shape: Sequence[int]):
    """Counts of dots per pixel, int32 of `shape` (two dots on one pixel count 2)."""
    dots = jnp.asarray(dots)
    valid = jnp.arange(dots.shape[0]) < num_dots
    idx = jnp.floor(dots + 0.5).astype(jnp.int32)  # halves up, as postprocess.nearest_pixel
    # Padded rows are sent out of bounds and dropped (negative indices would wrap around).
    idx = jnp.where(valid[:, None], idx, jnp.asarray(shape, jnp.int32))
    return jnp.zeros(shape, jnp.int32).at[tuple(idx.T)].add(1, mode="drop")


def _nearest_along_last_axis(seeds, step):
    """Exact squared 1D distance to the nearest seed on each line of the last axis.

    Two sequential scans (last seed at or before x, first at or after) over all lines at once.
    """
    lines = seeds.reshape(-1, seeds.shape[-1]).T  # (n, lines)
    pos = jnp.arange(lines.shape[0], dtype=jnp.float32)

    def last_seed(carry, xs):
        p, row = xs
        carry = jnp.where(row, p, carry)
        return carry, carry

    start = jnp.full(lines.shape[1], jnp.inf, jnp.float32)
    _, before = jax.lax.scan(last_seed, -start, (pos, lines))
    _, after = jax.lax.scan(last_seed, start, (pos, lines), reverse=True)
    d = jnp.minimum(pos[:, None] - before, after - pos[:, None]) * step
    d = jnp.where(jnp.isfinite(d), d * d, _BIG)
    return d.T.reshape(seeds.shape)


def _min_plus_lines(f, step, bound):
    """D(x) = min_y f(y) + (step (x - y))^2 along axis 0 of f (n, lines), exactly where
    D <= bound (an upper bound of the final squared distances; elsewhere D may stay larger,
    which cannot change the final minimum).

    Offsets are visited in increasing |x - y| until the parabola term alone exceeds every
    current value or the bound: dense dots cost a few sweeps.
    """
    n = f.shape[0]
    pad = jnp.full((n,) + f.shape[1:], _BIG, f.dtype)
    padded = jnp.concatenate([pad, f, pad], axis=0)

    # Lines without any seed stay at _BIG whatever the offset: they do not keep the loop going.
    live = jnp.any(f < _BIG, axis=0)

    def cond(carry):
        delta, d = carry
        top = jnp.minimum(jnp.max(jnp.where(live, d, 0.0)), bound)
        return (delta < n) & ((step * delta) ** 2 < top)

    def body(carry):
        delta, d = carry
        cost = (step * delta) ** 2
        lo = jax.lax.dynamic_slice_in_dim(padded, n - delta, n, axis=0)
        hi = jax.lax.dynamic_slice_in_dim(padded, n + delta, n, axis=0)
        return delta + 1, jnp.minimum(d, jnp.minimum(lo, hi) + cost)

    return jax.lax.while_loop(cond, body, (jnp.int32(1), f))[1]


def _min_plus_along(f, axis, step, bound=_BIG, post=None, chunk_elements: int = 1 << 14):
    """One separable pass of the exact EDT along `axis`, in cache-sized groups of lines.

    Each group stops on its own, so sparse regions cost sweeps only where they are sparse,
    and memory stays O(size of f). `post` is applied to each group's result while it is
    still in cache (an elementwise function of the squared distance).
    """
    f = jnp.moveaxis(f, axis, 0)
    shape = f.shape
    n = shape[0]
    lines = f.reshape(n, -1)
    m = lines.shape[1]
    per = max(1, min(m, chunk_elements // n))
    groups = -(-m // per)
    # Extra lines are zeros: they end their group's loop at once and are dropped.
    lines = jnp.pad(lines, ((0, 0), (0, groups * per - m)))
    chunks = lines.reshape(n, groups, per).transpose(1, 0, 2)
    post = post or (lambda d: d)
    out = jax.lax.map(lambda c: post(_min_plus_lines(c, step, bound)), chunks)
    out = out.transpose(1, 0, 2).reshape(n, -1)[:, :m]
    return jnp.moveaxis(out.reshape(shape), 0, axis)


def distance_bound(dots, num_dots, shape, spacing, cell: int = 8, chunk: int = 1024):
    """An upper bound of the squared distance from any pixel to its nearest dot.

    Exact distances from the centres of cell^ndim blocks (brute force over the dots, in chunks
    so memory stays O(blocks x chunk)), plus the physical diagonal of a block.
    """
    spacing = jnp.asarray(_spacing(spacing, len(shape)), jnp.float32)
    axes = [np.minimum(np.arange(cell // 2, s + cell // 2, cell), s - 1) for s in shape]
    centres = jnp.asarray(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape)),
                          jnp.float32)
    dots = jnp.floor(jnp.asarray(dots, jnp.float32) + 0.5)
    valid = jnp.arange(dots.shape[0]) < num_dots
    chunk = min(chunk, dots.shape[0])
    pad = -dots.shape[0] % chunk
    dots = jnp.pad(dots, ((0, pad), (0, 0))).reshape(-1, chunk, len(shape))
    valid = jnp.pad(valid, (0, pad)).reshape(-1, chunk)

    c = centres * spacing
    c2 = jnp.sum(c * c, -1)

    def nearest(best, xs):
        d, v = xs
        d = d * spacing
        # |c - d|^2 = |c|^2 + |d|^2 - 2 c.d, as one matrix product per chunk.
        d2 = c2[:, None] + jnp.sum(d * d, -1)[None] - 2.0 * c @ d.T
        return jnp.minimum(best, jnp.min(jnp.where(v[None], d2, _BIG), 1)), None

    best, _ = jax.lax.scan(nearest, jnp.full(centres.shape[0], _BIG), (dots, valid))
    best = jnp.maximum(best, 0.0)
    # +1 absorbs float32 rounding of the expanded squares.
    diagonal = jnp.sqrt(jnp.sum((cell * spacing) ** 2)) + 1.0
    return (jnp.sqrt(jnp.max(best)) + diagonal) ** 2


def squared_distance(seeds, spacing: Optional[Sequence[float]] = None, bound=_BIG, post=None):
    """Exact squared Euclidean distance from each pixel to the nearest True pixel of `seeds`.

    The separable algorithm (1D distances along the last axis, then min-plus passes along the
    others) is exact; pixels of an image without seeds get 1e20. Same as
    `scipy.ndimage.distance_transform_edt(~seeds, sampling=spacing) ** 2`. `bound`, an upper
    bound of every squared distance (`distance_bound`), lets the passes stop earlier. `post`,
    an elementwise function, is applied to the result inside the last pass.
    """
    spacing = _spacing(spacing, seeds.ndim)
    d = _nearest_along_last_axis(seeds, spacing[-1])
    last = seeds.ndim - 2
    for axis in range(seeds.ndim - 1):
        d = _min_plus_along(d, axis, spacing[axis], bound, post if axis == last else None)
    return post(d) if post and seeds.ndim == 1 else d


def inverse_distance_kernel(distance, c: float = 1.0):
    """Paper Eq. 2: M = 1 / (L2^gamma + C), gamma = 0.02 L2 + 0.75, from distances L2 >= 0."""
    gamma = 0.02 * distance + 0.75
    # exp(gamma log L2) with log(0) = -inf gives 0^gamma = 0, i.e. M = 1 / C on a dot.
    return 1.0 / (jnp.exp(gamma * jnp.log(distance)) + c)


@functools.partial(jax.jit, static_argnames=("shape", "spacing", "cutoff"))
def inverse_distance(dots, num_dots, shape: Sequence[int], spacing=None, cutoff: float = 0.0):
    """Inverse distance kernel map M (paper Eq. 2) of `shape`, float32 in (0, 1].

    dots: (max_dots, ndim) pixel coordinates; num_dots: number of valid rows; spacing: physical
    size of a pixel per axis (distances L2 are physical); cutoff: values below it are set to 0
    (the FIDT reference uses 0.01; the paper's formula has none). No dots: all zeros.
    """
    seeds = rasterize(dots, num_dots, shape) > 0
    # In 2D the one min-plus pass stops early enough on its own; the bound pays off in 3D.
    bound = distance_bound(dots, num_dots, shape, spacing) if len(shape) > 2 else _BIG
    m = squared_distance(seeds, spacing, bound,
                         post=lambda d2: inverse_distance_kernel(jnp.sqrt(d2)))
    if cutoff > 0:
        m = jnp.where(m < cutoff, 0.0, m)
    return jnp.where(num_dots > 0, m, 0.0)


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0):
    """Normalised 1D Gaussian weights on [-r, r], r = int(truncate sigma + 0.5) (as scipy)."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _smooth_along(x, axis, sigma):
    n = x.shape[axis]
    w = gaussian_kernel_1d(sigma)
    r = len(w) // 2
    off = np.arange(n)[:, None] - np.arange(n)[None, :]
    band = np.where(np.abs(off) <= r, w[np.clip(off + r, 0, 2 * r)], 0.0).astype(np.float32)
    return jnp.moveaxis(jnp.tensordot(band, x, axes=([1], [axis])), 0, axis)


@functools.partial(jax.jit, static_argnames=("shape", "sigma", "spacing"))
def gaussian_density(dots, num_dots, shape: Sequence[int], sigma: float = 2.0, spacing=None):
    """Sum of normalised Gaussians of physical std `sigma` centred on the dots.

    Sums to the number of dots up to truncation at the image border. Equal to
    `scipy.ndimage.gaussian_filter(counts, sigma / spacing, mode='constant')`.
    """
    spacing = _spacing(spacing, len(shape))
    x = rasterize(dots, num_dots, shape).astype(jnp.float32)
    for axis, s in enumerate(spacing):
        x = _smooth_along(x, axis, sigma / s)
    return x


def make_target_fn(kind: str, shape: Sequence[int], scale: float = 1.0, spacing=None,
                   sigma: float = 2.0, cutoff: float = 0.0):
    """`fn(dots, num_dots) -> scale * map` for `kind` in {'inverse_distance', 'gaussian'}."""
    shape = tuple(int(s) for s in shape)
    spacing = _spacing(spacing, len(shape))
    if kind == "inverse_distance":
        return lambda d, n: scale * inverse_distance(d, n, shape, spacing, cutoff)
    if kind == "gaussian":
        return lambda d, n: scale * gaussian_density(d, n, shape, sigma, spacing)
    raise InputError(f"config.target.kind must be 'inverse_distance' or 'gaussian', got {kind!r}")
