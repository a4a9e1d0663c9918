"""Input normalisation: fitted once on the training images, stored in the model folder, and
applied the same way by training, evaluation and prediction.

Two steps, both here so that no caller repeats the rule:
- `Normaliser.image`: a whole image as read from its file, (*spatial, C) in its own value
  range -> float32 ('channel_stats': (x - mean) / std with per-channel statistics of the
  training pool, the reference for VGG; 'minmax': the image to [0, 1] by its own range;
  'percentile': each channel of each image mapped so that its `percentiles` (default 1 and
  99.8 %) go to 0 and 1, the StarDist/Cellpose convention, which makes the model indifferent
  to exposure: the default for your own images);
- `Normaliser.crop`: each network input, a training crop or the whole image at inference
  ('minmax': zero mean and unit std per channel, the reference's 3D recipe; otherwise none).
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np

from cellcount_jax.errors import InputError

MODES = ("channel_stats", "minmax", "percentile")


@dataclasses.dataclass(frozen=True)
class Normaliser:
    mode: str
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    percentiles: Optional[Tuple[float, ...]] = None

    @classmethod
    def fit(cls, mode: str, images, percentiles=(1.0, 99.8), key: str = "config.data.normalise"):
        """Fits `mode` on a list of (*spatial, C) training images (labeled and unlabeled)."""
        if mode not in MODES:
            raise InputError(f"{key} must be one of {MODES}, got {mode!r}")
        if mode == "percentile":
            lo, hi = (float(p) for p in percentiles)
            if not 0 <= lo < hi <= 100:
                raise InputError(f"config.data.percentiles must be (low, high) with 0 <= low < "
                                 f"high <= 100, got {tuple(percentiles)}")
            return cls(mode, percentiles=(lo, hi))
        if mode == "channel_stats":
            flat = np.concatenate([np.asarray(im, np.float32).reshape(-1, im.shape[-1])
                                   for im in images])
            mean, std = flat.mean(0), flat.std(0) + np.float32(1e-6)
            return cls(mode, tuple(mean.tolist()), tuple(std.tolist()))
        return cls(mode)

    def image(self, image) -> np.ndarray:
        image = np.asarray(image, np.float32)
        if self.mode == "channel_stats":
            if image.shape[-1] != len(self.mean):
                raise InputError(f"the model expects {len(self.mean)} channel(s), the image has "
                                 f"{image.shape[-1]}")
            return ((image - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)
        if self.mode == "percentile":
            axes = tuple(range(image.ndim - 1))
            lo, hi = np.percentile(image, self.percentiles, axis=axes).astype(np.float32)
            return ((image - lo) / np.maximum(hi - lo, np.float32(1e-12))).astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        return ((image - lo) / max(hi - lo, 1e-12)).astype(np.float32)

    def affine(self, source, normalised: bool = False):
        """Per-channel float32 (offset, scale) with which `(x - offset) / scale` is the network
        input of any region x of one image, so that every region (a tile of a volume) is
        normalised by the same whole-image statistics, as a whole-image input would be.

        source: the image, a (*spatial, C) array or a `volumes.Volume` (statistics gathered
        plane by plane when it is large: exact for 8- and 16-bit integer images, to 1/65536 of
        the value range otherwise). normalised: the image has been through `image` already.
        """
        channels = source.shape[-1] if isinstance(source, np.ndarray) else source.channels
        zero, one = np.zeros(channels, np.float64), np.ones(channels, np.float64)
        if self.mode == "channel_stats":
            return _f32(zero, one) if normalised else _f32(self.mean, self.std)
        if self.mode == "percentile":
            if normalised:
                return _f32(zero, one)
            lo, hi = _percentiles(source, self.percentiles)
            return _f32(lo, np.maximum(hi - lo, 1e-12))
        lo, hi, mean, std = _range_and_moments(source)
        # minmax: (x - lo) / span, then standardised by its mean and std (`standardise`), in one
        span = 1.0 if normalised else max(hi - lo, 1e-12)
        return _f32(mean, std + 1e-6 * span)

    @staticmethod
    def apply(x, affine) -> np.ndarray:
        """`(x - offset) / scale` of a region (*spatial, C) with `affine` from `affine`."""
        offset, scale = affine
        return ((np.asarray(x, np.float32) - offset) / scale).astype(np.float32)

    def crop(self, x) -> np.ndarray:
        if self.mode == "minmax":
            return standardise(x)
        return np.asarray(x, np.float32)

    def __call__(self, image) -> np.ndarray:
        """The network input for a whole image read from its file."""
        return self.crop(self.image(image))

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict):
        if d.get("mode") not in MODES:
            raise InputError(f"normalisation mode must be one of {MODES}, got {d.get('mode')!r}")
        return cls(d["mode"], *(tuple(d[k]) if d.get(k) is not None else None
                                for k in ("mean", "std", "percentiles")))


def standardise(image: np.ndarray) -> np.ndarray:
    """(*spatial, channels) -> zero mean, unit std per channel."""
    image = np.asarray(image, np.float32)
    axes = tuple(range(image.ndim - 1))
    return ((image - image.mean(axes)) / (image.std(axes) + 1e-6)).astype(np.float32)


def _f32(offset, scale):
    return np.asarray(offset, np.float32), np.asarray(scale, np.float32)


# Volumes larger than this many values are scanned in slabs of planes, never read whole.
WHOLE_STATISTICS = 2 ** 27
SLAB_VALUES = 2 ** 24


def _slabs(source):
    """The image in pieces: whole when it is an array or small, else slabs along axis 0."""
    if isinstance(source, np.ndarray):
        yield np.asarray(source, np.float32)
        return
    total = source.size * source.channels
    if total <= WHOLE_STATISTICS:
        yield source.read()
        return
    step = max(1, SLAB_VALUES * source.shape[0] // total)
    rest = tuple((0, s) for s in source.shape[1:])
    for z in range(0, source.shape[0], step):
        yield source.read(((z, min(z + step, source.shape[0])),) + rest)


def _exact_integers(source) -> bool:
    dtype = np.dtype(getattr(source, "dtype", np.float32))
    return (dtype == bool or np.issubdtype(dtype, np.integer)) and dtype.itemsize <= 2


def _percentiles(source, percentiles):
    """(lo, hi) per channel: `np.percentile` of the whole image, read at once when it is small;
    for a large volume from value counts (8/16-bit integers: exact) or a 65,536-bin histogram
    between the image's extremes (other types)."""
    pieces = _slabs(source)
    first = next(pieces)
    try:
        second = next(pieces)
    except StopIteration:  # the whole image is in memory
        axes = tuple(range(first.ndim - 1))
        lo, hi = np.percentile(first, percentiles, axis=axes).astype(np.float32)
        return lo.astype(np.float64), hi.astype(np.float64)
    channels = first.shape[-1]
    if _exact_integers(source):
        base = int(np.iinfo(source.dtype).min) if source.dtype != bool else 0
        counts = np.zeros((channels, 2 ** (8 * np.dtype(source.dtype).itemsize)), np.int64)
        for slab in _chain(first, second, pieces):
            flat = slab.reshape(-1, channels).astype(np.int64) - base
            for c in range(channels):
                counts[c] += np.bincount(flat[:, c], minlength=counts.shape[1])
        values = np.arange(counts.shape[1], dtype=np.float64) + base
        out = [[_rank_value(counts[c], values, values, p) for p in percentiles]
               for c in range(channels)]
    else:
        lo, hi = np.full(channels, np.inf), np.full(channels, -np.inf)
        for slab in _chain(first, second, pieces):
            flat = slab.reshape(-1, channels)
            lo, hi = np.minimum(lo, flat.min(0)), np.maximum(hi, flat.max(0))
        bins = 2 ** 16
        counts = np.zeros((channels, bins), np.int64)
        for slab in _slabs(source):
            flat = slab.reshape(-1, channels)
            for c in range(channels):
                counts[c] += np.histogram(flat[:, c], bins, (lo[c], max(hi[c], lo[c] + 1e-12)))[0]
        out = []
        for c in range(channels):
            edges = np.linspace(lo[c], max(hi[c], lo[c] + 1e-12), bins + 1)
            out.append([_rank_value(counts[c], edges[:-1], edges[1:], p) for p in percentiles])
    out = np.asarray(out, np.float64)
    return out[:, 0], out[:, 1]


