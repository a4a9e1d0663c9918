"""In-memory datasets: labeled and unlabeled pools, targets, on-the-fly augmentation.

Data loading stays on the host, in numpy, apart from the jitted train step: `sample` returns
plain arrays of fixed shapes. Targets are made once per full image (so a crop near its border
still sees the dots just outside) and are cropped and flipped together with the image.
"""
import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from cellcount_jax import postprocess
from cellcount_jax import targets as targets_lib
from cellcount_jax.errors import InputError

FIELD_BACKGROUND = 0.1  # the quantile of a crop taken as its background by the field


def pad_dots(dots: np.ndarray, max_dots: Optional[int] = None):
    """(n, ndim) dots -> ((max_dots, ndim) zero-padded array, n) for jitted code."""
    dots = np.asarray(dots, np.float32).reshape(len(dots), -1)
    n = len(dots)
    max_dots = max(n, 1) if max_dots is None else max_dots
    if n > max_dots:
        raise ValueError(f"{n} dots exceed max_dots={max_dots}")
    out = np.zeros((max_dots, dots.shape[1]), np.float32)
    out[:n] = dots
    return out, n


def check_dots(dots: np.ndarray, shape: Sequence[int], name: str):
    """Raise a clear error if dots are not (n, ndim) coordinates inside an image of `shape`."""
    dots = np.asarray(dots, np.float32)
    if dots.ndim != 2 or dots.shape[1] != len(shape):
        raise InputError(f"{name}: dots must be (n, {len(shape)}) coordinates, got {dots.shape}")
    if not np.isfinite(dots).all():
        raise InputError(f"{name}: dots contain NaN or inf")
    rounded = postprocess.nearest_pixel(dots)
    outside = np.any((rounded < 0) | (rounded >= np.asarray(shape)), axis=1)
    if outside.any():
        raise InputError(f"{name}: {int(outside.sum())} dots lie outside the image of shape "
                         f"{tuple(shape)}, e.g. {dots[outside][0].tolist()}")


def make_targets(images, dots, kind: str, scale: float, spacing=None, sigma: float = 2.0,
                 cutoff: float = 0.0):
    """Target maps (float32, spatial shape) of full images with the jitted generator."""
    out = []
    for i, (image, d) in enumerate(zip(images, dots)):
        shape = image.shape[:-1]
        check_dots(d, shape, f"image {i}")
        fn = targets_lib.make_target_fn(kind, shape, scale, spacing, sigma, cutoff)
        # Pad to a power of two so images with similar counts share one compilation.
        padded, n = pad_dots(d, max(1, 1 << int(np.ceil(np.log2(max(len(d), 1))))))
        out.append(np.asarray(fn(padded, n)))
    return out


def _draw_crop(rng, shape: Sequence[int], crop: Sequence[int], rotate: bool,
               anchor: Optional[Sequence[int]] = None):
    """The random crop start, flips of every spatial axis and rot90 (k in {0, 1}, in the last
    two spatial axes: with the flips, all 8 symmetries of the square) of one crop of an image
    of spatial `shape`. With an `anchor` pixel the crop contains it (uniformly among the crops
    that do). Draws depend on shapes only, never on pixel values."""
    if any(c > s for c, s in zip(crop, shape)):
        raise InputError(f"crop {tuple(crop)} is larger than an image of shape {tuple(shape)}")
    if anchor is None:
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop)]
    else:
        start = [int(rng.integers(max(0, a - c + 1), min(a, s - c) + 1))
                 for s, c, a in zip(shape, crop, anchor)]
    flips = [rng.uniform() < 0.5 for _ in shape]
    rot = bool(rotate and crop[-1] == crop[-2] and rng.uniform() < 0.5)
    return start, flips, rot


