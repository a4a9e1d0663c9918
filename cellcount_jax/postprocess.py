"""From a density map to cell positions: threshold, connected components, centroids."""
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cellcount_jax.errors import InputError


def detect(density: np.ndarray, threshold: float, min_size: int = 1):
    """Centroids (n, ndim) in pixel coordinates of the components of `density > threshold`.

    Components are face-connected (4-connected in 2D, 6 in 3D) and must have at least
    `min_size` pixels. Each centroid is the density-weighted centre of its component.
    """
    density = np.asarray(density, np.float64)
    labels, n = ndimage.label(density > threshold)
    if n == 0:
        return np.zeros((0, density.ndim), np.float32)
    index = np.arange(1, n + 1)
    if min_size > 1:
        sizes = ndimage.sum_labels(np.ones_like(density), labels, index)
        index = index[sizes >= min_size]
        if index.size == 0:
            return np.zeros((0, density.ndim), np.float32)
    centres = ndimage.center_of_mass(density, labels, index)
    return np.asarray(centres, np.float32).reshape(-1, density.ndim)


def neighbourhood(ndim: int, min_distance: float = 0.0, spacing=None) -> np.ndarray:
    """Bool footprint of the offsets within `min_distance` (physical units, per-axis
    `spacing`) of the centre, always including the 3^ndim neighbours."""
    spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, np.float64)
    half = np.maximum(1, np.floor(min_distance / spacing).astype(int))
    offsets = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    ball = sum((o * s) ** 2 for o, s in zip(offsets, spacing)) <= min_distance ** 2
    return ball | np.all([np.abs(o) <= 1 for o in offsets], axis=0)


def maxima(density: np.ndarray, min_distance: float = 0.0, spacing=None) -> np.ndarray:
    """Bool map of the pixels equal to the maximum of the density over their `neighbourhood`
    (whatever their value: `local_maxima` thresholds them)."""
    density = np.asarray(density, np.float64)
    footprint = neighbourhood(density.ndim, min_distance, spacing)
    return ndimage.maximum_filter(density, footprint=footprint, mode="constant",
                                  cval=-np.inf) == density


def local_maxima(density: np.ndarray, threshold: float, min_distance: float = 0.0,
                 spacing=None, peaks=None):
    """Local maxima above `threshold`: pixels equal to the maximum of the density over their
    `neighbourhood` (the 3^ndim neighbours, and every pixel within `min_distance` in physical
    units). A plateau of equal maxima gives one detection at its centre. `peaks`: the
    `maxima` of this density and minimum distance where already computed (calibration tries
    many thresholds on one map). Returns (n, ndim) pixel coordinates."""
    density = np.asarray(density, np.float64)
    peaks = maxima(density, min_distance, spacing) if peaks is None else peaks
    peaks = peaks & (density > threshold)
    labels, n = ndimage.label(peaks, structure=np.ones((3,) * density.ndim))
    if n == 0:
        return np.zeros((0, density.ndim), np.float32)
    centres = ndimage.center_of_mass(peaks, labels, np.arange(1, n + 1))
    return np.asarray(centres, np.float32).reshape(-1, density.ndim)


MIN_FOR_SPLIT = 5   # `split_heavy` needs this many detections to know a typical one


def split_heavy(density: np.ndarray, points, threshold: float, ratio: float, spacing=None):
    """Detections whose share of the map's mass is that of two cells, each split in two.

    Every pixel above `threshold` belongs to its nearest detection (physical distance); a
    detection's mass is the density summed over its pixels. Where that mass exceeds `ratio`
    times the median mass of the map's detections (the typical single cell), the detection is
    taken for two touching cells that the map did not separate: it is replaced by two points
    on its mass's longest principal axis, at the centre +- sqrt(lambda - median lambda) (lambda:
    that axis's variance, in physical units squared), i.e. two cells of the typical spread whose
    union has the spread seen. ratio <= 0, or fewer than MIN_FOR_SPLIT detections, returns the
    points as they are. Returns (m, ndim) pixel coordinates."""
    return split_heavy_each(density, points, threshold, (ratio,), spacing)[0]