def _chain(first, second, rest):
    yield first
    yield second
    yield from rest


def _rank_value(counts, low, high, percentile):
    """np.percentile's 'linear' value at `percentile` of a sample given as counts per bin
    [low, high) (equal for exact integer values; spread evenly inside a bin otherwise)."""
    n = counts.sum()
    cum = np.cumsum(counts)

    def at(k):  # the k-th smallest value (0-based)
        b = int(np.searchsorted(cum, k, side="right"))
        before = cum[b] - counts[b]
        return low[b] + (high[b] - low[b]) * (k - before + 0.5) / counts[b]

    rank = percentile / 100 * (n - 1)
    k = int(np.floor(rank))
    lo = at(k)
    return lo + (rank - k) * (at(min(k + 1, n - 1)) - lo)


def _range_and_moments(source):
    """Minimum and maximum over all channels, and per-channel mean and std, of the image."""
    lo, hi, n = np.inf, -np.inf, 0
    total = total_sq = 0.0
    for slab in _slabs(source):
        flat = slab.reshape(-1, slab.shape[-1])
        lo, hi = min(lo, float(flat.min())), max(hi, float(flat.max()))
        total = total + flat.sum(0, dtype=np.float64)
        total_sq = total_sq + np.square(flat, dtype=np.float64).sum(0)
        n += flat.shape[0]
    mean = total / n
    return lo, hi, mean, np.sqrt(np.maximum(total_sq / n - mean ** 2, 0.0))
