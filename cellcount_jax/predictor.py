"""A trained model for prediction: `Predictor` (density maps, detections, tiles, flips,
input zoom and spacing), built by `model_folder.load_model` from a model folder's record and
parameters, or by training from its live state.
"""
import dataclasses
import itertools
from typing import Optional

import numpy as np
from scipy import ndimage

from cellcount_jax import cellsize, convolutions, models, postprocess, tiling, volumes
from cellcount_jax.errors import InputError
from cellcount_jax.normalise import Normaliser

# Default prediction tiles (`tiling_default`): in training crops per axis, the largest that fits.
TILE_CROPS = (4, 3, 2, 1)
CONTEXT_CROPS = 0.5
WINDOW_VALUES = 2 ** 25


@dataclasses.dataclass
class Detections:
    """Detected cells of one image: `pixels` and `physical` (n, ndim) coordinates in axis order
    ([z,] y, x), `density` (n,) the map's value at each, `count_integration` the map's mass
    divided by the mass of one dot's target, `count_corrected` the detections plus the cells
    that crowding hides (`evaluation.crowding`; their number where the model has none)."""
    pixels: np.ndarray
    physical: np.ndarray
    density: np.ndarray
    count_integration: float
    count_corrected: float

    def __len__(self):
        return len(self.pixels)


