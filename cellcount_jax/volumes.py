"""Images read lazily, region by region: volumes far larger than memory.

`open_volume(path, ndim)` gives a `Volume`: its spatial `shape`, `channels`, `dtype`, and
`read(box)`, the float32 (*box, channels) array of a box of ((start, stop), ...) per spatial
axis. Only that box is read from disk. Sources:
- a TIFF or BigTIFF: memory-mapped when its pixels are stored uncompressed and contiguous
  (`tifffile.memmap`), else through tifffile's chunked zarr view (`aszarr`, needs `zarr`:
  `pip install '.[big]'`), else read whole (small compressed files only);
- a zarr array or an OME-Zarr image (`*.zarr`; the first multiscale level; axes from its
  metadata, `t` must have length 1, `c` becomes the last axis), needs `zarr`;
- a folder of 2D PNG/TIFF planes: one z-stack, planes in natural order (`plane2` before
  `plane10`), each plane read when a box needs it;
- an array already in memory (`ArrayVolume`).
"""
import dataclasses
import os
import re
from typing import Tuple

import numpy as np
import tifffile
from PIL import Image

from cellcount_jax.errors import InputError
from cellcount_jax.data.io import IMAGE_EXTENSIONS

# Compressed TIFFs without zarr are read whole up to this size (bytes).
WHOLE_READ_LIMIT = 2 ** 31

Box = Tuple[Tuple[int, int], ...]


def _zarr():
    try:
        import zarr
    except ImportError as e:
        raise InputError("reading zarr (and compressed TIFFs lazily) needs the optional "
                         "dependencies: pip install 'cellcount_jax[big]'") from e
    return zarr


def natural_key(name: str):
    """Sort key that orders embedded numbers by value: z2 < z10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


class Volume:
    """A lazily read image: spatial `shape`, `channels`, `dtype`, `read(box)`."""
    shape: Tuple[int, ...]
    channels: int
    dtype: np.dtype
    name: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def _read(self, index) -> np.ndarray:
        raise NotImplementedError

    def read(self, box: Box = None) -> np.ndarray:
        """float32 (*box sizes, channels) of the box ((start, stop) per spatial axis; None:
        everything)."""
        box = tuple((0, s) for s in self.shape) if box is None else tuple(box)
        if len(box) != self.ndim or any(not 0 <= a <= b <= s for (a, b), s in zip(box, self.shape)):
            raise ValueError(f"box {box} outside a volume of shape {self.shape}")
        out = np.asarray(self._read(tuple(slice(a, b) for a, b in box)))
        out = out.reshape(*(b - a for a, b in box), self.channels).astype(np.float32)
        if np.issubdtype(self.dtype, np.floating) and not np.isfinite(out).all():
            where = getattr(self, "path", None) or getattr(self, "folder", None) or self.name
            raise InputError(f"{where}: image contains NaN or inf")
        return out

    def spec(self):
        """What a worker process needs to open the same volume (picklable)."""
        raise NotImplementedError


@dataclasses.dataclass
class ArrayVolume(Volume):
    """An array-like (numpy, np.memmap, zarr) of (*spatial[, channels]) or with the channel
    axis at `channel_axis`."""
    array: object
    ndim_: int
    name: str = "image"
    channel_axis: int = None
    path: str = None
    kind: str = "array"

    def __post_init__(self):
        shape = tuple(int(s) for s in self.array.shape)
        if self.channel_axis is None and len(shape) == self.ndim_ + 1 and shape[-1] <= 4:
            self.channel_axis = len(shape) - 1
        if self.channel_axis is not None:
            self.channels = shape[self.channel_axis]
            self.shape = tuple(s for i, s in enumerate(shape) if i != self.channel_axis)
        else:
            self.channels, self.shape = 1, shape
        if len(self.shape) != self.ndim_:
            raise InputError(f"{self.path or self.name}: expected a {self.ndim_}D image "
                             f"({'Z, Y, X' if self.ndim_ == 3 else 'Y, X'}[, channels]), got "
                             f"shape {shape}")
        self.dtype = np.dtype(self.array.dtype)
        if not (np.issubdtype(self.dtype, np.integer) or np.issubdtype(self.dtype, np.floating)
                or self.dtype == bool):
            raise InputError(f"{self.path or self.name}: unsupported pixel type {self.dtype}")

    def _read(self, index):
        if self.channel_axis is None:
            return self.array[index]
        full = list(index)
        full.insert(self.channel_axis, slice(None))
        return np.moveaxis(np.asarray(self.array[tuple(full)]), self.channel_axis, -1)

    def spec(self):
        if self.path is None:
            return ("array", self)
        return ("path", self.path, self.ndim_)


@dataclasses.dataclass
class PlaneFolder(Volume):
    """A folder of 2D planes as one (Z, Y, X[, C]) stack, planes in natural order."""
    folder: str

    def __post_init__(self):
        if not os.path.isdir(self.folder):
            raise InputError(f"{self.folder}: not a folder")
        names = sorted((f for f in os.listdir(self.folder) if f.lower().endswith(IMAGE_EXTENSIONS)),
                       key=natural_key)
        if not names:
            raise InputError(f"{self.folder}: no PNG/TIFF planes")
        self.paths = [os.path.join(self.folder, f) for f in names]
        first = self._plane(0)
        self.plane_shape = first.shape
        if first.ndim not in (2, 3) or (first.ndim == 3 and first.shape[-1] > 4):
            raise InputError(f"{self.paths[0]}: a z-stack plane must be 2D (Y, X[, C]), got "
                             f"shape {first.shape}")
        self.shape = (len(self.paths),) + first.shape[:2]
        self.channels = first.shape[2] if first.ndim == 3 else 1
        self.dtype = first.dtype
        self.name = os.path.basename(os.path.normpath(self.folder))

    def _plane(self, z):
        path = self.paths[z]
        try:
            if path.lower().endswith((".tif", ".tiff")):
                try:
                    return _MappedOnRead(path)
                except ValueError:  # compressed: read the plane
                    return tifffile.imread(path)
            with Image.open(path) as im:
                return np.asarray(im)
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file to the user
            raise InputError(f"{path}: cannot read plane ({e})") from e

    def _read(self, index):
        planes = []
        for z in range(*index[0].indices(self.shape[0])):
            p = self._plane(z)
            if p.shape != self.plane_shape:
                raise InputError(f"{self.paths[z]}: plane shape {p.shape} differs from the "
                                 f"first plane's {self.plane_shape}")
            planes.append(np.asarray(p[index[1:]]))
        return np.stack(planes) if planes else np.zeros((0,) + self.plane_shape)[index]

    def spec(self):
        return ("path", self.folder, 3)


def _ome_zarr(path: str, group, ndim: int):
    """The first level of an OME-Zarr image group and the index of its channel axis."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise InputError(f"{path}: a zarr group without OME-Zarr multiscales metadata; give "
                         f"the path of an array inside it")
    ms = multiscales[0]
    array = group[ms["datasets"][0]["path"]]
    axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
    if not axes:
        return array, None, None
    index, channel_axis = [], None
    for i, a in enumerate(axes):
        if a == "t":
            if array.shape[i] != 1:
                raise InputError(f"{path}: a time series ({array.shape[i]} time points); give "
                                 f"one time point")
            index.append(0)
        else:
            index.append(slice(None))
    kept = [a for a in axes if a != "t"]
    if "c" in kept:
        channel_axis = kept.index("c")
    if len(kept) - (channel_axis is not None) != ndim:
        raise InputError(f"{path}: axes {axes}, the model takes {ndim}D images")
    return array, tuple(index), channel_axis


