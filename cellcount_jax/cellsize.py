"""The typical size of an image's cells, in physical units: what lets a model meet cells larger
or smaller than those it was trained on (as cellpose's `--diameter`).

Estimator ('log_scale': the scale of a blob in scale space, Lindeberg 1998). The image is the
mean of its channels, I; at each physical scale sigma of a geometric range (`sigmas`:
SIGMAS_PER_OCTAVE per doubling, MIN_SIGMA to MAX_SIGMA pixels of the finest axis, for cells
of about 2 to 70 pixels) its response is

    R(x, sigma) = polarity * sigma^d * -Laplacian(G_sigma * I)(x)

with G_sigma a Gaussian of physical standard deviation sigma (sigma / spacing pixels on each
axis), the Laplacian in physical units (each axis's second derivative divided by its spacing
squared: `scipy.ndimage.gaussian_laplace` on an anisotropic grid), d the number of spatial
axes, and polarity +1 for bright cells on a dark background (fluorescence), -1 for dark cells
on a bright one (stained nuclei in bright field). At the centre of a uniform disk or ball of
radius r, R peaks at sigma = r / sqrt(2) in 2D and 3D alike: the exponent d, rather than the
usual 2, makes the scale of a ball independent of the dimension. A cell's scale is the scale
of the largest peak of R in scale at its centre, strictly inside the range (a response that
keeps growing towards the finest scale is pixel noise), refined between the sampled scales by
a parabola in log sigma. The typical diameter is DIAMETER_PER_SIGMA times the median scale of
the cells: 2 sqrt(2) = 2.83 for isolated balls; 2.65 so that the synthetic cells of
`data.synthetic_image(radius=r)`, a third of them in clusters of touching cells that enlarge
the scale, give 2 r within a few per cent in 2D and 3D.

The cell centres are an image's dots where it has them (`of_training_set`, which also decides
the polarity from the image at its dots, `data.dot_intensity_rank`). An image without dots
(`estimate`) has its cells found as blobs (`_blobs`): maxima of R in space and in scale, the
strongest ones (at least THRESHOLD of the REFERENCE_RANK-th strongest), without the blobs
that lie inside a larger one of comparable response (the texture and edges of a large cell)
and each the strongest within its radius, at most MAX_CENTRES. Large images and volumes are
estimated on one block of at most BLOCK_VOXELS voxels (`block`: the image's centre, or its
dots'), read from a `volumes.Volume` without reading the rest.

Computation (`scale_space`): the second difference [1, -2, 1] of the image smoothed by the
Gaussian, less the 1/6 pixel^2 of variance by which the difference itself smooths; scales
beyond SUBSAMPLE_PIXELS pixels on an axis on a grid subsampled by two there (after smoothing
to one pixel of that grid), so that every scale costs about the same few-pixel filters. Away
from the image's edges it matches `gaussian_laplace` to a few per cent of the response's
range for scales of a pixel or more.

`nearest_dot_distance`, the median distance from a dot to its nearest neighbour, is a second,
density-type statistic of annotated cells.
"""
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from cellcount_jax.errors import InputError

ESTIMATOR = "log_scale"
POLARITIES = ("bright", "dark")
MIN_SIGMA, MAX_SIGMA = 0.55, 30.0  # pixels of the finest axis
SIGMAS_PER_OCTAVE = 3
DIAMETER_PER_SIGMA = 2.65
BLOCK_VOXELS = 2 ** 22
# Blobs of an image without dots (`_blobs`).
CANDIDATES = 2000        # the strongest maxima considered
THRESHOLD = 0.5          # kept: response >= THRESHOLD x the REFERENCE_RANK-th strongest
REFERENCE_RANK = 3
CONTAIN = 1.5            # a blob within CONTAIN radii of a larger one...
SUB_FRACTION = 0.5       # ...whose response is at least SUB_FRACTION of its own is dropped
MAX_CENTRES = 500
# A grid is subsampled along an axis once a scale spans this many of its pixels.
SUBSAMPLE_PIXELS = 3.0
MIN_SUBSAMPLED = 16


def sigmas(spacing) -> np.ndarray:
    """The physical scales sampled: geometric from MIN_SIGMA to MAX_SIGMA pixels of the
    finest axis, SIGMAS_PER_OCTAVE per doubling."""
    step = 2.0 ** (1.0 / SIGMAS_PER_OCTAVE)
    count = int(np.ceil(np.log(MAX_SIGMA / MIN_SIGMA) / np.log(step))) + 1
    return float(np.min(spacing)) * MIN_SIGMA * step ** np.arange(count)


