"""Prediction tile by tile: a core that a tile owns, inside a window with context around it.

The bottleneck self-attention is global, so the network input size is part of the method: a
tile's window (core + `context` voxels on each side) is what the network sees. A window is
slid inside the image at its borders instead of being padded, so every window of an image
has the same shape (one compilation) and sees real voxels; only an image smaller than a
window on some axis is reflect-padded (to a multiple of 8, as a whole image is). Detections
are made on the window's density and kept where their position, rounded to the nearest
voxel, lies in the core: the cores partition the image, so a cell on a seam is counted once
(as StarDist's `predict_instances_big` does with its blocks).

An image that fits in one core is predicted whole, exactly as without tiling.
"""
import dataclasses
import itertools
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

from cellcount_jax import postprocess
from cellcount_jax.errors import InputError
from cellcount_jax.volumes import Volume

Box = Tuple[Tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Tile:
    index: int
    core: Box
    window: Box

    @property
    def core_size(self) -> int:
        return int(np.prod([b - a for a, b in self.core]))


def _sizes(values, ndim, name):
    values = tuple(int(v) for v in (values if np.ndim(values) else [values] * ndim))
    if len(values) != ndim or any(v < 0 for v in values):
        raise InputError(f"{name} must be {ndim} non-negative sizes in voxels, got {values}")
    return values


def grid(shape: Sequence[int], tile: Sequence[int], context: Sequence[int]):
    """The tiles of an image of spatial `shape`: cores of `tile` voxels per axis (the last
    ones shorter) in C order, each in a window of the same size (`tile + 2 context`) that holds
    the core and, where the image allows, `context` voxels on each side. Along an axis that one
    window spans (size <= tile + 2 context) there is one core, the whole axis."""
    ndim = len(shape)
    tile, context = _sizes(tile, ndim, "the tile"), _sizes(context, ndim, "the context")
    if any(t == 0 for t in tile):
        raise InputError(f"the tile must be at least 1 voxel per axis, got {tile}")
    axes = []
    for s, t, c in zip(shape, tile, context):
        if t + 2 * c >= s:  # one window spans the axis: one core covers it
            axes.append([((0, s), (0, s))])
            continue
        w = t + 2 * c
        axes.append([((a, min(a + t, s)), (ws, ws + w))
                     for a in range(0, s, t) for ws in [int(np.clip(a - c, 0, s - w))]])
    return [Tile(i, tuple(a[0] for a in combo), tuple(a[1] for a in combo))
            for i, combo in enumerate(itertools.product(*axes))]


def owned(points, core: Box):
    """Bool (n,): points (n, ndim), in pixels, whose nearest voxel lies in `core`."""
    idx = postprocess.nearest_pixel(points)
    lo, hi = np.array([a for a, _ in core]), np.array([b for _, b in core])
    return np.all((idx >= lo) & (idx < hi), axis=1)


class Resampled(Volume):
    """A volume seen on another voxel grid: voxel j of the new grid is at `j / zoom` of the
    source (per axis; zoom = source spacing / target spacing), linearly interpolated. Each
    voxel depends only on its source neighbours, so any tiling gives the same values."""

    def __init__(self, volume: Volume, zoom: Sequence[float]):
        self.volume, self.zoom = volume, np.asarray(zoom, np.float64)
        self.shape = tuple(max(1, int(np.floor((s - 1) * z)) + 1)
                           for s, z in zip(volume.shape, self.zoom))
        # Interpolated values are not the source's integers: statistics treat them as floats.
        self.channels, self.dtype, self.name = volume.channels, np.dtype(np.float32), volume.name

    def read(self, box: Box = None) -> np.ndarray:
        box = tuple((0, s) for s in self.shape) if box is None else tuple(box)
        coords = [np.arange(a, b) / z for (a, b), z in zip(box, self.zoom)]
        src = tuple((max(int(np.floor(c[0])), 0), min(int(np.floor(c[-1])) + 2, s))
                    for c, s in zip(coords, self.volume.shape))
        block = self.volume.read(src)
        mesh = np.meshgrid(*[c - a for c, (a, _) in zip(coords, src)], indexing="ij")
        out = np.empty(tuple(b - a for a, b in box) + (self.channels,), np.float32)
        for ch in range(self.channels):
            out[..., ch] = ndimage.map_coordinates(block[..., ch], mesh, order=1, mode="nearest")
        return out

    def spec(self):
        return ("resampled", self.volume.spec(), tuple(self.zoom.tolist()))


@dataclasses.dataclass
class TileResult:
    """One tile's detections (in the pixels of the image the tiles cover), the density at
    each, the map's mass in the core, the core's density (when asked for), and its share of the
    image's close pairs of detections (`postprocess.close_pairs`, for the corrected count)."""
    tile: Tile
    pixels: np.ndarray
    density: np.ndarray
    mass: float
    core_density: np.ndarray = None
    pairs: float = 0.0


def predict_tiles(predictor, volume: Volume, affine, tiles, detect: bool = True,
                  keep_density: bool = False):
    """`TileResult`s of `tiles` of `volume`, one at a time: the network on each window,
    normalised by the whole image's `affine` (`Normaliser.affine`), detections (when `detect`
    and the model is calibrated) kept where the core owns them."""
    for tile in tiles:
        x = predictor.normaliser.apply(volume.read(tile.window), affine)
        density = predictor.network(x)
        start = np.array([a for a, _ in tile.window])
        core = tuple(slice(a - s, b - s) for (a, b), s in zip(tile.core, start))
        pts, at = np.zeros((0, volume.ndim), np.float32), np.zeros(0, np.float32)
        pairs = 0.0
        if detect and predictor.calibrated:
            pts = predictor.peaks(density)
            mine = owned(pts + start, tile.core)
            crowd = predictor.record["detector"].get("crowding")
            if crowd:
                pairs = postprocess.close_pairs(pts, crowd["distance"], predictor.spacing, mine)
            pts = pts[mine]
            at = density[tuple(postprocess.nearest_pixel(pts, density.shape).T)].astype(
                np.float32)
            pts = (pts + start).astype(np.float32)
        core_density = density[core]
        yield TileResult(tile, pts, at, float(core_density.sum(dtype=np.float64)),
                         np.ascontiguousarray(core_density) if keep_density else None, pairs)


def assemble(results, shape):
    """The whole density map (*shape), detections, density at each and close pairs of the
    `TileResult`s of one image (with their core densities)."""
    density = np.empty(shape, np.float32)
    pts, at, pairs = [], [], 0.0
    for r in results:
        density[tuple(slice(a, b) for a, b in r.tile.core)] = r.core_density
        pts.append(r.pixels)
        at.append(r.density)
        pairs += r.pairs
    return density, np.concatenate(pts), np.concatenate(at), pairs
