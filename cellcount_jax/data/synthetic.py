"""Synthetic fluorescence cells with known centroids, 2D and 3D (in the spirit of SIMCEP).

SIMCEP is the simulator behind the VGG cells benchmark. This generator follows its recipe:
elliptic (ellipsoidal) cells of random size and orientation with a textured interior, placed
partly in clusters where cells really overlap, optical blur, an uneven background and
shot + read noise. Everything is drawn from `numpy.random.default_rng(seed)`, so a seed gives
the same image on every machine.
"""
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage


def _rotation(rng, ndim):
    if ndim == 2:
        a = rng.uniform(0, np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _centres(rng, shape, spacing, n, radius, cluster_frac, min_dist):
    """n centre positions (pixels); a fraction of them in clusters around seed cells."""
    extent = (np.asarray(shape) - 1) * spacing  # centres stay on the pixel grid [0, n - 1]
    margin = 0.5 * radius
    pts = []
    attempts = 0
    while len(pts) < n and attempts < 100 * n:
        attempts += 1
        if pts and rng.uniform() < cluster_frac:
            # Next to an existing cell: overlapping neighbours, as in clumped cells.
            d = rng.normal(size=len(shape))
            p = pts[rng.integers(len(pts))] + d / np.linalg.norm(d) * radius * rng.uniform(0.9, 1.6)
        else:
            p = rng.uniform(margin, extent - margin)
        if np.any(p < 0) or np.any(p > extent):
            continue
        if pts and np.min(np.linalg.norm(np.asarray(pts) - p, axis=1)) < min_dist * radius:
            continue
        pts.append(p)
    return np.asarray(pts).reshape(-1, len(shape)) / spacing


def synthetic_image(seed: int, shape: Sequence[int] = (128, 128), num_cells=(40, 120),
                    radius: float = 5.0, spacing: Optional[Sequence[float]] = None,
                    channels: int = 3, cluster_frac: float = 0.35, min_dist: float = 0.9,
                    blur: float = 1.0, noise: float = 0.03):
    """One synthetic image and its cell centroids.

    shape: spatial shape, (y, x) or (z, y, x); num_cells: (low, high) range drawn uniformly;
    radius: mean cell radius in physical units; spacing: physical size of a pixel per axis
    (e.g. (2, 1, 1) for light-sheet z steps twice the pixel size); channels: 3 gives an
    RGB-like image with the signal mostly in blue, as in the VGG set.

    Returns image (*shape, channels) float32 in [0, 1] and dots (n, ndim) float32 centroids in
    pixel coordinates.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, float)
    n = int(rng.integers(num_cells[0], num_cells[1] + 1))
    centres = _centres(rng, shape, spacing, n, radius, cluster_frac, min_dist)

    grid_noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    texture = 1.0 + 0.35 * grid_noise / (grid_noise.std() + 1e-9)
    cells = np.zeros(shape)
    for c in centres:
        axes = radius * rng.uniform(0.75, 1.3, ndim)
        rot = _rotation(rng, ndim)
        brightness = rng.uniform(0.45, 1.0)
        lo = np.maximum(np.floor(c - axes.max() / spacing - 2).astype(int), 0)
        hi = np.minimum(np.ceil(c + axes.max() / spacing + 3).astype(int), shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        coords = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        local = ((coords - c) * spacing) @ rot / axes
        q = np.sum(local ** 2, -1)
        # Smooth-edged body, brighter towards the centre, as a fluorescent nucleus.
        body = 1.0 / (1.0 + np.exp((q - 1.0) * 8.0)) * (1.0 - 0.3 * np.minimum(q, 1.0))
        cells[box] += brightness * body * texture[box]

    cells = ndimage.gaussian_filter(cells, blur / spacing)
    # Uneven illumination: a slow tilt plus a broad bright patch.
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    tilt = sum(rng.uniform(-1, 1) * g for g in grids)
    centre = rng.uniform(-1, 1, ndim)
    patch = np.exp(-sum((g - m) ** 2 for g, m in zip(grids, centre)) / 0.5)
    background = 0.08 + 0.03 * tilt + 0.08 * patch

    signal = np.clip(cells + background, 0, None)
    photons = 200.0
    signal = rng.poisson(signal * photons) / photons + rng.normal(0, noise, shape)
    signal = np.clip(signal, 0, 1)
    if channels == 1:
        image = signal[..., None]
    else:
        # Most of the signal in the last (blue) channel, faint crosstalk in the others.
        mix = np.array([0.08] * (channels - 1) + [1.0])
        image = signal[..., None] * mix + rng.normal(0, noise / 2, shape + (channels,))
    return np.clip(image, 0, 1).astype(np.float32), centres.astype(np.float32)


def synthetic_set(seed: int, count: int, keep=None, **kwargs):
    """`count` images from seeds derived from `seed`: lists of images and of dot arrays.
    keep: None, or per image whether to make it (None in both lists where not)."""
    keep = [True] * count if keep is None else keep
    pairs = [synthetic_image(int(s), **kwargs) if k else (None, None)
             for s, k in zip(np.random.SeedSequence(seed).generate_state(count), keep)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