def scale_space(image, spacing, polarity: str = "bright"):
    """Yields (sigma, response, stride) for each of `sigmas(spacing)`: the response R (module
    docstring) of a (*spatial) float image on its grid subsampled by `stride` (ints per axis:
    response[j] is at pixel j * stride of the image)."""
    sign = _sign(polarity)
    a = np.asarray(image, np.float32)
    ndim = a.ndim
    pixel = np.asarray(spacing, np.float64)  # physical size of the current grid's pixels
    done = np.zeros(ndim)  # physical standard deviation of the smoothing already applied
    stride = np.ones(ndim, int)
    for sigma in sigmas(spacing):
        down = (sigma >= SUBSAMPLE_PIXELS * pixel) & (np.array(a.shape) >= MIN_SUBSAMPLED)
        if down.any():
            # Smoothed to one pixel of the subsampled grid first: what it cannot hold (beyond
            # its Nyquist frequency) is then below 1 % and does not fold back.
            a = ndimage.gaussian_filter(
                a, np.where(down, np.sqrt(4 * pixel ** 2 - done ** 2) / pixel, 0))
            done = np.where(down, 2 * pixel, done)
            a = a[tuple(slice(None, None, 2) if d else slice(None) for d in down)]
            pixel, stride = np.where(down, 2 * pixel, pixel), np.where(down, 2 * stride, stride)
        rest = (sigma ** 2 - done ** 2) / pixel ** 2  # variance left, pixels squared
        # The second difference [1, -2, 1] is the second derivative smoothed by a Gaussian of
        # variance 1/6 pixel^2 (-4 sin^2(w/2) ~ -w^2 exp(-w^2/12)): the smoothing leaves it out.
        smooth = ndimage.gaussian_filter(a, np.sqrt(np.maximum(rest - 1 / 6, 0)))
        laplacian = sum(_second_difference(smooth, i) / np.float32(pixel[i] ** 2)
                        for i in range(ndim))
        yield float(sigma), (-sign * sigma ** ndim) * laplacian, stride.copy()


def _second_difference(a, axis: int) -> np.ndarray:
    """a[i + 1] - 2 a[i] + a[i - 1] along `axis`, the edges mirrored (a[-1] = a[0])."""
    ends = np.take(a, [0], axis), np.take(a, [-1], axis)
    return np.diff(np.concatenate([ends[0], a, ends[1]], axis), 2, axis)


def _sign(polarity: str) -> float:
    if polarity not in POLARITIES:
        raise InputError(f"the cells' polarity must be one of {POLARITIES}, got {polarity!r}")
    return 1.0 if polarity == "bright" else -1.0


def _at(response, stride, points) -> np.ndarray:
    """A `scale_space` response at `points` (n, ndim) in the image's pixels (linear)."""
    return ndimage.map_coordinates(response, (np.asarray(points, np.float64) / stride).T,
                                   order=1, mode="nearest")


def _refined(sigmas, k, left, mid, right) -> np.ndarray:
    """The scale of a peak in scale at sigmas[k] (values left, mid, right at k - 1, k, k + 1):
    the vertex of the parabola through them in log sigma."""
    curve = left - 2 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.clip(np.where(curve < 0, 0.5 * (left - right) / curve, 0.0), -0.5, 0.5)
    log_sigma = np.log(sigmas)
    return np.exp(log_sigma[k] + shift * (log_sigma[1] - log_sigma[0]))


def _scales_at(responses, points) -> np.ndarray:
    """The scale (n,) of the cells at `points` (n, ndim, pixels), from the list of
    `scale_space` outputs: the largest of the peaks in scale strictly inside the range
    (`_refined`); nan where the response has no positive peak there."""
    if not len(points):
        return np.zeros(0)
    v = np.stack([_at(r, stride, points) for _, r, stride in responses])  # (scales, n)
    peak = (v[1:-1] >= v[:-2]) & (v[1:-1] >= v[2:]) & (v[1:-1] > 0)
    k = np.argmax(np.where(peak, v[1:-1], -np.inf), 0) + 1
    n = np.arange(v.shape[1])
    out = _refined([s for s, _, _ in responses], k, v[k - 1, n], v[k, n], v[k + 1, n])
    return np.where(peak[k - 1, n], out, np.nan)


