"""Datasets: splits of labeled, unlabeled and held-out images, ready for training.

`load(config)` returns {'train': Dataset, 'test': Split, 'spacing': tuple}. Sources
(`config.data.source`): 'synthetic' (embedded generator), 'vgg' (VGG cells, the paper's
split), 'folder' (your own images with dot CSVs or label masks).
"""
import dataclasses
import os
from typing import List

import numpy as np

from cellcount_jax.data import io
from cellcount_jax.data.dataset import Dataset, channel_stats, check_dots, make_targets, pad_dots
from cellcount_jax.data.synthetic import synthetic_image, synthetic_set


@dataclasses.dataclass
class Split:
    """Images with names and, where known, dots (None for unlabeled images)."""
    images: List[np.ndarray]
    dots: List[np.ndarray]
    names: List[str]


def _synthetic(cfg):
    kwargs = dict(shape=tuple(cfg.shape), num_cells=tuple(cfg.num_cells), radius=cfg.radius,
                  spacing=tuple(cfg.spacing), channels=cfg.channels)
    images, dots = synthetic_set(cfg.seed, cfg.num_labeled, **kwargs)
    unlabeled, _ = synthetic_set(cfg.seed + 1, cfg.num_unlabeled, **kwargs)
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


def _vgg(cfg):
    path = cfg.path
    if not os.path.isdir(path):
        raise ValueError(f"config.data.path: VGG cells folder {path!r} not found")
    lab, unl, test = vgg_split(cfg.split_seed, cfg.num_labeled)
    read = lambda i: io.read_image(os.path.join(path, f"{i + 1:03d}cell.png"), 2, 3) / 255.0
    dots = lambda i: io.dots_from_red_pixels(os.path.join(path, f"{i + 1:03d}dots.png"))
    name = lambda i: f"{i + 1:03d}cell"
    return (Split([read(i) for i in lab], [dots(i) for i in lab], [name(i) for i in lab]),
            Split([read(i) for i in unl], [None] * len(unl), [name(i) for i in unl]),
            Split([read(i) for i in test], [dots(i) for i in test], [name(i) for i in test]))


def read_annotation(path: str, shape, image_path: str = "the image"):
    """Dots (n, ndim) of an image of spatial `shape` from a dot CSV or a label/binary mask."""
    ndim = len(shape)
    if path.lower().endswith(".csv"):
        d = io.read_dots_csv(path, ndim)
    else:
        mask = io.read_image(path, ndim)[..., 0]
        if mask.shape != tuple(shape):
            raise ValueError(f"{path}: mask shape {mask.shape} differs from {image_path} "
                             f"shape {tuple(shape)}")
        d = io.dots_from_mask(mask)
    check_dots(d, shape, path)
    return d


def read_folder(images_dir: str, annotations_dir: str, ndim: int, channels=None):
    """Images of a folder and their annotations, matched by file stem.

    An annotation is `<stem>.csv` (dots, header naming the axes) or `<stem>.tif|.tiff|.png`
    (a label or binary mask, turned into dots by component centroids). Images without one are
    unlabeled. Returns a Split (dots None where unlabeled).
    """
    files = io.list_images(images_dir)
    if not files:
        raise ValueError(f"{images_dir}: no PNG or TIFF images")
    ann = {}
    if annotations_dir:
        for f in sorted(os.listdir(annotations_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() in (".csv",) + io.IMAGE_EXTENSIONS:
                if stem in ann:
                    raise ValueError(f"{annotations_dir}: two annotations for {stem!r}")
                ann[stem] = os.path.join(annotations_dir, f)
    stems = {os.path.splitext(f)[0] for f in files}
    orphans = sorted(set(ann) - stems)
    if orphans:
        raise ValueError(f"{annotations_dir}: annotations without an image in {images_dir}: "
                         f"{orphans[:5]}")
    images, dots, names = [], [], []
    for f in files:
        stem = os.path.splitext(f)[0]
        path = os.path.join(images_dir, f)
        image = io.read_image(path, ndim, channels)
        d = read_annotation(ann[stem], image.shape[:-1], path) if stem in ann else None
        images.append(image)
        dots.append(d)
        names.append(stem)
    if channels is None and len({im.shape[-1] for im in images}) > 1:
        raise ValueError(f"{images_dir}: images have different channel counts")
    return Split(images, dots, names)


def _folder(cfg):
    split = read_folder(cfg.images, cfg.annotations, cfg.ndim, cfg.get("channels_expected"))
    test_names = set(cfg.test_names)
    missing = test_names - set(split.names)
    if missing:
        raise ValueError(f"config.data.test_names: {sorted(missing)} not in {cfg.images}")
    pick = lambda keep: Split(*[[v for v, n, d in zip(vals, split.names, split.dots) if keep(n, d)]
                                for vals in (split.images, split.dots, split.names)])
    labeled = pick(lambda n, d: n not in test_names and d is not None)
    unlabeled = pick(lambda n, d: n not in test_names and d is None)
    if cfg.test_images:
        test = read_folder(cfg.test_images, cfg.test_annotations, cfg.ndim)
    else:
        test = pick(lambda n, d: n in test_names)
    if any(d is None for d in test.dots):
        raise ValueError("every test image needs an annotation")
    return labeled, unlabeled, test


def normalise(cfg, labeled: Split, unlabeled: Split, test: Split):
    """'channel_stats': per-channel mean/std over the training pool (reference for VGG);
    'minmax': each image to [0, 1] by its own min and max (reference for 3D), crops are then
    standardised one by one by the dataset. Returns what inference on new images needs."""
    if cfg.normalise == "channel_stats":
        mean, std = channel_stats(labeled.images + unlabeled.images)
        f = lambda im: (im - mean) / std
        info = {"mode": "channel_stats", "mean": mean.tolist(), "std": std.tolist()}
    elif cfg.normalise == "minmax":
        f = lambda im: (im - im.min()) / max(float(im.max() - im.min()), 1e-12)
        info = {"mode": "minmax"}
    else:
        raise ValueError(f"config.data.normalise must be 'channel_stats' or 'minmax', "
                         f"got {cfg.normalise!r}")
    for s in (labeled, unlabeled, test):
        s.images = [f(im).astype(np.float32) for im in s.images]
    return info


def load(config):
    """{'train': Dataset, 'test': Split, 'spacing': tuple, 'normalisation': dict}."""
    cfg = config.data
    sources = {"synthetic": _synthetic, "vgg": _vgg, "folder": _folder}
    if cfg.source not in sources:
        raise ValueError(f"config.data.source must be one of {sorted(sources)}, got {cfg.source!r}")
    labeled, unlabeled, test = sources[cfg.source](cfg)
    if not labeled.images:
        raise ValueError(f"config.data: no labeled training images ({cfg.source})")
    if not test.images:
        raise ValueError(f"config.data: no test images ({cfg.source})")
    norm = normalise(cfg, labeled, unlabeled, test)
    # What the loader did before normalising (VGG: /255), for images read by `predict`.
    norm["input_scale"] = 1.0 / 255.0 if cfg.source == "vgg" else 1.0
    t = config.target
    spacing = tuple(float(s) for s in cfg.spacing)
    maps = make_targets(labeled.images, labeled.dots, t.kind, t.scale, spacing, t.sigma, t.cutoff)
    # rot90 in the (y, x) plane only where it is a symmetry of the voxel grid.
    train = Dataset(labeled.images, labeled.dots, maps, unlabeled.images,
                    rotate=spacing[-1] == spacing[-2],
                    standardise_crops=cfg.normalise == "minmax", names=labeled.names)
    return {"train": train, "test": test, "spacing": spacing, "normalisation": norm}