def _apply_crop(arrays: List[np.ndarray], crop: Sequence[int], draw):
    """The crop of `_draw_crop` applied to each array (same spatial leading axes)."""
    start, flips, rot = draw
    box = tuple(slice(a, a + c) for a, c in zip(start, crop))
    arrays = [a[box] for a in arrays]
    for axis, flip in enumerate(flips):
        if flip:
            arrays = [np.flip(a, axis) for a in arrays]
    if rot:
        n = len(crop)
        arrays = [np.rot90(a, 1, axes=(n - 2, n - 1)) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays]


def _draw_intensity(rng, shape, brightness: float = 0.0, contrast: float = 0.0,
                    gamma: float = 0.0, noise: float = 0.0, field: float = 0.0,
                    field_sigma=(2.0,)):
    """The random numbers of `intensity_augment` for a crop of `shape` (noise as unit normals,
    scaled by the crop's spread when applied; the field as its multiplicative factor)."""
    d = {}
    if field:
        sigma = np.broadcast_to(np.asarray(field_sigma, np.float64), (len(shape) - 1,))
        g = ndimage.gaussian_filter(rng.standard_normal(shape[:-1]), sigma, mode="wrap")
        g /= g.std() or 1.0
        d["field"] = np.exp(field * g).astype(np.float32)[..., None]
    if gamma:
        d["gamma"] = np.exp(rng.uniform(-np.log1p(gamma), np.log1p(gamma)))
    if contrast:
        d["contrast"] = rng.uniform(1 - contrast, 1 + contrast)
    if brightness:
        d["brightness"] = rng.uniform(-brightness, brightness)
    if noise:
        d["noise"] = rng.uniform(0, noise)
        d["normal"] = rng.standard_normal(shape)
    return d


def _apply_intensity(x: np.ndarray, d: dict):
    x = np.asarray(x, np.float32)
    if "field" in d:
        # Each channel's signal above its background (its FIELD_BACKGROUND quantile) scaled.
        flat = x.reshape(-1, x.shape[-1])
        lo = np.partition(flat, int(FIELD_BACKGROUND * (len(flat) - 1)), axis=0)[
            int(FIELD_BACKGROUND * (len(flat) - 1))]
        x = lo + (x - lo) * d["field"]
    if "gamma" in d:
        lo, hi = x.min(), x.max()
        if hi > lo:
            x = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** np.float32(d["gamma"])
    std = float(x.std()) or 1.0
    if "contrast" in d:
        m = x.mean()
        x = (x - m) * np.float32(d["contrast"]) + m
    if "brightness" in d:
        x = x + np.float32(d["brightness"] * std)
    if "noise" in d:
        x = x + (d["noise"] * std * d["normal"]).astype(np.float32)
    return x.astype(np.float32)


def intensity_augment(rng: np.random.Generator, x: np.ndarray, brightness: float = 0.0,
                      contrast: float = 0.0, gamma: float = 0.0, noise: float = 0.0,
                      field: float = 0.0, field_sigma=(2.0,)):
    """Random intensity changes of one normalised crop (*spatial, C), in units of its own
    spread so that they mean the same under any normalisation: first a smooth multiplicative
    field exp(field * g) on each channel's signal above its background (the FIELD_BACKGROUND
    quantile of the crop), g a unit-variance Gaussian random field of standard deviation
    `field_sigma` pixels (per axis, or one for all), so that cells a few sigma apart get
    independent brightness (dim and bright cells side by side, uneven staining); then gamma g
    in [1/(1+gamma), 1+gamma] on the crop's [min, max] range, contrast c in [1-contrast,
    1+contrast] about its mean, a brightness shift of up to +-brightness standard deviations,
    and Gaussian noise of up to `noise` standard deviations. A range of 0 leaves that change
    out (and draws nothing)."""
    return _apply_intensity(x, _draw_intensity(rng, np.shape(x), brightness, contrast, gamma,
                                               noise, field, field_sigma))


def striped(count: int, stripes: int, rows) -> List[bool]:
    """Which of `count` unlabeled images the given rows of a striped batch of `stripes` rows
    (`Dataset.stripes`) can draw: image i belongs to stripe i % stripes."""
    if count < stripes:
        raise InputError(f"a striped unlabeled pool needs at least one image per row of the "
                         f"unlabeled batch ({stripes}), got {count} images")
    wanted = {j % stripes for j in range(*rows)}
    return [i % stripes in wanted for i in range(count)]