class _Indexed:
    """A view that fixes some leading indices (an OME-Zarr `t` axis) of an array-like."""

    def __init__(self, array, index):
        self.array, self.index = array, index
        self.shape = tuple(s for s, i in zip(array.shape, index) if isinstance(i, slice))
        self.dtype = array.dtype

    def __getitem__(self, key):
        key = iter(key)
        return self.array[tuple(next(key) if isinstance(i, slice) else i for i in self.index)]


class _MappedOnRead:
    """The pixels of an uncompressed, contiguous TIFF, memory-mapped for each read only: a
    mapping kept open would hold every page read so far in the process's resident memory."""

    def __init__(self, path):
        mapped = tifffile.memmap(path, mode="r")  # ValueError unless uncompressed, contiguous
        self.path, self.offset = path, mapped.offset
        self.shape, self.dtype, self.ndim = mapped.shape, mapped.dtype, mapped.ndim
        del mapped

    def __getitem__(self, index):
        mapped = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        try:
            return np.array(mapped[index])
        finally:
            del mapped


def is_zarr(path: str) -> bool:
    """Whether `path` is a zarr array or group (`*.zarr`, or a folder holding zarr's
    metadata: .zarray, .zgroup or zarr.json)."""
    return path.rstrip("/").lower().endswith(".zarr") or any(
        os.path.exists(os.path.join(path, f)) for f in (".zarray", ".zgroup", "zarr.json"))


def open_volume(path: str, ndim: int) -> Volume:
    """The image at `path` (see the module docstring) as a lazily read `Volume`."""
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if is_zarr(path):
        zarr = _zarr()
        try:
            node = zarr.open(path, mode="r")
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: cannot open as zarr ({e})") from e
        if hasattr(node, "shape"):
            return ArrayVolume(node, ndim, name, path=path, kind="zarr")
        array, index, channel_axis = _ome_zarr(path, node, ndim)
        if index is not None and any(not isinstance(i, slice) for i in index):
            array = _Indexed(array, index)
        return ArrayVolume(array, ndim, name, channel_axis, path=path, kind="ome-zarr")
    if os.path.isdir(path):
        if ndim != 3:
            raise InputError(f"{path}: a folder is one z-stack of planes, which needs a 3D model")
        return PlaneFolder(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file or folder")
    if path.lower().endswith((".tif", ".tiff")):
        try:
            return ArrayVolume(_MappedOnRead(path), ndim, name, path=path, kind="tiff-memmap")
        except ValueError:
            pass  # compressed or not contiguous
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: cannot read image ({e})") from e
        try:
            import zarr
        except ImportError:
            zarr = None
        if zarr is not None:
            store = tifffile.imread(path, aszarr=True)
            return ArrayVolume(zarr.open(store, mode="r"), ndim, name, path=path, kind="tiff-zarr")
        if os.path.getsize(path) > WHOLE_READ_LIMIT:
            _zarr()
    from cellcount_jax.data import io
    return ArrayVolume(io.read_image(path, ndim), ndim, name, path=path, kind="in-memory")


def open_spec(spec) -> Volume:
    """The volume of `Volume.spec()` (in a worker process)."""
    if spec[0] == "array":
        return spec[1]
    return open_volume(spec[1], spec[2])