def _blobs(responses, spacing):
    """Cells of an image without dots, from the list of its `scale_space` outputs: (centres
    (n, ndim) in pixels, scales (n,) physical).

    The blobs are the maxima of the response in space (among the 3^ndim neighbours on its
    grid) and in scale (strictly inside the range), the CANDIDATES strongest, and of those
    the ones whose response is at least THRESHOLD times the REFERENCE_RANK-th strongest (the
    cells stand out from the noise by their contrast; the rank makes one very bright cell no
    reference). A blob within CONTAIN radii (radius: sqrt(2) sigma) of a larger one whose
    response is at least SUB_FRACTION of its own is a detail of a cell (its texture, its
    edge) and is dropped; of the rest, each is kept where no stronger one lies within the
    larger radius of the two, the MAX_CENTRES strongest."""
    sigmas = [s for s, _, _ in responses]
    found = []
    for k in range(1, len(responses) - 1):
        _, r, stride = responses[k]
        idx = np.argwhere((r == ndimage.maximum_filter(r, 3)) & (r > 0))
        points = idx * stride
        mid = r[tuple(idx.T)]
        left, right = _at(*responses[k - 1][1:], points), _at(*responses[k + 1][1:], points)
        peak = (mid >= left) & (mid >= right)
        found.append((points[peak], mid[peak],
                      _refined(sigmas, np.full(peak.sum(), k), left[peak], mid[peak], right[peak])))
    points, values, scales = (np.concatenate(a) for a in zip(*found))
    if not len(values):
        return np.zeros((0, len(spacing))), np.zeros(0)
    order = np.argsort(-values, kind="stable")[:CANDIDATES]
    reference = values[order[min(REFERENCE_RANK, len(order)) - 1]]
    order = order[values[order] >= THRESHOLD * reference]
    points, values, scales = points[order], values[order], scales[order]
    radii = np.sqrt(2) * scales
    distance = cdist(points * spacing, points * spacing)
    inside = ((distance < CONTAIN * radii[None, :]) & (radii[None, :] > radii[:, None])
              & (values[None, :] >= SUB_FRACTION * values[:, None])).any(1)
    kept = np.zeros(len(points), bool)
    for i in np.flatnonzero(~inside):
        kept[i] = not (distance[i, kept] < np.maximum(radii[kept], radii[i])).any()
        if kept.sum() == MAX_CENTRES:
            break
    return points[kept].astype(np.float64), scales[kept]


def block(shape, spacing, centre=None):
    """The box ((start, stop) per axis) of at most BLOCK_VOXELS voxels around `centre` (pixels;
    default the image's centre), as near a cube in physical units as the image allows."""
    shape = np.asarray(shape, int)
    size = shape.copy()
    spacing = np.asarray(spacing, np.float64)
    while np.prod(size.astype(np.float64)) > BLOCK_VOXELS:
        axis = int(np.argmax(np.where(size > 1, size * spacing, -1)))
        size[axis] = max(1, int(size[axis] * 0.9))
    centre = (shape - 1) / 2 if centre is None else np.asarray(centre, np.float64)
    start = np.clip(np.round(centre - size / 2).astype(int), 0, shape - size)
    return tuple((int(a), int(a + s)) for a, s in zip(start, size))


def _read(image, ndim: int, box) -> np.ndarray:
    """(*box, C) float32: a box of an array (*spatial[, C]) or of a `volumes.Volume`."""
    if hasattr(image, "read"):
        return image.read(box)
    a = np.asarray(image)[tuple(slice(lo, hi) for lo, hi in box)]
    return (a if a.ndim == ndim + 1 else a[..., None]).astype(np.float32)


def _spatial_shape(image, ndim: int):
    """The spatial shape of an array (*spatial[, C]) or a Volume, checked to have `ndim` axes."""
    shape = tuple(image.shape)
    if not hasattr(image, "read") and len(shape) == ndim + 1:
        shape = shape[:ndim]
    if len(shape) != ndim:
        raise InputError(f"an image with {ndim} spatial axes, as many as the spacing has, was "
                         f"expected ((*spatial[, channels])), got shape {tuple(image.shape)}")
    return shape


