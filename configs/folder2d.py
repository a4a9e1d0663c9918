"""Your own 2D images: a folder of PNG/TIFF images with dot CSVs or masks (the default of
`cellcount train --images=...`).

    cellcount train --images=DIR --dots=DIR [--test-images=DIR --test-dots=DIR] --workdir=models/mine

The quickstart network with what real microscopy needs on top: each image normalised by its
own 1 and 99.8 % percentiles (exposure and stain intensity vary from image to image), and
intensity augmentation of every training crop (brightness, contrast, gamma, noise). Trains for
15 minutes (`--minutes=N` to change it): the steps are fitted to the step rate measured after
compiling, so the schedule ends on time on any machine.
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
    # What the hour-long VGG recipe learned, at the scale of a quarter of an hour: supervised
    # steps of 8 large crops (an SSL step costs 3.5 of them and did not beat them at equal
    # time), the schedule fitted to the minutes, the mean of the 8 flips at prediction, and an
    # input zoom chosen by calibration (a slightly larger view splits touching cells).
    c.ssl.enabled = False
    c.train.crop = (128, 128)
    c.train.batch = 8
    c.train.minutes = 15.0
    c.train.steps = 1500          # the schedule's shape; the minutes set the number of steps
    c.train.log_every = 50
    c.predict.tta = True
    c.predict.zooms = (1.0, 1.03, 1.06, 1.09)
    return c