def split_heavy_each(density: np.ndarray, points, threshold: float, ratios, spacing=None):
    """`split_heavy` for each of `ratios` (a list of (m, ndim) arrays), the masses and
    moments computed once."""
    points = np.asarray(points, np.float64).reshape(-1, density.ndim)
    n = len(points)
    if n < MIN_FOR_SPLIT or all(r <= 0 for r in ratios):
        return [points.astype(np.float32) for _ in ratios]
    scale = np.ones(density.ndim) if spacing is None else np.asarray(spacing, np.float64)
    mask = density > threshold
    x = np.argwhere(mask) * scale
    w = np.asarray(density, np.float64)[mask]
    own = cKDTree(points * scale).query(x)[1]
    mass = np.bincount(own, w, n)
    safe = np.maximum(mass, 1e-30)[:, None]
    mean = np.stack([np.bincount(own, w * x[:, a], n) for a in range(x.shape[1])], 1) / safe
    d = x - mean[own]
    cov = np.stack([np.stack([np.bincount(own, w * d[:, a] * d[:, b], n)
                              for b in range(x.shape[1])], -1) for a in range(x.shape[1])], -2)
    lam, vec = np.linalg.eigh(cov / safe[..., None])
    half = np.sqrt(np.maximum(lam[:, -1] - np.median(lam[:, -1]), 0.0))[:, None]
    ends = [(mean + half * vec[:, :, -1]) / scale, (mean - half * vec[:, :, -1]) / scale]
    out = []
    for ratio in ratios:
        heavy = mass > ratio * np.median(mass) if ratio > 0 else np.zeros(n, bool)
        out.append(np.concatenate([points[~heavy], ends[0][heavy], ends[1][heavy]])
                   .astype(np.float32))
    return out


DETECTORS = ("components", "peaks")


def detect_with(density: np.ndarray, threshold: float, detector: str = "components",
                min_size: int = 1, min_distance: float = 0.0, spacing=None, peaks=None,
                split: float = 0.0):
    """Detections (n, ndim) in pixels by `detector`: 'components' (`detect`) or 'peaks'
    (`local_maxima` with `min_distance` in the units of `spacing`, and its `peaks`); with
    `split` > 0, those holding more than `split` times a typical detection's mass are split in
    two (`split_heavy`)."""
    if detector == "components":
        points = detect(density, threshold, min_size)
    elif detector == "peaks":
        points = local_maxima(density, threshold, min_distance, spacing, peaks)
    else:
        raise InputError(f"config.eval.detector must be one of {DETECTORS} or 'auto', "
                         f"got {detector!r}")
    return split_heavy(density, points, threshold, split, spacing) if split > 0 else points


def corrected_count(detections: int, pairs: float, crowd) -> float:
    """A count corrected for crowding: the detections plus per_pair cells per close pair of
    them (`evaluation.crowding` fits per_pair; crowd None: no correction)."""
    return float(detections + (crowd["per_pair"] * pairs if crowd else 0.0))


def nearest_pixel(points, shape=None) -> np.ndarray:
    """The nearest pixel (int, n x ndim) of each point (n, ndim) in pixel coordinates, halves
    rounded up: floor(x + 0.5), the one rule for dots, detections and tile ownership
    (`targets.rasterize` applies it in JAX); clipped into an image of `shape` when given."""
    idx = np.floor(np.asarray(points, np.float64) + 0.5).astype(np.int64)
    return idx if shape is None else np.clip(idx, 0, np.asarray(shape) - 1)


def inside(points, roi):
    """The points (n, ndim) whose nearest pixel lies in the bool mask `roi` (None: all)."""
    points = np.asarray(points)
    if roi is None or len(points) == 0:
        return points
    return points[roi[tuple(nearest_pixel(points, roi.shape).T)]]


def close_pairs(points, distance: float, spacing=None, owned=None) -> float:
    """The number of pairs of `points` (n, ndim) at most `distance` apart (physical units).
    With `owned` (bool (n,)): each pair counts 1/2 for each of its points that is owned, so
    that the tiles of an image, each seeing the points around its core, add up to the pairs of
    the whole image."""
    points = np.asarray(points, np.float64).reshape(-1, np.shape(points)[-1])
    if len(points) < 2:
        return 0.0
    scale = np.ones(points.shape[1]) if spacing is None else np.asarray(spacing, np.float64)
    pairs = cKDTree(points * scale).query_pairs(distance, output_type="ndarray")
    if owned is None:
        return float(len(pairs))
    owned = np.asarray(owned, bool)
    return float(owned[pairs].sum()) / 2.0
