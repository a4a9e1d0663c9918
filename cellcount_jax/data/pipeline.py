"""Datasets: splits of labeled, unlabeled and held-out images, ready for training.

`load(config[, part])` returns `Splits` (the training `Dataset`, the test and calibration
`Split`s, the spacing, the fitted `Normaliser`, a summary). Sources
(`config.data.source`): 'synthetic' (embedded generator), 'vgg' (VGG cells, the paper's
split), 'folder' (your own images with dot CSVs or label masks). Each source reads only the
unlabeled images a process needs where the pool is striped (`config.data.shard_unlabeled`).
"""
import dataclasses
import os
import warnings
from typing import List, Optional

import numpy as np
from scipy import ndimage

from cellcount_jax.data import io
from cellcount_jax import distributed
from cellcount_jax.cellsize import nearest_dot_distance
from cellcount_jax.data.dataset import (Dataset, check_dots, make_targets, pad_dots, part_rows,
                                        striped)
from cellcount_jax.data.synthetic import synthetic_image, synthetic_set
from cellcount_jax.errors import InputError
from cellcount_jax.normalise import Normaliser
from cellcount_jax.postprocess import inside, nearest_pixel


@dataclasses.dataclass
class Split:
    """Images with names and, where known, dots (None for unlabeled images). rois: None
    (every image annotated everywhere) or one bool mask per image (None: the whole image)
    of the region its dots cover."""
    images: List[np.ndarray]
    dots: List[np.ndarray]
    names: List[str]
    rois: Optional[List[Optional[np.ndarray]]] = None

    def roi(self, i: int):
        return None if self.rois is None else self.rois[i]


@dataclasses.dataclass
class Splits:
    """What `load` prepares. train: the labeled images (targets, crops, augmentation) and the
    unlabeled pool; test: the held-out images (None when a folder source names none);
    spacing: physical voxel size per axis; normaliser: fitted on the training pool;
    calibration: the images (and regions) the detector is calibrated on; held_out: whether
    those are held-out bands of the labeled images (`calibration_split`); summary: the text
    training prints."""
    train: Dataset
    calibration: Split
    spacing: tuple
    test: Optional[Split] = None
    normaliser: Optional[Normaliser] = None
    held_out: bool = False
    summary: str = ""


def _all(count):
    return [True] * count


def _synthetic(cfg, keep=_all):
    kwargs = dict(shape=tuple(cfg.shape), num_cells=tuple(cfg.num_cells), radius=cfg.radius,
                  spacing=tuple(cfg.spacing), channels=cfg.channels)
    images, dots = synthetic_set(cfg.seed, cfg.num_labeled, **kwargs)
    unlabeled, _ = synthetic_set(cfg.seed + 1, cfg.num_unlabeled, keep(cfg.num_unlabeled),
                                 **kwargs)
    test_images, test_dots = synthetic_set(cfg.seed + 2, cfg.num_test, **kwargs)
    names = lambda p, n: [f"{p}{i:03d}" for i in range(n)]
    return (Split(images, dots, names("train", len(images))),
            Split(unlabeled, [None] * len(unlabeled), names("unlabeled", len(unlabeled))),
            Split(test_images, test_dots, names("test", len(test_images))))


