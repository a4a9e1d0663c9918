"""Your own 3D volumes: a folder of ZYX TIFF stacks with z,y,x dot CSVs or masks.

    cellcount train --config=folder3d --images=DIR --dots=DIR --workdir=models/mine \
        --config.data.spacing="(2.0,1.0,1.0)"

The 3D recipe of configs/synthetic3d.py (8 base features, 16x64x64 crops, target scale 1)
with each volume normalised by its own 1 and 99.8 % percentiles and intensity augmentation
of every training crop. Set `data.spacing` to your voxel size (z, y, x); `eval.radius` is in
the same units.
"""
from cellcount_jax.configs import folder2d, synthetic3d


def get_config():
    c = synthetic3d.get_config()
    c.data.source = "folder"
    c.data.normalise = "percentile"
    c.augment = folder2d.get_config().augment
    return c