def _check_spacing(spacing) -> np.ndarray:
    spacing = np.ravel(np.asarray(spacing, np.float64))
    if not len(spacing) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise InputError(f"the spacing must be the positive physical size of a pixel on each "
                         f"spatial axis ([z,] y, x), got {spacing.tolist()}")
    return spacing


def estimate(image, spacing: Sequence[float], polarity: str = "bright") -> float:
    """The typical diameter of the cells of one image without dots, in the units of `spacing`.

    image: (*spatial[, C]) array as read from its file, or a `volumes.Volume` (only a block of
    at most BLOCK_VOXELS is read); spacing: physical size of a pixel per spatial axis,
    ([z,] y, x); polarity: 'bright' (cells brighter than their background) or 'dark'.
    Channels are averaged by their values, so a faint channel weighs little (a normalisation
    that stretches every channel to the same range would give its noise as much weight as
    the cells' signal). Raises InputError where no cell stands out."""
    spacing = _check_spacing(spacing)
    _sign(polarity)
    box = block(_spatial_shape(image, len(spacing)), spacing)
    a = _read(image, len(spacing), box).mean(-1)
    _, scales = _blobs(list(scale_space(a, spacing, polarity)), spacing)
    if not len(scales):
        raise InputError(f"no {polarity} cells stand out in the image: the cells' diameter "
                         f"cannot be estimated; give it as a number")
    return float(DIAMETER_PER_SIGMA * np.median(scales))


def _nearest_distances(dots, spacing) -> np.ndarray:
    dots = np.asarray(dots, np.float64).reshape(-1, len(spacing)) * spacing
    if len(dots) < 2:
        return np.zeros(0)
    distance, _ = cKDTree(dots).query(dots, k=2)
    return distance[:, 1]


def nearest_dot_distance(dots, spacing: Sequence[float]) -> float:
    """The median over dots (n, ndim pixels) of the distance to the nearest other dot, in
    the units of `spacing`; nan with fewer than two dots."""
    d = _nearest_distances(dots, _check_spacing(spacing))
    return float(np.median(d)) if len(d) else float("nan")


def of_training_set(images, dots, spacing: Sequence[float]) -> dict:
    """The cell size of annotated images, as the model folder records it: {'diameter',
    'nearest_dot_distance' (physical units; None without cells), 'polarity', 'estimator'}.

    images: (*spatial, C) arrays, as read or normalised (at the dots the scale barely depends
    on the channels' weights); dots: (n, ndim) pixel coordinates of each image's cells. The
    polarity is 'bright' where the images are brighter at their dots than a typical
    pixel (`data.dot_intensity_rank` >= 0.5, weighted by dots), else 'dark'. The diameter
    is DIAMETER_PER_SIGMA times the median of the scales of all dots of all images (each
    image's dots in one block of at most BLOCK_VOXELS around their middle)."""
    from cellcount_jax.data import dot_intensity_rank  # here: the data package brings JAX
    spacing = _check_spacing(spacing)
    ndim = len(spacing)
    dots = [np.zeros((0, ndim)) if d is None else np.asarray(d, np.float64).reshape(-1, ndim)
            for d in dots]
    blocks = []
    for image, d in zip(images, dots):
        if not len(d):
            continue
        shape = _spatial_shape(image, ndim)
        box = block(shape, spacing, np.median(d, 0))
        lo, hi = np.array(box).T
        inside = np.all((d >= lo - 0.5) & (d <= hi - 0.5), 1)
        if inside.any():
            blocks.append((_read(image, ndim, box).mean(-1), d[inside] - lo))
    ranks = [(dot_intensity_rank(a[..., None], d), len(d)) for a, d in blocks]
    rank = np.average([r for r, _ in ranks], weights=[n for _, n in ranks]) if ranks else 1.0
    polarity = "bright" if rank >= 0.5 else "dark"
    scales = [_scales_at(list(scale_space(a, spacing, polarity)), d) for a, d in blocks]
    scales = np.concatenate(scales) if scales else np.zeros(0)
    scales = scales[np.isfinite(scales)]
    nearest = np.concatenate([np.zeros(0)] + [_nearest_distances(d, spacing) for d in dots])
    return {"diameter": round(float(DIAMETER_PER_SIGMA * np.median(scales)), 4)
            if len(scales) else None,
            "nearest_dot_distance": round(float(np.median(nearest)), 4) if len(nearest) else None,
            "polarity": polarity, "estimator": ESTIMATOR}
