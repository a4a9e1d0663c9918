"""Choosing the detector: degenerate candidates refused, ties broken in the middle, the
best step kept; and crops drawn around dots."""
import json
import os
import warnings

import numpy as np
import pytest

from conftest import tiny_config
from cellcount_jax import checkpoints, evaluation, load_model, train
from cellcount_jax.data import Dataset


def bumps(shape, points, height, sigma=1.0):
    """A map of Gaussian bumps of `height` (one per point) on zero."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    out = np.zeros(shape, np.float32)
    for p, h in zip(points, height):
        out += h * np.exp(-np.sum((grid - p) ** 2, -1) / (2 * sigma ** 2))
    return out


def test_a_flat_map_is_refused_with_a_warning():
    rng = np.random.default_rng(0)
    m = 0.5 + 1e-4 * rng.standard_normal((40, 40)).astype(np.float32)
    assert evaluation.flat([m], peak=1.0)
    dots = np.array([[10.0, 10.0], [30.0, 30.0]])
    with pytest.warns(UserWarning, match="nearly flat"):
        assert evaluation.calibrate([m], [dots], [0.4, 0.5], 3.0, detector="peaks",
                                    peak=1.0) is None
    # The same map without the flatness check detects its noise.
    assert evaluation.calibrate([m], [dots], [0.4, 0.5], 3.0, detector="peaks") is not None
    assert not evaluation.flat([bumps((40, 40), dots, [1.0, 1.0])], peak=1.0)


def test_a_threshold_in_the_background_is_refused():
    # 3 cells: two faint (0.3) and one bright (1.0), and 5 background bumps at 0.2. At 0.1 the
    # detector finds all 3 cells among 8 detections (F1 6/11); at 0.5 only the bright one (F1
    # 2/4). F1 prefers 0.1, which detects more than twice the dots: refused.
    cells = np.array([[8.0, 8.0], [8.0, 30.0], [30.0, 8.0]])
    noise = np.array([[20.0, 20.0], [30.0, 30.0], [20.0, 35.0], [35.0, 20.0], [14.0, 20.0]])
    m = bumps((42, 42), np.concatenate([cells, noise]), [0.3, 0.3, 1.0] + [0.2] * 5)
    args = ([m], [cells], [0.1, 0.5], 2.0)
    assert evaluation.calibrate(*args, detector="peaks")["threshold"] == 0.1
    with pytest.warns(UserWarning, match="detects 8 cells where they have 3 dots"):
        chosen = evaluation.calibrate(*args, detector="peaks", max_ratio=2.0)
    assert chosen["threshold"] == 0.5


def test_ties_take_the_middle_threshold():
    dots = np.array([[10.0, 10.0], [10.0, 30.0], [30.0, 20.0]])
    m = bumps((40, 40), dots, [1.0, 1.0, 1.0])
    candidates = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    # every candidate finds the 3 cells exactly: the middle of the tie
    assert evaluation.calibrate([m], [dots], candidates, 3.0, detector="peaks")["threshold"] \
        == 0.5
    # a candidate above the peaks loses: the tie is 0.1 ... 0.9 still
    assert evaluation.calibrate([m], [dots], candidates + [1.5], 3.0,
                                detector="peaks")["threshold"] == 0.5


def crops_with_dots(ds, n, crop=(16, 16), seed=0):
    """How many of n sampled labeled crops hold a dot (the image marks dots with 1)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        hits += ds.sample(rng, crop, 1)["image"].sum() > 0
    return hits


def sparse_dataset(dot_fraction, masks=None):
    image = np.zeros((256, 256, 1), np.float32)
    dots = np.array([[40.0, 40.0], [200.0, 220.0]])
    image[40, 40] = image[200, 220] = 1.0
    target = np.zeros((256, 256), np.float32)
    return Dataset([image], [dots], [target], dot_fraction=dot_fraction, masks=masks)


def test_dot_centred_crops():
    n = 400
    # uniform crops of 16x16 in 256x256 hold one of 2 dots ~ 2 * 256 / 241^2 of the time
    assert crops_with_dots(sparse_dataset(0.0), n) < 0.03 * n
    assert crops_with_dots(sparse_dataset(1.0), n) == n
    half = crops_with_dots(sparse_dataset(0.5), n)
    assert abs(half - n / 2) < 4 * np.sqrt(n / 4)  # binomial(400, ~0.5): 4 sd
    # inside a mask, only the dots inside it anchor crops (the mask keeps the left half)
    mask = np.zeros((256, 256), bool)
    mask[:, :128] = True
    ds = sparse_dataset(1.0, masks=[mask])
    rng = np.random.default_rng(1)
    for _ in range(50):
        b = ds.sample(rng, (16, 16), 1)
        assert b["image"].sum() == 1 and b["mask"].sum() > 0
    with pytest.raises(ValueError, match="dot_fraction"):
        sparse_dataset(1.5)


