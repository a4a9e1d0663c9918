"""Real 3D mouse-embryo nuclei (QCANet examples, BBBC050): train on the 8-cell-stage volume,
test on the 16-cell-stage volume, with the general 3D recipe of configs/folder3d.py and
nothing tuned to this set but its voxel size and nucleus size. Dots are the centroids of the
manual nucleus-detection masks (images_ndn), as the paper turns full annotations into dots.
Supervised (there is no unlabeled volume); a fifth of the 8-cell volume would hold one or two
nuclei, so the detector is calibrated on the whole volume (`data.holdout_min_dots`). Voxel spacing z:y:x = 2.1875:1:1 (1.75 um z
steps, 0.8 um pixels).

    python launch.py --config=configs/qcanet3d.py --workdir=workdir/qcanet3d

The same as the general recipe on the folder:
    cellcount train --config=folder3d --images=../shared/data/qcanet/images_raw \
        --dots=../shared/data/qcanet/images_ndn --config.data.test_names="('16_cell_stage',)" \
        --config.data.spacing="(2.1875,1.0,1.0)" --config.eval.radius=8.0 \
        --config.eval.extra_radii="(5.0,12.0)" --workdir=workdir/qcanet3d

Expected (seeds 0-4, 2-core CPU): the README's results table.
"""
from cellcount_jax.configs import folder3d


def get_config():
    c = folder3d.get_config()
    c.data.images = "../shared/data/qcanet/images_raw"
    c.data.annotations = "../shared/data/qcanet/images_ndn"
    c.data.test_names = ("16_cell_stage",)
    c.data.spacing = (2.1875, 1.0, 1.0)
    c.eval.radius = 8.0           # nuclei are ~9 pixels in radius
    c.eval.extra_radii = (5.0, 12.0)
    return c
