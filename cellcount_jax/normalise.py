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
