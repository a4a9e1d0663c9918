"""3D, in the shape of the paper's Table 3: one labeled volume + unlabeled volumes, evaluated
on held-out volumes. Synthetic light-sheet-like nuclei: anisotropic voxels (z step twice the
pixel size), dense and touching, ~500-700 nuclei per 48x128x128 volume. This is the general
3D recipe (configs/folder3d.py runs it on your own volumes): 16 base features, 16x64x64 crops,
target scale 1, the peak-weighted squared error (each voxel's error weighted by
1 + 10 (target / peak)^2, so that the voxels at the dots, where touching nuclei are told
apart, weigh as much as the background between them), each volume normalised by its own 1 and 99.8 % percentiles with intensity
augmentation; supervised steps of 2 crops, half of them drawn around a dot (so that sparse
volumes still show nuclei every step); a band of a fifth of each labeled volume held out to
calibrate the detector (the whole volume where the band would hold fewer than 20 dots), every
200 steps (without flips), and the step that calibrates best is the one the model folder
keeps; calibration may also split a detection that holds 1.4-1.8 times a typical detection's
mass into two (touching nuclei that the map merged: postprocess.split_heavy); prediction
averages the volume's flips.
The earlier recipe (8 features, plain squared error): --config.model.features=8
--config.loss.supervised_options.weight=0.
The reference's normalisation: --config.data.normalise=minmax and the augment.* fields 0;
focal-consistency SSL on the unlabeled volumes: --config.ssl.enabled=True.

    python launch.py --config=configs/synthetic3d.py --workdir=workdir/synthetic3d

Expected (seeds 0-4, 2-core CPU): the README's results table.
"""
import ml_collections

from cellcount_jax.configs import folder2d, quickstart


def get_config():
    c = quickstart.get_config()
    c.model.features = 16
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
    c.loss.supervised = "peak_weighted_mse"
    c.loss.supervised_options = ml_collections.ConfigDict({"weight": 10.0, "power": 2.0})
    c.ssl.enabled = False         # at this budget a supervised step is 2x cheaper and as good
    c.data.holdout = 0.2          # a band of each labeled volume calibrates (and picks the step)
    c.data.holdout_min_dots = 20  # unless it holds fewer dots: then the whole volume does
    c.train.crop = (16, 64, 64)
    c.train.batch = 2
    c.train.unlabeled_batch = 2
    c.train.dot_fraction = 0.5    # half the crops around a nucleus: sparse volumes still train
    c.train.steps = 800
    c.train.checkpoint_every = 200
    c.eval.every = 200            # calibrate every 200 steps; predict with the best step
    c.eval.radius = 4.0           # physical units (xy pixels)
    c.eval.extra_radii = (2.0, 6.0)
    c.eval.split_ratios = (0.0, 1.4, 1.5, 1.6, 1.8)  # touching nuclei the map merges: split
    c.predict.tta = True          # the mean of the 16 flips (8 where z and y, x differ)
    return c
