"""Partly dotted images: regions of interest (boxes or masks), the masked supervised loss, crops
that reach the region, held-out calibration bands, and scores inside the region only."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from test_train import one_step, random_batch
from cellcount_jax import data, evaluation, losses
from cellcount_jax.data import Split, io, read_folder
from cellcount_jax.data.dataset import Dataset


def test_boxes_and_masks_read_as_the_same_region(tmp_path):
    (tmp_path / "a.csv").write_text("y0,x0,y1,x1\n2,3,5,7\n4,0,6,2\n")
    got = io.read_roi(str(tmp_path / "a.csv"), (8, 10))
    want = np.zeros((8, 10), bool)
    want[2:5, 3:7] = True   # end exclusive
    want[4:6, 0:2] = True
    np.testing.assert_array_equal(got, want)
    Image.fromarray(want.astype(np.uint8) * 255).save(tmp_path / "a.png")
    np.testing.assert_array_equal(io.read_roi(str(tmp_path / "a.png"), (8, 10)), want)
    (tmp_path / "v.csv").write_text("x1,z0,y0,x0,z1,y1\n4,1,0,2,2,3\n")  # columns in any order
    v = io.read_roi(str(tmp_path / "v.csv"), (3, 4, 5))
    assert v.sum() == 1 * 3 * 2 and v[1, 0:3, 2:4].all()


@pytest.mark.parametrize("text,message", [
    ("y,x\n1,2\n", "header y0,x0,y1,x1"),
    ("y0,x0,y1,x1\n5,5,5,9\n", "empty"),
    ("y0,x0,y1,x1\n1,a,3,4\n", "bad number"),
    ("y0,x0,y1,x1\n", "region of interest is empty"),
])
def test_bad_boxes_name_the_file(tmp_path, text, message):
    (tmp_path / "a.csv").write_text(text)
    with pytest.raises(ValueError, match=f"a.csv.*{message}"):
        io.read_roi(str(tmp_path / "a.csv"), (8, 10))


def _folder(tmp_path):
    """Two 32x32 RGB images with 4 bright cells each, dotted only in the left half of im0."""
    os.makedirs(tmp_path / "imgs")
    os.makedirs(tmp_path / "dots")
    os.makedirs(tmp_path / "roi")
    cells = [(8, 8), (8, 24), (24, 8), (24, 24)]
    for name in ("im0", "im1"):
        a = np.zeros((32, 32), np.uint8)
        for y, x in cells:
            a[y - 2:y + 3, x - 2:x + 3] = 200
        Image.fromarray(np.stack([a] * 3, -1)).save(tmp_path / "imgs" / f"{name}.png")
    dotted = {"im0": [c for c in cells if c[1] < 16], "im1": cells}
    for name, d in dotted.items():
        (tmp_path / "dots" / f"{name}.csv").write_text("y,x\n" + "".join(f"{y},{x}\n" for y, x in d))
    (tmp_path / "roi" / "im0.csv").write_text("y0,x0,y1,x1\n0,0,32,16\n")
    return cells


def test_a_folder_reads_regions_of_the_images_that_have_one(tmp_path):
    _folder(tmp_path)
    s = read_folder(str(tmp_path / "imgs"), str(tmp_path / "dots"), 2,
                    roi_dir=str(tmp_path / "roi"))
    assert s.names == ["im0", "im1"] and s.rois[1] is None
    assert s.rois[0][:, :16].all() and not s.rois[0][:, 16:].any()
    (tmp_path / "roi" / "zz.csv").write_text("y0,x0,y1,x1\n0,0,2,2\n")
    with pytest.raises(ValueError, match="region of interest files without an image.*zz"):
        read_folder(str(tmp_path / "imgs"), str(tmp_path / "dots"), 2, roi_dir=str(tmp_path / "roi"))
    os.remove(tmp_path / "roi" / "zz.csv")
    os.remove(tmp_path / "dots" / "im1.csv")
    (tmp_path / "roi" / "im1.csv").write_text("y0,x0,y1,x1\n0,0,2,2\n")
    with pytest.raises(ValueError, match="without an annotation.*im1"):
        read_folder(str(tmp_path / "imgs"), str(tmp_path / "dots"), 2, roi_dir=str(tmp_path / "roi"))


def test_masked_mse_is_the_mean_over_the_masked_pixels():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 5))
    m = (rng.uniform(size=(2, 6, 5)) < 0.4).astype(np.float32)
    want = ((p - t) ** 2)[m > 0].mean()
    np.testing.assert_allclose(losses.mse(p, t, mask=m), want, rtol=1e-6)
    # Split over two devices (here a vmapped axis), the mean of the per-device losses is the
    # loss of the whole batch, however unevenly the masked pixels fall.
    per_device = jax.vmap(lambda a, b, c: losses.mse(a, b, mask=c, axis_name="d"),
                          axis_name="d")(p, t, m)
    np.testing.assert_allclose(jnp.mean(per_device), want, rtol=1e-6)


def test_the_step_ignores_targets_outside_the_mask():
    """One train step: changing the target where the mask is 0 changes nothing; without the
    mask it does."""
    c = tiny_config()
    c.model.dropout = 0.0
    batch = random_batch(0)
    mask = np.zeros((2, 16, 16), np.float32)
    mask[:, :, :9] = 1
    other = dict(batch, target=np.where(mask > 0, batch["target"], 50.0).astype(np.float32))
    new = [one_step(c, dict(b, mask=mask))[2]["params"] for b in (batch, other)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *new)
    free = [one_step(c, b)[2]["params"] for b in (batch, other)]
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), *free)
    assert max(jax.tree.leaves(diff)) > 1e-3


def plain_loss(pred, target):
    return jnp.mean((pred - target) ** 2)


def test_a_loss_without_mask_argument_is_refused_when_masks_exist():
    c = tiny_config()
    c.loss.supervised = "test_roi:plain_loss"
    one_step(c, random_batch(0))  # fine without regions
    batch = dict(random_batch(0), mask=np.ones((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="test_roi:plain_loss.*takes no mask"):
        one_step(c, batch)


def test_crops_reach_the_region_and_carry_its_mask():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 40, 1)).astype(np.float32)
    roi = np.zeros((40, 40), bool)
    roi[30:33, 2:5] = True   # a small corner region: a uniform crop would mostly miss it
    # The target is the region itself: the mask must come out of every crop, flip and rot90
    # aligned with it.
    ds = Dataset([image, image], [np.zeros((0, 2))] * 2, [roi.astype(np.float32)] * 2,
                 masks=[roi, None], rotate=True)
    hits = []
    for seed in range(200):
        b = ds.sample(np.random.default_rng(seed), (12, 12), 2)
        assert b["mask"].shape == (2, 12, 12) and b["mask"].dtype == np.float32
        for t, m in zip(b["target"], b["mask"]):
            # The crop of the image without a region is all ones; the other reaches the region.
            if m.all():
                hits.append(True)
            else:
                assert 0 < m.sum() <= 9 and (m == t).all()
                hits.append(False)
    assert 0.3 < np.mean(hits) < 0.7


def test_holdout_bands_split_each_region_in_two():
    c = tiny_config()
    c.data.holdout = 0.25
    images = [np.zeros((32, 48, 1), np.float32), np.zeros((40, 20, 1), np.float32)]
    roi = np.zeros((40, 20), bool)
    roi[5:35] = True
    labeled = Split(images, [np.zeros((0, 2))] * 2, ["a", "b"], [None, roi])
    with pytest.warns(UserWarning, match="hold only 0 dots"):
        masks, cal = data.calibration_split(c, labeled)
    for m, h, r in zip(masks, cal.rois, [np.ones((32, 48), bool), roi]):
        assert not (m & h).any() and ((m | h) == r).all()
    # a band across the longest side of the region's bounding box, a quarter of it
    assert cal.rois[0].any(0).sum() == 12 and cal.rois[0].any(1).all()
    assert cal.rois[1].any(1).sum() == round(0.25 * 30) and cal.rois[1].any(0).all()
    # A narrow region far from the image's centre is split too, whatever the seed.
    narrow = np.zeros((64, 64), bool)
    narrow[:, 50:60] = True
    dots = np.stack([np.arange(2, 64, 4), np.full(16, 55)], 1).astype(np.float32)
    for seed in range(20):
        c.seed = seed
        with pytest.warns(UserWarning, match="hold only 4 dots"):
            masks, cal = data.calibration_split(
                c, Split([np.zeros((64, 64, 1), np.float32)], [dots], ["n"], [narrow]))
        assert masks[0].sum() == 48 * 10 and cal.rois[0].sum() == 16 * 10
    c.data.holdout = 0.0
    assert data.calibration_split(c, labeled) == (labeled.rois, labeled)
    c.data.holdout = 1.5
    with pytest.raises(ValueError, match="data.holdout"):
        data.calibration_split(c, labeled)


def test_scores_count_only_inside_the_region():
    density = np.zeros((20, 20))
    for y, x in [(3, 3), (3, 15), (15, 3), (15, 15)]:
        density[y, x] = 1.0
    dots = np.array([[3, 3], [15, 3]], np.float32)   # only the left half is dotted
    roi = np.zeros((20, 20), bool)
    roi[:, :10] = True
    whole, _, _ = evaluation.score([density], [dots], 0.5, [2.0], detector="peaks")
    assert (whole["tp"], whole["fp"], whole["fn"]) == (2, 2, 0)
    inside, _, rows = evaluation.score([density], [dots], 0.5, [2.0], detector="peaks",
                                       mass_per_dot=1.0, rois=[roi])
    assert (inside["tp"], inside["fp"], inside["fn"]) == (2, 0, 0)
    assert rows[0]["integrated_count"] == 2.0
    # Undotted cells outside the region would push the threshold above them.
    density[3, 3] = density[15, 3] = 3.0
    assert evaluation.calibrate([density], [dots], [0.5, 2.0], 2.0, detector="peaks",
                                rois=[roi])["threshold"] == 0.5
    assert evaluation.calibrate([density], [dots], [0.5, 2.0], 2.0,
                                detector="peaks")["threshold"] == 2.0


@pytest.mark.slow
def test_training_with_regions_of_interest(tmp_path):
    """A folder run with --roi, --test-roi and a held-out calibration band: the summary and
    the log say so, the record names the band, and test scores count only the test region."""
    import json
    import shutil
    import subprocess
    import sys
    cells = _folder(tmp_path)
    os.makedirs(tmp_path / "test_dots")
    os.makedirs(tmp_path / "test_roi")
    shutil.copytree(tmp_path / "imgs", tmp_path / "test")
    for name in ("im0", "im1"):  # every cell dotted; im0 scored in its left half only
        (tmp_path / "test_dots" / f"{name}.csv").write_text(
            "y,x\n" + "".join(f"{y},{x}\n" for y, x in cells))
    shutil.copy(tmp_path / "roi" / "im0.csv", tmp_path / "test_roi" / "im0.csv")
    cellcount = os.path.join(os.path.dirname(sys.executable), "cellcount")
    out = subprocess.run(
        [cellcount, "train", f"--images={tmp_path / 'imgs'}", f"--dots={tmp_path / 'dots'}",
         f"--roi={tmp_path / 'roi'}", f"--test-images={tmp_path / 'test'}",
         f"--test-dots={tmp_path / 'test_dots'}", f"--test-roi={tmp_path / 'test_roi'}",
         "--workdir=wd", "--config.model.features=4", "--config.train.crop=(16,16)",
         "--config.train.steps=4", "--config.train.batch=2", "--config.train.log_every=2",
         "--config.data.holdout=0.25", "--config.train.minutes=0", "--config.predict.tta=False",
         "--config.predict.zooms=(1.0,)"],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "regions of interest: 1 of 2 labeled images" in out.stdout
    assert "calibration on held-out bands (25 % of each labeled image" in out.stdout
    assert "held-out bands of the 2 labeled training images" in out.stdout
    record = json.load(open(tmp_path / "wd" / "inference.json"))
    assert record["detector"]["calibrated_on"] == "held-out bands of 2 labeled training images"
    scores = json.load(open(tmp_path / "wd" / "eval.json"))["model"]
    assert scores["true_count_mean"] == (2 + 4) / 2


def test_resume_check_ignores_fields_added_later_while_off():
    from cellcount_jax.model_folder import config_differences
    old = {"data": {"source": "folder"}, "model": {}, "target": {}}
    new = {"data": {"source": "folder", "roi": "", "test_roi": "", "holdout": 0.0},
           "model": {}, "target": {}}
    assert config_differences(old, new) == []
    new["data"]["holdout"] = 0.25
    assert config_differences(old, new) == ["data.holdout: '(absent)' -> 0.25"]


def test_predict_scores_inside_the_region(tmp_path):
    from cellcount_jax import load_model, predict
    from conftest import ROOT
    cells = _folder(tmp_path)
    (tmp_path / "all.csv").write_text("y,x\n" + "".join(f"{y},{x}\n" for y, x in cells))
    model = load_model(os.path.join(ROOT, "pretrained", "vgg2d_cpu"))
    rows = [predict.predict_paths(model, str(tmp_path / "imgs" / "im0.png"), str(tmp_path / o),
                                  str(tmp_path / "all.csv"), roi)
            for o, roi in (("whole", ""), ("left", str(tmp_path / "roi" / "im0.csv")))]
    assert rows[0][0]["true_count"] == 4 and rows[1][0]["true_count"] == 2
    assert rows[1][0]["tp"] + rows[1][0]["fp"] <= rows[0][0]["tp"] + rows[0][0]["fp"]
    with pytest.raises(ValueError, match="--roi needs --annotations"):
        predict.inputs(str(tmp_path / "imgs"), 2, "", str(tmp_path / "roi"))
