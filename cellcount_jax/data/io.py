"""Reading and writing the files users have: PNG/TIFF images, dot CSVs, label masks.

Images come back as float32 (*spatial, channels) arrays in their original value range;
normalisation is the dataset's job. Dots are (n, ndim) float32 pixel coordinates in axis
order ([z,] y, x). Every problem raises one `ValueError` naming the file.
"""
import csv
import os

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from cellcount_jax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff")


def read_image(path: str, ndim: int, channels: int = None):
    """An image as float32 (*spatial, channels).

    2D: grey (H, W) or colour (H, W, 3|4; alpha dropped). 3D: a ZYX stack (Z, Y, X) or
    (Z, Y, X, C). `channels`, when given, is checked.
    """
    try:
        if path.lower().endswith((".tif", ".tiff")):
            a = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                a = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file to the user
        raise InputError(f"{path}: cannot read image ({e})") from e
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{path}: unsupported pixel type {a.dtype}")
    if a.ndim == ndim:
        a = a[..., None]
    elif not (a.ndim == ndim + 1 and a.shape[-1] <= 4):
        raise InputError(f"{path}: expected a {ndim}D image ({'Z, Y, X' if ndim == 3 else 'Y, X'}"
                         f"[, channels]), got shape {a.shape}")
    if ndim == 2 and a.shape[-1] == 4:
        a = a[..., :3]
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError(f"{path}: image contains NaN or inf")
    if channels is not None and a.shape[-1] != channels:
        raise InputError(f"{path}: expected {channels} channel(s), got {a.shape[-1]}")
    return a


def _axis_columns(header, ndim, path):
    names = [h.strip().lower() for h in header]
    wanted = ["z", "y", "x"][3 - ndim:]
    if all(w in names for w in wanted):
        return [names.index(w) for w in wanted]
    # napari points layer: index, axis-0, axis-1[, axis-2]
    napari = [f"axis-{i}" for i in range(ndim)]
    if all(w in names for w in napari):
        return [names.index(w) for w in napari]
    raise InputError(f"{path}: header {header} names no {','.join(wanted)} columns "
                     f"(or napari's {','.join(napari)})")


def read_dots_csv(path: str, ndim: int):
    """Dots from a CSV whose header names the axes (`y,x`, `z,y,x`, or napari's `axis-i`)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise InputError(f"{path}: cannot read dots ({e})") from e
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{path}: empty dot file (expected a header such as "
                         f"{'z,y,x' if ndim == 3 else 'y,x'})")
    cols = _axis_columns(rows[0], ndim, path)
    try:
        dots = np.array([[float(r[c]) for c in cols] for r in rows[1:]], np.float32)
    except (ValueError, IndexError) as e:
        raise InputError(f"{path}: bad number in dot file ({e})") from e
    return dots.reshape(-1, ndim)


def dots_from_mask(mask: np.ndarray):
    """Centroids (n, ndim) of the objects of a label or binary mask (how full annotations
    become dots): each label value is one object; a binary mask is split into face-connected
    components."""
    mask = np.asarray(mask)
    if mask.dtype == bool or len(np.unique(mask)) <= 2:
        labels, n = ndimage.label(mask > 0)
    else:
        labels = mask.astype(np.int64)
        n = None
    index = np.arange(1, n + 1) if n is not None else np.unique(labels[labels > 0])
    if len(index) == 0:
        return np.zeros((0, mask.ndim), np.float32)
    return np.asarray(ndimage.center_of_mass(np.ones(mask.shape), labels, index),
                      np.float32).reshape(-1, mask.ndim)


def dots_from_red_pixels(path: str):
    """VGG-style dot image: one pure-red (255, 0, 0) pixel per cell; pixels, not blobs."""
    a = read_image(path, 2)
    if a.shape[-1] < 3:
        raise InputError(f"{path}: a VGG dot image must be RGB, got {a.shape[-1]} channel(s)")
    red = (a[..., 0] == 255) & (a[..., 1] == 0) & (a[..., 2] == 0)
    return np.argwhere(red).astype(np.float32)


def detection_columns(ndim: int, extra=(), name: bool = False) -> list:
    """The header of a detections CSV (`cellcount predict`'s, a model folder's
    eval_detections.csv): with `name`, the image's name first; the pixel coordinates as napari
    names them (`axis-0` ..., which `read_dots_csv` and napari's CSV reader take as they are),
    the physical ones (`[z_physical,] y_physical, x_physical`), then the `extra` columns."""
    axes = "zyx"[3 - ndim:]
    return (["name"] * name + [f"axis-{i}" for i in range(ndim)]
            + [f"{a}_physical" for a in axes] + list(extra))


def detection_rows(pixels, spacing, extra=(), name: str = None) -> str:
    """The CRLF-terminated rows of `detection_columns` for points (n, ndim) in pixels: `name`
    first where given, pixel coordinates to 3 decimals, physical ones (pixels * spacing) to 4,
    then each of the `extra` arrays (n,) to 4 significant digits."""
    pixels = np.asarray(pixels, np.float64).reshape(-1, len(spacing))
    physical = pixels * np.asarray(spacing, np.float64)
    lead = [] if name is None else [name]
    return "".join(",".join(lead + [f"{v:.3f}" for v in p] + [f"{v:.4f}" for v in q]
                            + [f"{e[i]:.4g}" for e in extra]) + "\r\n"
                   for i, (p, q) in enumerate(zip(pixels, physical)))


def list_images(folder: str):
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: not a folder")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def read_roi(path: str, shape):
    """The annotated region of an image of spatial `shape` as a bool mask.

    `<stem>.csv`: boxes, one per row, header `y0,x0,y1,x1` (3D: `z0,y0,x0,z1,y1,x1`), pixel
    ranges start inclusive, end exclusive; the region is their union. `<stem>.tif|.tiff|.png`:
    a mask, nonzero inside.
    """
    ndim = len(shape)
    if path.lower().endswith(".csv"):
        axes = ["z", "y", "x"][3 - ndim:]
        wanted = [f"{a}0" for a in axes] + [f"{a}1" for a in axes]
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
        except OSError as e:
            raise InputError(f"{path}: cannot read the region of interest ({e})") from e
        names = [h.strip().lower() for h in rows[0]] if rows else []
        if not all(w in names for w in wanted):
            raise InputError(f"{path}: a box file needs the header {','.join(wanted)}, got {names}")
        mask = np.zeros(shape, bool)
        for r in rows[1:]:
            try:
                b = [int(round(float(r[names.index(w)]))) for w in wanted]
            except (ValueError, IndexError) as e:
                raise InputError(f"{path}: bad number in a box ({e})") from e
            lo, hi = np.clip(b[:ndim], 0, shape), np.clip(b[ndim:], 0, shape)
            if np.any(hi <= lo):
                raise InputError(f"{path}: box {b} is empty inside an image of shape "
                                 f"{tuple(shape)}")
            mask[tuple(slice(a, z) for a, z in zip(lo, hi))] = True
    else:
        mask = read_image(path, ndim)[..., 0] != 0
        if mask.shape != tuple(shape):
            raise InputError(f"{path}: region mask shape {mask.shape} differs from the image "
                             f"shape {tuple(shape)}")
    if not mask.any():
        raise InputError(f"{path}: the region of interest is empty")
    return mask