def test_the_best_calibrating_step_is_kept_and_predicted_with(tmp_path, monkeypatch):
    c = tiny_config()
    c.train.steps, c.train.checkpoint_every, c.train.log_every, c.eval.every = 6, 2, 2, 2
    c.data.holdout = 0.25
    scores = iter([0.5, 0.9, 0.7, 0.8])  # steps 2, 4, 6, then the final calibration
    real = evaluation.calibrate_record

    def scripted(*args):
        real(*args)
        return next(scores)

    monkeypatch.setattr(evaluation, "calibrate_record", scripted)
    wd = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train.train_and_evaluate(c, wd)
    # an earlier step chosen is not a run stopped early: it is calibrated and scored
    assert summary is not None and summary["step"] == 4
    assert json.load(open(os.path.join(wd, "eval.json")))["step"] == 4
    lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [l["calibration_f1"] for l in lines] == [0.5, 0.9, 0.7]
    record = json.load(open(os.path.join(wd, "inference.json")))
    assert record["selected"] == {"step": 4, "calibration_f1": 0.9, "every": 2}
    # the folder predicts with the parameters of step 4, as they were saved at that step
    step, params = checkpoints.restore_params(wd)  # the newest: step 6
    assert step == 6
    mngr = checkpoints.manager(wd)
    saved4 = mngr.restore(4)["params"]
    mngr.close()
    loaded = load_model(wd)
    assert loaded.step == 4
    for a, b in zip(jax_leaves(loaded.params), jax_leaves(saved4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax_leaves(params), jax_leaves(saved4)))


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_bands_with_too_few_dots_leave_calibration_to_the_whole_images():
    from cellcount_jax import data
    from cellcount_jax.data import Split
    c = tiny_config()
    c.data.holdout, c.data.holdout_min_dots = 0.25, 10
    dots = np.stack(np.meshgrid(np.arange(4, 64, 8), np.arange(4, 64, 8)), -1).reshape(-1, 2)
    labeled = Split([np.zeros((64, 64, 1), np.float32)], [dots.astype(np.float32)], ["a"])
    masks, cal = data.calibration_split(c, labeled)  # a band of 16 px: 16 of the 64 dots
    assert cal is not labeled and masks[0].sum() == 48 * 64
    labeled.dots = [labeled.dots[0][:9]]  # at most 9 dots in the band
    with pytest.warns(UserWarning, match="would hold only"):
        masks, cal = data.calibration_split(c, labeled)
    assert cal is labeled and masks is None


def test_crops_are_cut_to_the_smallest_image():
    c = tiny_config()
    c.train.crop = (128, 128)
    images = [np.zeros((100, 300, 1), np.float32), np.zeros((200, 90, 1), np.float32)]
    ds = Dataset(images, [np.zeros((0, 2))] * 2, [np.zeros(im.shape[:-1]) for im in images])
    assert train._fit_crop(c, ds) == (96, 88)
    c.train.crop = (64, 64)
    assert train._fit_crop(c, ds) == (64, 64)


def test_calibration_chooses_to_split_merged_cells():
    # 6 lone cells and 3 pairs of cells 2.2 apart that the map merges into one maximum each
    lone = [(6.0, 6.0), (6.0, 30.0), (30.0, 6.0), (30.0, 30.0), (18.0, 6.0), (6.0, 18.0)]
    pairs = [(18.0, 16.9), (18.0, 19.1), (30.0, 16.9), (30.0, 19.1), (42.0, 16.9), (42.0, 19.1)]
    dots = np.array(lone + pairs)
    m = bumps((48, 40), dots, [1.0] * len(dots), sigma=1.5)
    plain = evaluation.calibrate([m], [dots], [0.3, 0.5], 1.5, detector="peaks")
    assert plain["split"] == 0.0
    chosen = evaluation.calibrate([m], [dots], [0.3, 0.5], 1.5, detector="peaks",
                                  splits=(0.0, 1.5))
    assert chosen["split"] == 1.5
    _, preds, _ = evaluation.score([m], [dots], chosen["threshold"], [1.5], detector="peaks",
                                   split=chosen["split"])
    assert len(preds[0]) == len(dots)
