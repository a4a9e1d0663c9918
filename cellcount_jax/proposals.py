"""Initial dots for the annotation tool, made the way the paper's labeling tool makes them:
Gaussian smoothing, Otsu's threshold, a morphological opening (3D volumes), connected
components of at least `min_size` pixels, one dot per component centroid. The user then only
corrects them.
"""
import numpy as np
from scipy import ndimage


def otsu_threshold(values, bins: int = 256) -> float:
    """Otsu's threshold of `values`: the bin centre of a `bins`-bin histogram over their range
    that maximises the between-class variance w0 w1 (mu0 - mu1)^2 of {v <= t} and {v > t}."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins, (lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1].astype(np.float64)   # class {bin <= k}, k = 0 .. bins - 2
    w1 = counts.sum() - w0
    m0 = np.cumsum(counts * centres)[:-1]
    m1 = (counts * centres).sum() - m0
    valid = (w0 > 0) & (w1 > 0)
    between = np.zeros_like(w0)
    between[valid] = w0[valid] * w1[valid] * (m0[valid] / w0[valid] - m1[valid] / w1[valid]) ** 2
    return float(centres[int(np.argmax(between))])


def propose(image, ndim: int, sigma: float = 1.0, threshold=None, opening: int = 1,
            min_size: int = 4, bright: bool = True, spacing=None) -> np.ndarray:
    """Proposed dots (n, ndim) float32 in pixel coordinates of `image`, of `ndim` spatial axes
    and optionally a last channel axis (channels averaged).

    sigma: Gaussian smoothing in physical units (divided by `spacing` per axis); threshold:
    on the smoothed image, None for Otsu's; opening: radius in pixels of the ball the
    foreground is opened with in 3D (0: none; 2D images are not opened, as in the paper);
    min_size: the smallest component kept, in pixels; bright: cells brighter than the
    background (fluorescence) or darker (brightfield stains, `bright=False`).
    """
    a = np.asarray(image, np.float32)
    if a.ndim == ndim + 1:
        a = a.mean(-1)
    if a.ndim != ndim:
        raise ValueError(f"expected an image of {ndim} spatial axes (and channels), got shape "
                         f"{np.shape(image)}")
    spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, np.float64)
    smooth = ndimage.gaussian_filter(a, sigma / spacing) if sigma > 0 else a
    if not bright:
        smooth = -smooth
    t = otsu_threshold(smooth) if threshold is None else (float(threshold) if bright
                                                          else -float(threshold))
    mask = smooth > t
    if opening > 0 and ndim == 3:
        r = int(opening)
        grid = np.mgrid[tuple(slice(-r, r + 1) for _ in range(ndim))]
        mask = ndimage.binary_opening(mask, structure=(grid ** 2).sum(0) <= r * r)
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros((0, ndim), np.float32)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= max(int(min_size), 1))
    keep = keep[keep > 0]
    if len(keep) == 0:
        return np.zeros((0, ndim), np.float32)
    centres = ndimage.center_of_mass(np.ones(mask.shape), labels, keep)
    return np.asarray(centres, np.float32).reshape(-1, ndim)
