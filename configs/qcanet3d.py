"""Real 3D mouse-embryo nuclei (QCANet examples, BBBC050): train on the 8-cell-stage volume,
test on the 16-cell-stage volume. Dots are the centroids of the manual nucleus-detection
masks (images_ndn), as the paper turns full annotations into dots. Supervised (there is no
unlabeled volume). Voxel spacing z:y:x = 2.1875:1:1 (1.75 um z steps, 0.8 um pixels).

    python launch.py --config=configs/qcanet3d.py --workdir=workdir/qcanet3d

Expected (seed 0, 2-core CPU): the README's results table.
"""
from cellcount_jax.configs import synthetic3d


def get_config():
    c = synthetic3d.get_config()
    c.data.source = "folder"
    c.data.images = "../shared/data/qcanet/images_raw"
    c.data.annotations = "../shared/data/qcanet/images_ndn"
    c.data.test_names = ("16_cell_stage",)
    c.data.spacing = (2.1875, 1.0, 1.0)
    c.ssl.enabled = False
    c.train.crop = (24, 64, 64)
    c.train.batch = 2
    c.train.steps = 400
    c.train.checkpoint_every = 200
    c.eval.radius = 8.0           # nuclei are ~9 pixels in radius
    c.eval.extra_radii = (5.0, 12.0)
    return c
