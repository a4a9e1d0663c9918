"""3D, in the shape of the paper's Table 3: one labeled volume + unlabeled volumes, evaluated
on held-out volumes. Synthetic light-sheet-like nuclei: anisotropic voxels (z step twice the
pixel size), dense and touching, ~500-700 nuclei per 48x128x128 volume. This is the general
3D recipe (configs/folder3d.py runs it on your own volumes): the reference 3D recipe
(per-crop standardisation, target_scale 1, focal-consistency SSL) with each volume normalised
by its own 1 and 99.8 % percentiles instead of its min and max, and intensity augmentation.
The reference's normalisation: --config.data.normalise=minmax and the augment.* fields 0.

    python launch.py --config=configs/synthetic3d.py --workdir=workdir/synthetic3d

Expected (seed 0, 2-core CPU): the README's results table.
"""
from cellcount_jax.configs import folder2d, quickstart


def get_config():
    c = quickstart.get_config()
    c.model.features = 8
    c.data.ndim = 3
    c.data.shape = (48, 128, 128)
    c.data.spacing = (2.0, 1.0, 1.0)
    c.data.channels = 1
    c.data.num_cells = (500, 700)
    c.data.radius = 4.0
    c.data.num_labeled = 1
    c.data.num_unlabeled = 4
    c.data.num_test = 2
    c.data.normalise = "percentile"   # each volume's 1 and 99.8 % percentiles (reference: minmax)
    c.augment = folder2d.get_config().augment
    c.target.scale = 1.0          # the reference's scale for 3D light-sheet data
    c.train.crop = (16, 64, 64)
    c.train.batch = 1
    c.train.unlabeled_batch = 2
    c.train.steps = 500
    c.train.checkpoint_every = 250
    c.eval.radius = 4.0           # physical units (xy pixels)
    c.eval.extra_radii = (2.0, 6.0)
    return c