def vgg_split(seed: int = 5455, labeled: int = 8, pool: int = 100):
    """The paper's VGG split (reference code): permutation(200) under np.random.seed(5455);
    labeled = ind[:8], unlabeled = ind[8:100], test = ind[100:] (0-based image indices)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        ind = np.random.permutation(200)
    finally:
        np.random.set_state(state)
    return ind[:labeled], ind[labeled:pool], ind[pool:]


def _vgg_image(path: str, i: int):
    return io.read_image(os.path.join(path, f"{i + 1:03d}cell.png"), 2, 3)


def vgg_labeled(path: str, indices) -> Split:
    """The VGG images of 0-based `indices` in the folder `path`, with their dots."""
    return Split([_vgg_image(path, i) for i in indices],
                 [io.dots_from_red_pixels(os.path.join(path, f"{i + 1:03d}dots.png"))
                  for i in indices],
                 [f"{i + 1:03d}cell" for i in indices])


def _vgg(cfg, keep=_all):
    path = cfg.path
    if not os.path.isdir(path):
        raise InputError(f"config.data.path: VGG cells folder {path!r} not found")
    lab, unl, test = vgg_split(cfg.split_seed, cfg.num_labeled)
    return (vgg_labeled(path, lab),
            Split([_vgg_image(path, i) if k else None for i, k in zip(unl, keep(len(unl)))],
                  [None] * len(unl), [f"{i + 1:03d}cell" for i in unl]),
            vgg_labeled(path, test))


def read_annotation(path: str, shape, image_path: str = "the image"):
    """Dots (n, ndim) of an image of spatial `shape` from a dot CSV or a label/binary mask."""
    ndim = len(shape)
    if path.lower().endswith(".csv"):
        d = io.read_dots_csv(path, ndim)
    else:
        mask = io.read_image(path, ndim)[..., 0]
        if mask.shape != tuple(shape):
            raise InputError(f"{path}: mask shape {mask.shape} differs from {image_path} "
                             f"shape {tuple(shape)}")
        d = io.dots_from_mask(mask)
    check_dots(d, shape, path)
    return d


def dot_intensity_rank(image, dots, sigma: float = 2.0) -> float:
    """Mean rank (0-1) among all pixels of the lightly smoothed image (channel mean) at the
    dots. Dots on cells rank high (fluorescence, ~0.9 on VGG and on the 3D nuclei data) or low
    (dark stained cells); dots of another image or on empty background rank like a typical
    pixel, near 0.5."""
    a = ndimage.gaussian_filter(np.asarray(image, np.float32).mean(-1), sigma)
    idx = tuple(nearest_pixel(dots, a.shape).T)
    return float(np.mean(np.searchsorted(np.sort(a, axis=None), a[idx]) / a.size))


def _files_by_stem(folder: str, stems, what: str):
    """{stem: path} of the CSV/image files of `folder`, each stem an image's."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: {what} folder not found")
    out = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in (".csv",) + io.IMAGE_EXTENSIONS:
            if stem in out:
                raise InputError(f"{folder}: two {what} files for {stem!r}")
            out[stem] = os.path.join(folder, f)
    orphans = sorted(set(out) - set(stems))
    if orphans:
        raise InputError(f"{folder}: {what} files without an image: {orphans[:5]}")
    return out


def read_folder(images_dir: str, annotations_dir: str, ndim: int, channels=None,
                roi_dir: str = "", skip=()):
    """Images of a folder and their annotations, matched by file stem.

    An annotation is `<stem>.csv` (dots, header naming the axes) or `<stem>.tif|.tiff|.png`
    (a label or binary mask, turned into dots by component centroids). Images without one are
    unlabeled. `roi_dir`: optional regions of interest of annotated images (`io.read_roi`:
    boxes or a mask per stem); an annotation then covers its region only, and an image without
    one is annotated everywhere. Returns a Split (dots None where unlabeled). Images of
    stems in `skip` (unlabeled ones) are not read: None in the Split.
    """
    files = io.list_images(images_dir)
    if not files:
        raise InputError(f"{images_dir}: no PNG or TIFF images")
    stems = [os.path.splitext(f)[0] for f in files]
    ann = _files_by_stem(annotations_dir, stems, "annotation") if annotations_dir else {}
    roi = _files_by_stem(roi_dir, stems, "region of interest") if roi_dir else {}
    unannotated = sorted(set(roi) - set(ann))
    if unannotated:
        raise InputError(f"{roi_dir}: regions of interest of images without an annotation: "
                         f"{unannotated[:5]}")
    images, dots, names, rois = [], [], [], []
    for f, stem in zip(files, stems):
        path = os.path.join(images_dir, f)
        if stem in skip and stem not in ann:
            images.append(None)
            dots.append(None)
            names.append(stem)
            rois.append(None)
            continue
        image = io.read_image(path, ndim, channels)
        d = read_annotation(ann[stem], image.shape[:-1], path) if stem in ann else None
        r = io.read_roi(roi[stem], image.shape[:-1]) if stem in roi else None
        dotted = None if d is None else inside(d, r)
        if dotted is not None and len(dotted) >= 3:
            rank = dot_intensity_rank(image, dotted)
            if 0.3 < rank < 0.7:
                warnings.warn(f"{ann[stem]}: its dots sit mostly on background of {path} (the "
                              f"image at the dots is no brighter or darker than a typical pixel: "
                              f"mean rank {rank:.2f}); is it the annotation of another image?",
                              stacklevel=2)
        images.append(image)
        dots.append(d)
        names.append(stem)
        rois.append(r)
    if channels is None and len({im.shape[-1] for im in images if im is not None}) > 1:
        raise InputError(f"{images_dir}: images have different channel counts")
    return Split(images, dots, names, rois if roi else None)