class Predictor:
    """A trained model: `density(image)` and `detect(image)` for images as read from their
    files, (*spatial[, channels]) in their own value range.

    model, params: the network; record: the inference record (`new_record`, calibrated for
    `detect`). Images of any size are predicted tile by tile (`tiling`): the network sees a
    window of the tile size plus context, as large as the record's `tiling` says (an image
    that fits in one tile is one network input); windows are reflect-padded to a multiple of 8
    where the image is smaller than a window, and cropped back.
    """

    def __init__(self, model, params, record: dict, step: Optional[int] = None):
        self.model, self.params, self.record, self.step = model, params, record, step
        self.normaliser = Normaliser.from_json(record["normalisation"])
        self.ndim = int(record["ndim"])
        self.spacing = tuple(record["spacing"])
        self._fn = convolutions.jit(lambda p, x: model.apply({"params": p}, x[None], train=False)[0])

    def _as_image(self, image):
        image = np.asarray(image)
        if image.ndim == self.ndim:
            image = image[..., None]
        channels = self.record["channels"]
        if image.ndim != self.ndim + 1 or image.shape[-1] != channels:
            raise InputError(f"the model takes {self.ndim}D images with {channels} channel(s) "
                             f"({'z, ' if self.ndim == 3 else ''}y, x[, c]), got shape "
                             f"{image.shape}")
        return image

    @property
    def tta(self) -> bool:
        """Test-time augmentation (the record's `test_time_augmentation`): each window's
        density is the mean over its flips (`augmentations`)."""
        return bool(self.record.get("test_time_augmentation", False))

    def augmentations(self):
        """The (flipped axes, transposed) pairs of test-time augmentation: every combination
        of flips of the spatial axes, each also with the last two axes swapped where their
        spacing is equal (2D: the 8 symmetries of the square; 3D: 16)."""
        swaps = (False, True) if self.spacing[-1] == self.spacing[-2] else (False,)
        flips = [tuple(a for a, on in enumerate(f) if on)
                 for f in itertools.product((False, True), repeat=self.ndim)]
        return [(f, s) for f in flips for s in swaps]

    @property
    def zoom(self) -> float:
        """The input zoom (the record's `zoom`, chosen by calibration among `predict.zooms`;
        1 where absent): the network sees each window resampled by this factor (linear
        interpolation), and its density is resampled back onto the window's grid."""
        return float(self.record.get("zoom", 1.0))

    def network(self, x) -> np.ndarray:
        """The density (*spatial) of one normalised network input (*spatial, C) of any size,
        seen at `zoom`; with `tta`, the mean of the densities of its `augmentations`, each
        mapped back."""
        if self.zoom == 1:
            return self._flips(x)
        d = self._flips(ndimage.zoom(x, (self.zoom,) * self.ndim + (1,), order=1))
        return ndimage.zoom(d, np.divide(x.shape[:-1], d.shape), order=1)

    def _flips(self, x) -> np.ndarray:
        if not self.tta:
            return self._network(x)
        last = (self.ndim - 2, self.ndim - 1)
        total = 0.0
        for axes, swap in self.augmentations():
            y = np.flip(x, axes) if axes else x
            d = self._network(np.ascontiguousarray(np.swapaxes(y, *last) if swap else y))
            d = np.swapaxes(d, *last) if swap else d
            total = total + (np.flip(d, axes) if axes else d)
        return (total / len(self.augmentations())).astype(np.float32)

    def _network(self, x) -> np.ndarray:
        m = 2 ** (models.LEVELS - 1)
        spatial = x.shape[:-1]
        pad = [(0, -s % m) for s in spatial] + [(0, 0)]
        padded = np.pad(x, pad, mode="reflect" if min(spatial) > m else "edge")
        return np.asarray(self._fn(self.params, padded))[tuple(slice(0, s) for s in spatial)]

    def tiling(self, tile=None, context=None):
        """(tile, context) in voxels per axis: the given ones, else the record's, else the
        default multiples of the training crop (`tiling_default`)."""
        default = self.record.get("tiling") or tiling_default(
            self.record["train_crop"], self.record["network"]["features"])
        tile = default["tile"] if tile is None else tile
        context = default["context"] if context is None else context
        return (tuple(int(t) for t in np.broadcast_to(tile, (self.ndim,))),
                tuple(int(c) for c in np.broadcast_to(context, (self.ndim,))))

    def _tiles(self, image, normalised, detect, tile, context):
        image = self._as_image(image)
        volume = volumes.ArrayVolume(image.astype(np.float32, copy=False), self.ndim)
        affine = self.normaliser.affine(image, normalised)
        results = tiling.predict_tiles(self, volume, affine,
                                       tiling.grid(volume.shape, *self.tiling(tile, context)),
                                       detect=detect, keep_density=True)
        return tiling.assemble(results, volume.shape)

    def density(self, image, normalised: bool = False, tile=None, context=None) -> np.ndarray:
        """The density map (*spatial) of an image; `normalised`: the image has already been
        through `Normaliser.image` (the training pipeline's test images)."""
        return self._tiles(image, normalised, False, tile, context)[0]

    @property
    def calibrated(self) -> bool:
        return bool(self.record.get("detector"))

    def _check_calibrated(self):
        if not self.calibrated:
            raise InputError("the model has no calibrated detector yet (training did not finish "
                             "its calibration step); run `cellcount evaluate` on its folder")

    def peaks(self, density) -> np.ndarray:
        """Detections (n, ndim) in pixels of a density map with the calibrated detector."""
        self._check_calibrated()
        d = self.record["detector"]
        return postprocess.detect_with(density, d["threshold"], d["name"], d.get("min_size", 1),
                                       d.get("min_distance", 0.0), self.spacing,
                                       split=d.get("split", 0.0))

    def corrected_count(self, detections: int, pairs: float) -> float:
        """The count of `detections` with `pairs` close pairs among them (`close_pairs` at the
        record's crowding distance): detections + per_pair * pairs."""
        return postprocess.corrected_count(
            detections, pairs, (self.record.get("detector") or {}).get("crowding"))

    def detections(self, pixels, density_at, mass, pairs=0.0, spacing=None) -> Detections:
        """Detections at `pixels`, their physical coordinates in `spacing` (default the
        model's)."""
        pixels = np.asarray(pixels, np.float32).reshape(-1, self.ndim)
        spacing = self.spacing if spacing is None else spacing
        return Detections(pixels, pixels * np.asarray(spacing, np.float32),
                          np.asarray(density_at, np.float32),
                          float(mass / self.record["target"]["mass_per_dot"]),
                          self.corrected_count(len(pixels), pairs))

    def detections_of(self, density) -> Detections:
        """Detections of a whole density map with the calibrated detector and threshold."""
        pts = self.peaks(density)
        at = density[tuple(postprocess.nearest_pixel(pts, density.shape).T)] if len(pts) \
            else np.zeros(0)
        crowd = self.record["detector"].get("crowding")
        pairs = postprocess.close_pairs(pts, crowd["distance"], self.spacing) if crowd else 0.0
        return self.detections(pts, at, density.sum(dtype=np.float64), pairs)

    def detect(self, image, normalised: bool = False, tile=None, context=None, spacing=None,
               diameter=None) -> Detections:
        """Detections of an image, tile by tile (each tile keeps the cells it owns).

        spacing, diameter: the image's voxel spacing and its cells' diameter (`input_zoom`;
        e.g. diameter=30 for cells of 30 pixels, 'auto' to estimate it): the network sees the
        image resampled by the zoom they give, and the detections come back in the image's
        pixels (physical coordinates in `spacing`, default the model's)."""
        self._check_calibrated()
        zoom, _ = self.input_zoom(image, spacing, diameter)
        if np.allclose(zoom, 1):
            density, pts, at, pairs = self._tiles(image, normalised, True, tile, context)
        else:
            image = self._as_image(image).astype(np.float32, copy=False)
            grid = tiling.Resampled(volumes.ArrayVolume(image, self.ndim, channel_axis=self.ndim),
                                    zoom).read()
            density, pts, at, pairs = self._tiles(grid, normalised, True, tile, context)
            pts = np.asarray(pts, np.float64).reshape(-1, self.ndim) / zoom
        return self.detections(pts, at, density.sum(dtype=np.float64), pairs,
                               self.input_spacing(spacing))

    def input_spacing(self, spacing=None) -> np.ndarray:
        """An input's voxel spacing, (ndim,) physical: `spacing` (one value per axis, or one
        for every axis), else the model's."""
        model = np.asarray(self.spacing, np.float64)
        spacing = model if spacing is None else np.ravel(np.asarray(spacing, np.float64))
        spacing = np.repeat(spacing, self.ndim) if len(spacing) == 1 else spacing
        if spacing.shape != model.shape or not np.all(spacing > 0):
            raise InputError(f"--spacing must be {self.ndim} positive values (or one for every "
                             f"axis), got {spacing.tolist()}")
        return spacing

    def input_grid(self, volume, spacing=None, diameter=None):
        """(the `volumes.Volume` on the network's grid, zoom, diameter used or None): `volume`
        itself where `input_zoom` gives 1, else a `tiling.Resampled` view of it, read region
        by region."""
        zoom, used = self.input_zoom(volume, spacing, diameter)
        return (volume if np.allclose(zoom, 1) else tiling.Resampled(volume, zoom)), zoom, used

    @property
    def cell_diameter(self) -> Optional[float]:
        """The training cells' typical diameter, physical units (the record's `cell_size`);
        None for a model recorded without one."""
        return (self.record.get("cell_size") or {}).get("diameter")

    def input_zoom(self, image, spacing=None, diameter=None):
        """(zoom (ndim,), diameter used or None): the resampling of an input for the network
        (per axis, > 1 enlarges it), that brings its voxels to the model's spacing and, with
        `diameter`, its cells to the size of the training cells.

        image: the input, (*spatial[, C]) array or `volumes.Volume` (read for 'auto' only);
        spacing: its voxel spacing (None: the model's); diameter: None (the cells are as large
        as the training cells), the cells' typical diameter in the units of `spacing` (without
        it: in pixels of the last axis, the model's anisotropy assumed), or 'auto'
        (`cellsize.estimate` on the input, with the training cells' polarity). With a
        diameter D the input's grid is taken to have the spacing `spacing * model diameter /
        D`; the zoom is that spacing / the model's."""
        model = np.asarray(self.spacing, np.float64)
        unit = self.input_spacing(spacing)
        if diameter is None:
            return unit / model, None
        if not self.cell_diameter:
            raise InputError("the model records no cell size (its inference.json has no "
                             "'cell_size' diameter: trained before cell sizes were recorded, or "
                             "without dots), so a --diameter cannot be matched to it; predict "
                             "without --diameter (with --spacing where the voxels differ)")
        unit = unit if spacing is not None else model / model[-1]
        if isinstance(diameter, str) and diameter == "auto":
            polarity = self.record["cell_size"].get("polarity", "bright")
            diameter = cellsize.estimate(image, unit, polarity)
        else:
            try:
                value = float(diameter)
            except (TypeError, ValueError):
                value = float("nan")
            if not np.isfinite(value) or value <= 0:
                raise InputError(f"--diameter must be a positive number (the cells' diameter) "
                                 f"or 'auto', got {diameter!r}")
            diameter = value
        return unit * (self.cell_diameter / diameter) / model, diameter


def tiling_default(train_crop, features: int = 16) -> dict:
    """Tiles of the largest of TILE_CROPS training crops whose window (with CONTEXT_CROPS of a
    crop on each side) keeps one full-resolution feature map of the network within
    WINDOW_VALUES values (128 MB in float32), so that memory stays bounded for any network."""
    crop = np.asarray(train_crop, np.float64)
    context = np.round(crop * CONTEXT_CROPS).astype(int)
    for crops in TILE_CROPS:
        tile = np.round(crop * crops).astype(int)
        if np.prod(tile + 2 * context) * features <= WINDOW_VALUES:
            break
    return {"tile": [int(t) for t in tile], "context": [int(c) for c in context]}


def create_model(record: dict, impl: str = "auto"):
    """The SAU-Net of an inference record, for inference (float32, no dropout)."""
    return models.SAUNet(features=record["network"]["features"], dropout=0.0,
                         impl=convolutions.resolve_impl(impl))
