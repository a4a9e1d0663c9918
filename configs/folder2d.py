"""Your own 2D images: a folder of PNG/TIFF images with dot CSVs or masks (the default of
`cellcount train --images=...`).

    cellcount train --images=DIR --dots=DIR [--test-images=DIR --test-dots=DIR] --workdir=models/mine

The quickstart recipe with what real microscopy needs on top: each image normalised by its
own 1 and 99.8 % percentiles (exposure and stain intensity vary from image to image), and
intensity augmentation of every training crop (brightness, contrast, gamma, noise).
"""
from cellcount_jax.configs import quickstart


def get_config():
    c = quickstart.get_config()
    c.data.source = "folder"
    c.data.ndim = 2
    c.data.normalise = "percentile"
    c.augment.brightness = 0.2
    c.augment.contrast = 0.25
    c.augment.gamma = 0.25
    c.augment.noise = 0.05
    return c