def _folder(cfg, keep=_all):
    test_names = set(cfg.test_names)
    skip = ()
    if keep is not _all:  # the unlabeled images (no annotation file, not held out) in order
        stems = [os.path.splitext(f)[0] for f in io.list_images(cfg.images)]
        annotated = (set(_files_by_stem(cfg.annotations, stems, "annotation"))
                     if cfg.annotations else set())
        pool = [n for n in stems if n not in annotated and n not in test_names]
        skip = {n for n, k in zip(pool, keep(len(pool))) if not k}
    split = read_folder(cfg.images, cfg.annotations, cfg.ndim, cfg.get("channels_expected"),
                        cfg.get("roi", ""), skip)
    missing = test_names - set(split.names)
    if missing:
        raise InputError(f"config.data.test_names: {sorted(missing)} not in {cfg.images}")

    def pick(keep):
        idx = [i for i, (n, d) in enumerate(zip(split.names, split.dots)) if keep(n, d)]
        return Split([split.images[i] for i in idx], [split.dots[i] for i in idx],
                     [split.names[i] for i in idx],
                     None if split.rois is None else [split.rois[i] for i in idx])

    labeled = pick(lambda n, d: n not in test_names and d is not None)
    unlabeled = pick(lambda n, d: n not in test_names and d is None)
    if cfg.test_images:
        test = read_folder(cfg.test_images, cfg.test_annotations, cfg.ndim,
                           roi_dir=cfg.get("test_roi", ""))
    else:
        test = pick(lambda n, d: n in test_names)
    if not test.images:
        return labeled, unlabeled, None
    if any(d is None for d in test.dots):
        missing = [n for n, d in zip(test.names, test.dots) if d is None]
        raise InputError(f"test images without an annotation: {missing[:5]}")
    return labeled, unlabeled, test


def summary(labeled: Split, unlabeled: Split, test: Optional[Split], spacing) -> str:
    """What a run trains and tests on, in a few lines: counts, sizes, channels, dots."""
    def sizes(split):
        shapes = sorted({im.shape[:-1] for im in split.images if im is not None})
        text = " ".join("x".join(map(str, s)) for s in shapes[:3])
        return text + (f" (+{len(shapes) - 3} more sizes)" if len(shapes) > 3 else "")

    def dots(split):
        n = [len(d) for d in split.dots]
        return f", dots per image {min(n)}-{max(n)} (mean {np.mean(n):.1f})"

    im = labeled.images[0]
    lines = [f"data: {im.ndim - 1}D, {im.shape[-1]} channel(s), spacing "
             f"{tuple(float(s) for s in spacing)}",
             f"  labeled    {len(labeled.images):4d} images, {sizes(labeled)}{dots(labeled)}",
             f"  unlabeled  {len(unlabeled.images):4d} images"
             + (f", {sizes(unlabeled)}" if unlabeled.images else "")]
    held = sum(im is not None for im in unlabeled.images)
    if held < len(unlabeled.images):
        lines[-1] += f" (striped: {held} read by this process)"
    lines.append(f"  test       {len(test.images):4d} images, {sizes(test)}{dots(test)}"
                 if test is not None else "  test          none (no held-out scores)")
    return "\n".join(lines)


def _intensity(config, spacing, dots):
    """The keyword ranges of `intensity_augment` from config.augment (None when all are 0).
    The field's sigma, augment.field_sigma in physical units (0: half the labeled dots' median
    nearest-neighbour distance, so that neighbouring cells are about independent), becomes
    pixels per axis."""
    a = config.get("augment")
    if a is None:
        return None
    ranges = {k: float(a.get(k, 0.0))
              for k in ("brightness", "contrast", "gamma", "noise", "field")}
    for k, v in ranges.items():
        if v < 0 or (k == "contrast" and v >= 1):
            raise InputError(f"config.augment.{k} must be >= 0{' and < 1' if k == 'contrast' else ''}"
                             f", got {v}")
    if not any(ranges.values()):
        return None
    if ranges["field"]:
        sigma = float(a.get("field_sigma", 0.0) or 0.0)
        if sigma <= 0:
            near = [nearest_dot_distance(d, spacing) for d in dots if len(d) > 1]
            near = [v for v in near if np.isfinite(v)]
            sigma = float(np.median(near)) / 2 if near else 2.0 * float(np.min(spacing))
        ranges["field_sigma"] = tuple(sigma / s for s in spacing)
    return ranges


