"""Datasets: splits of labeled, unlabeled and held-out images, ready for training."""
import numpy as np

from cellcount_jax.data.dataset import Dataset, channel_stats, make_targets, pad_dots
from cellcount_jax.data.synthetic import synthetic_image, synthetic_set


def _synthetic_splits(cfg, seed):
    kwargs = dict(shape=tuple(cfg.shape), num_cells=tuple(cfg.num_cells), radius=cfg.radius,
                  spacing=tuple(cfg.spacing), channels=cfg.channels)
    labeled = synthetic_set(seed, cfg.num_labeled, **kwargs)
    unlabeled, _ = synthetic_set(seed + 1, cfg.num_unlabeled, **kwargs)
    test = synthetic_set(seed + 2, cfg.num_test, **kwargs)
    return labeled, unlabeled, test


def load(config):
    """Splits for `config.data`: {'train': Dataset, 'test': (images, dots), 'spacing'}.

    Images are normalised per channel with the mean and std of the training pool (labeled
    and unlabeled), as the reference does for VGG; the same statistics apply to the test set.
    """
    cfg = config.data
    if cfg.source != "synthetic":
        raise ValueError(f"config.data.source must be 'synthetic', got {cfg.source!r}")
    (images, dots), unlabeled, (test_images, test_dots) = _synthetic_splits(cfg, cfg.seed)
    mean, std = channel_stats(images + unlabeled)
    norm = lambda ims: [(im - mean) / std for im in ims]
    t = config.target
    spacing = tuple(cfg.spacing)
    maps = make_targets(images, dots, t.kind, t.scale, spacing, t.sigma, t.cutoff)
    train = Dataset(norm(images), dots, maps, norm(unlabeled))
    return {"train": train, "test": (norm(test_images), test_dots), "spacing": spacing}
