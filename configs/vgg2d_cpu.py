"""VGG cells on a CPU budget: the vgg2d recipe shrunk to train in about 35 minutes on 2 cores.

    python launch.py --config=configs/vgg2d_cpu.py --workdir=workdir/vgg2d_cpu

Deviations from configs/vgg2d.py: 16 base features instead of 32 (549,841 parameters
instead of 2,192,289); 96x96 crops instead of 224; batch 4 labeled + 8 unlabeled instead of
8 + 80; 6,350 steps (SGDR periods 50, 100, ..., 3200) instead of 12,750; each image normalised
by its own 1 and 99.8 % percentiles, with intensity augmentation (brightness, contrast, gamma,
noise), instead of the pool's channel statistics. Same data, split, targets, losses, noise, ramp
and optimizer.
Ablation (paper Table 1), same seed and labeled images:
    --config.target.kind=gaussian --config.ssl.enabled=False   Gaussian kernel, supervised
    --config.ssl.enabled=False                                  inverse distance, supervised
Expected results: the README's results table.
"""
from cellcount_jax.configs import vgg2d


def get_config():
    c = vgg2d.get_config()
    c.model.features = 16
    c.data.normalise = "percentile"
    c.augment.brightness = 0.2
    c.augment.contrast = 0.25
    c.augment.gamma = 0.25
    c.augment.noise = 0.05
    c.train.crop = (96, 96)
    c.train.batch = 4
    c.train.unlabeled_batch = 8
    c.train.steps = 6350
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    return c
