"""3D: SAU-Net 3D on synthetic light-sheet-like nuclei (anisotropic voxels, z step 2x the
pixel size), inverse distance targets in physical units, focal-consistency SSL.

    python launch.py --config=configs/synthetic3d.py --workdir=workdir/synthetic3d

Expected (seed 0, 2-core CPU): see the README's results table.
"""
from configs import quickstart


def get_config():
    c = quickstart.get_config()
    c.model.features = 8
    c.data.shape = (32, 64, 64)
    c.data.spacing = (2.0, 1.0, 1.0)
    c.data.channels = 1
    c.data.num_cells = (60, 110)
    c.data.radius = 4.0
    c.data.num_labeled = 2
    c.data.num_unlabeled = 8
    c.data.num_test = 4
    c.target.scale = 1.0          # the reference's scale for 3D light-sheet data
    c.train.crop = (16, 32, 32)
    c.train.batch = 2
    c.train.unlabeled_batch = 2
    c.train.steps = 1000
    c.eval.radius = 4.0           # physical units
    return c
