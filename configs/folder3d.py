"""Your own 3D volumes: a folder of ZYX TIFF stacks with z,y,x dot CSVs or masks.

    cellcount train --config=folder3d --images=DIR --dots=DIR --workdir=models/mine \
        --config.data.spacing="(2.0,1.0,1.0)" --config.eval.radius=4.0

The general 3D recipe of configs/synthetic3d.py (16 base features, 16x64x64 crops, target
scale 1, the peak-weighted squared error, each volume normalised by its own 1 and 99.8 %
percentiles, intensity augmentation, supervised, half the crops around a dot, calibration on
held-out bands, the best calibrating step kept, detections holding the mass of two nuclei
split in two where that calibrates better, flips at prediction). Set `data.spacing` to your voxel size (z, y, x) and
`eval.radius` to about one nucleus radius, in the same units: it is the match radius of the
scores and sets the peak detector's minimum distances.
"""
from cellcount_jax.configs import synthetic3d


def get_config():
    c = synthetic3d.get_config()
    c.data.source = "folder"
    return c