def load(config, part=(0, 1)) -> Splits:
    """Reads, normalises and prepares config.data (`Splits`). Test images are normalised like training images; the test split is None when a folder
    source names none.

    config.data.shard_unlabeled: the unlabeled pool is split into config.train.unlabeled_batch
    stripes (`Dataset.stripes`) and process part = (index, count) reads only the stripes of its
    rows of the unlabeled batch, 1/count of the pool (None in `train.unlabeled` elsewhere);
    'channel_stats' statistics are then combined across processes, the same for any count."""
    cfg = config.data
    sources = {"synthetic": _synthetic, "vgg": _vgg, "folder": _folder}
    if cfg.source not in sources:
        raise InputError(f"config.data.source must be one of {sorted(sources)}, got {cfg.source!r}")
    stripes = _stripes(config)
    if stripes:
        rows = part_rows(stripes, part)
        labeled, unlabeled, test = sources[cfg.source](cfg, lambda n: striped(n, stripes, rows))
    else:
        labeled, unlabeled, test = sources[cfg.source](cfg)
    if not labeled.images:
        raise InputError(f"config.data: no labeled training images ({cfg.source})")
    spacing = tuple(float(s) for s in cfg.spacing)
    if len(spacing) != labeled.images[0].ndim - 1:
        raise InputError(f"config.data.spacing {spacing} has {len(spacing)} axes, the images "
                         f"{labeled.images[0].ndim - 1}")
    text = summary(labeled, unlabeled, test, spacing)
    if stripes and cfg.normalise == "channel_stats":
        normaliser = Normaliser("channel_stats", *_pool_channel_stats(
            labeled.images, unlabeled.images, across_processes=part[1] > 1))
    else:
        normaliser = Normaliser.fit(cfg.normalise, labeled.images + unlabeled.images,
                                    cfg.get("percentiles", (1.0, 99.8)))
    for s in (labeled, unlabeled) + ((test,) if test is not None else ()):
        s.images = [None if im is None else normaliser.image(im) for im in s.images]
    intensity = _intensity(config, spacing, labeled.dots)
    text += f"\n  normalisation {normaliser.mode}" + (
        ", intensity augmentation " + ", ".join(
            f"{k} {v:g}" if k != "field_sigma" else
            f"{k} {'x'.join(f'{s:.2g}' for s in v)} px" for k, v in intensity.items() if v)
        if intensity else "")
    t = config.target
    maps = make_targets(labeled.images, labeled.dots, t.kind, t.scale, spacing, t.sigma, t.cutoff)
    masks, calibration = calibration_split(config, labeled)
    if labeled.rois is not None:
        n = sum(r is not None for r in labeled.rois)
        text += f"\n  regions of interest: {n} of {len(labeled.rois)} labeled images"
    if masks is not labeled.rois:
        text += (f"\n  calibration on held-out bands ({100 * cfg.holdout:g} % of each "
                 f"labeled image, left out of the supervised loss)")
    # rot90 in the (y, x) plane only where it is a symmetry of the voxel grid.
    train = Dataset(labeled.images, labeled.dots, maps, unlabeled.images,
                    rotate=spacing[-1] == spacing[-2], crop_fn=normaliser.crop,
                    intensity=intensity, names=labeled.names, masks=masks, stripes=stripes,
                    dot_fraction=float(config.train.get("dot_fraction", 0.0) or 0.0))
    return Splits(train=train, calibration=calibration, spacing=spacing, test=test,
                  normaliser=normaliser, held_out=masks is not labeled.rois, summary=text)


def _stripes(config) -> int:
    """The unlabeled batch size where the unlabeled pool is striped (0: not striped)."""
    if not config.data.get("shard_unlabeled", False):
        return 0
    stripes = int(config.train.unlabeled_batch) if config.ssl.enabled else 0
    if stripes <= 0:
        raise InputError("config.data.shard_unlabeled needs self-supervised training "
                         "(config.ssl.enabled) with config.train.unlabeled_batch > 0")
    return stripes