def part_rows(size: int, part=(0, 1)):
    """(start, stop): the rows of a global batch of `size` that part `index` of `count`
    (a process of a multi-process job) makes."""
    index, count = part
    if size % count:
        raise InputError(f"a batch of {size} does not split over {count} processes; make "
                         f"config.train.batch and unlabeled_batch multiples of {count}")
    k = size // count
    return index * k, (index + 1) * k


@dataclasses.dataclass
class Dataset:
    """Labeled images with dots and target maps, and a pool of unlabeled images.

    images: list of (*spatial, channels) float32, already normalised; dots: list of (n, ndim)
    pixel coordinates; targets: list of maps from `make_targets`. rotate: rot90 in the last
    two axes (needs isotropic spacing there). crop_fn: applied to each crop, the model's
    `Normaliser.crop` (the same function sees the whole image at inference). intensity: keyword
    ranges of `intensity_augment` applied to every crop before crop_fn (None: none).
    masks: None, or per labeled image a bool mask of the pixels the supervised loss sees (None:
    all of them); every labeled crop of a masked image then contains at least one such pixel
    (drawn uniformly among the mask's pixels, so crops favour the region and its edges over a
    uniform draw) and the batch carries the crops of the masks as 'mask'.
    dot_fraction: the probability that a labeled crop is drawn around one of its image's dots
    (uniformly among the dots, inside the mask where there is one; the crop contains the dot,
    uniformly among the crops that do); the rest are drawn as above. In a large, sparse volume
    uniform crops mostly see background; these keep a few nuclei in every step.
    stripes: 0, or the unlabeled batch size S of a pool split into stripes: row j of the
    unlabeled batch then draws only from the images i with i % S == j % S, so that a process
    needs only the stripes of its rows (`striped_rows`); `unlabeled` may hold None for the
    images of other stripes.
    """
    images: List[np.ndarray]
    dots: List[np.ndarray]
    targets: List[np.ndarray]
    unlabeled: List[np.ndarray] = dataclasses.field(default_factory=list)
    rotate: bool = True
    crop_fn: Optional[Callable] = None
    intensity: Optional[dict] = None
    names: Optional[List[str]] = None
    masks: Optional[List[Optional[np.ndarray]]] = None
    stripes: int = 0
    dot_fraction: float = 0.0

    def __post_init__(self):
        # Flat indices of each mask's pixels, to draw crop anchors from.
        self._inside = None if self.masks is None else [
            None if m is None else np.flatnonzero(m) for m in self.masks]
        if not 0 <= self.dot_fraction <= 1:
            raise InputError(f"config.train.dot_fraction must be in [0, 1], got "
                             f"{self.dot_fraction}")
        # Each image's dots as pixels (inside its mask), the anchors of dot-centred crops.
        self._dot_pixels = []
        for i, (im, d) in enumerate(zip(self.images, self.dots)):
            px = postprocess.nearest_pixel(np.asarray(d).reshape(-1, self.ndim),
                                           im.shape[:self.ndim])
            m = None if self.masks is None else self.masks[i]
            self._dot_pixels.append(px if m is None else px[m[tuple(px.T)]])

    @property
    def ndim(self):
        return self.images[0].ndim - 1

    def sample(self, rng: np.random.Generator, crop: Sequence[int], batch: int,
               unlabeled_batch: int = 0, part=(0, 1)):
        """One training batch: {'image', 'target'[, 'mask'][, 'unlabeled']} of fixed shapes.

        The whole global batch is drawn from `rng` (from image shapes only), and part
        (index, count) makes its share of the rows (`part_rows`): the parts of all processes
        together are exactly the batch of part (0, 1), whatever the number of processes.
        """
        if not self.images:
            raise InputError("the labeled pool is empty")
        lo, hi = part_rows(batch, part)
        channels = (self.images[0].shape[-1],)
        x, y, w = [], [], []
        for k, i in enumerate(rng.integers(len(self.images), size=batch)):
            m = None if self.masks is None else self.masks[i]
            anchor = None
            # Drawn only where dot-centred crops are on, so other recipes keep their batches.
            if (self.dot_fraction and rng.uniform() < self.dot_fraction
                    and len(self._dot_pixels[i])):
                anchor = self._dot_pixels[i][rng.integers(len(self._dot_pixels[i]))]
            elif m is not None:
                flat = self._inside[i][rng.integers(len(self._inside[i]))]
                anchor = np.unravel_index(flat, m.shape)
            draw = _draw_crop(rng, self.images[i].shape[:self.ndim], crop, self.rotate, anchor)
            finish = self._draw_finish(rng, tuple(crop) + channels)
            if not lo <= k < hi:
                continue
            arrays = [self.images[i], self.targets[i]] + ([m] if m is not None else [])
            arrays = _apply_crop(arrays, crop, draw)
            x.append(self._finish(arrays[0], finish))
            y.append(arrays[1])
            if self.masks is not None:
                w.append(np.ones(arrays[1].shape, np.float32) if m is None
                         else arrays[2].astype(np.float32))
        out = {"image": np.stack(x), "target": np.stack(y)}
        if w:
            out["mask"] = np.stack(w)
        if unlabeled_batch:
            if not self.unlabeled:
                raise InputError("unlabeled_batch > 0 but the unlabeled pool is empty")
            lo, hi = part_rows(unlabeled_batch, part)
            if self.stripes:
                out["unlabeled"] = self._striped(rng, crop, unlabeled_batch, lo, hi)
                return out
            idx = rng.integers(len(self.unlabeled), size=unlabeled_batch)
            draws = [_draw_crop(rng, self.unlabeled[i].shape[:self.ndim], crop, self.rotate)
                     for i in idx]
            finishes = [self._draw_finish(rng, tuple(crop) + channels) for _ in idx]
            out["unlabeled"] = np.stack([
                self._finish(_apply_crop([self.unlabeled[idx[k]]], crop, draws[k])[0],
                             finishes[k]) for k in range(lo, hi)])
        return out

    def _striped(self, rng, crop, size, lo, hi):
        """Rows lo..hi of a striped unlabeled batch of `size`. The draws do not depend on the
        images (crop starts as fractions of the free range), so they are the same in every
        process whichever stripes it holds."""
        if size != self.stripes:
            raise InputError(f"the unlabeled pool is split into {self.stripes} stripes, one "
                             f"per row of the unlabeled batch, which has {size} rows")
        n, ndim = len(self.unlabeled), self.ndim
        position = rng.random(size)
        start = rng.random((size, ndim))
        flips = rng.random((size, ndim)) < 0.5
        rot = rng.random(size) < 0.5
        shape = tuple(crop) + (self.images[0].shape[-1],)
        finishes = [self._draw_finish(rng, shape) for _ in range(size)]
        rows = []
        for j in range(lo, hi):
            members = range(j % size, n, size)
            image = self.unlabeled[members[int(position[j] * len(members))]]
            free = np.asarray(image.shape[:ndim]) - np.asarray(crop) + 1
            if (free < 1).any():
                raise InputError(f"crop {tuple(crop)} is larger than an unlabeled image of "
                                 f"shape {image.shape[:ndim]}")
            draw = ((start[j] * free).astype(int).tolist(), list(flips[j]),
                    bool(self.rotate and crop[-1] == crop[-2] and rot[j]))
            rows.append(self._finish(_apply_crop([image], crop, draw)[0], finishes[j]))
        return np.stack(rows)

    def _draw_finish(self, rng, shape):
        return _draw_intensity(rng, shape, **self.intensity) if self.intensity else {}

    def _finish(self, crop, finish):
        crop = _apply_intensity(crop, finish) if finish else crop
        return self.crop_fn(crop) if self.crop_fn else crop