def _pool_channel_stats(labeled, unlabeled, across_processes: bool):
    """Per-channel (mean, std + 1e-6) of labeled + unlabeled images where each process holds
    only some unlabeled images (None for the others): per-image float64 sums, exchanged across
    processes (`across_processes`) and added in image order, so that every process and layout
    gets the same numbers."""
    channels = labeled[0].shape[-1]

    def sums(images):
        out = np.zeros((len(images), 3, channels))
        for i, im in enumerate(images):
            if im is not None:
                x = np.asarray(im, np.float64).reshape(-1, channels)
                out[i, 0], out[i, 1], out[i, 2] = len(x), x.sum(0), (x * x).sum(0)
        return out

    pool = sums(unlabeled)
    if across_processes:  # one process holds each image: the others add zeros
        pool = distributed.gather_exact(pool).sum(0)
    n, total, squares = np.concatenate([sums(labeled), pool]).sum(0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0))
    return (tuple(np.float32(mean).tolist()), tuple((np.float32(std) + np.float32(1e-6)).tolist()))


def holdout_band(roi: np.ndarray, fraction: float, rng: np.random.Generator):
    """A bool mask of a band across the longest side of the bounding box of `roi`: `fraction`
    of that side (at least one pixel, never all of it) at a random position within the box."""
    # the box's extent along each axis: the indices where any pixel of the region lies
    extent = [np.flatnonzero(roi.any(axis=tuple(a for a in range(roi.ndim) if a != ax)))
              for ax in range(roi.ndim)]
    axis = int(np.argmax([e[-1] - e[0] for e in extent]))
    lo, n = int(extent[axis][0]), int(extent[axis][-1] - extent[axis][0] + 1)
    width = min(max(1, int(round(fraction * n))), n - 1)
    start = lo + int(rng.integers(0, n - width + 1))
    band = np.zeros(roi.shape, bool)
    index = [slice(None)] * roi.ndim
    index[axis] = slice(start, start + width)
    band[tuple(index)] = True
    return band


def calibration_split(config, labeled: Split):
    """(supervised-loss masks of the labeled images or None, the Split the detector threshold
    is calibrated on).

    config.data.holdout 0: the labeled images themselves (within their regions of interest).
    In (0, 1): a band of that fraction of each labeled image's region of interest is left out
    of the supervised loss and the threshold is chosen there, on pixels the network has not
    fitted; where the bands would hold fewer than `data.holdout_min_dots` dots, the labeled
    images themselves, with a warning."""
    fraction = float(config.data.get("holdout", 0.0) or 0.0)
    if fraction == 0:
        return labeled.rois, labeled
    if not 0 < fraction < 1:
        raise InputError(f"config.data.holdout must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([int(config.seed), 7])
    masks, held = [], []
    for i in range(len(labeled.images)):
        roi = labeled.roi(i)
        roi = np.ones(labeled.images[i].shape[:-1], bool) if roi is None else roi
        for _ in range(20):  # a region of several boxes may miss a band: draw again
            band = holdout_band(roi, fraction, rng)
            if (roi & ~band).any() and (roi & band).any():
                break
        else:
            raise InputError(f"{labeled.names[i]}: no band of {fraction:g} of its region of "
                             f"interest leaves pixels on both sides; set config.data.holdout=0")
        masks.append(roi & ~band)
        held.append(roi & band)
    n = sum(len(inside(d, h)) for d, h in zip(labeled.dots, held))
    least = int(config.data.get("holdout_min_dots", 0) or 0)
    if n < least:
        warnings.warn(f"the held-out calibration bands ({fraction:g} of the labeled images) "
                      f"would hold only {n} dots (config.data.holdout_min_dots: {least}): "
                      f"calibrating on the whole labeled images instead; dot more cells or "
                      f"raise config.data.holdout", stacklevel=2)
        return labeled.rois, labeled
    if n < 10:
        warnings.warn(f"the held-out calibration bands hold only {n} dots: the detector "
                      f"threshold will be poorly determined; raise config.data.holdout",
                      stacklevel=2)
    return masks, Split(labeled.images, labeled.dots, labeled.names, held)
