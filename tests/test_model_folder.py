"""The model folder and the installed command: predict from the folder alone, config checks
on resume, the NaN guard, damaged checkpoints, run records, and one-line input errors."""
import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import ROOT, tiny_config
from cellcount_jax import checkpoints, load_model, records, train
from cellcount_jax.data import synthetic_image
from cellcount_jax.errors import InputError

CELLCOUNT = os.path.join(os.path.dirname(sys.executable), "cellcount")
VGG = os.path.join(ROOT, "..", "shared", "data", "vgg_cells")


def cellcount(*args, cwd, ok=True):
    out = subprocess.run([CELLCOUNT, *args], capture_output=True, text=True, cwd=cwd,
                         timeout=900)
    if ok:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def write_images(folder, seeds, shape=(32, 32), dots_folder=None):
    os.makedirs(folder, exist_ok=True)
    if dots_folder:
        os.makedirs(dots_folder, exist_ok=True)
    for s in seeds:
        img, dots = synthetic_image(s, shape=shape, num_cells=(4, 8), radius=3.0)
        Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(folder, f"im{s}.png"))
        if dots_folder:
            with open(os.path.join(dots_folder, f"im{s}.csv"), "w") as f:
                f.write("y,x\n" + "".join(f"{y},{x}\n" for y, x in dots))


USER_CONFIG = '''
from cellcount_jax.configs import quickstart

def get_config():
    c = quickstart.get_config()
    c.model.features = 4
    c.train.crop = (16, 16)
    c.train.batch, c.train.unlabeled_batch = 2, 2
    c.train.steps, c.train.checkpoint_every, c.train.log_every = 120, 60, 60
    c.optim.lr = 3e-3
    c.data.normalise = "percentile"
    c.augment.contrast, c.augment.brightness, c.augment.gamma, c.augment.noise = 0.2, 0.1, 0.2, 0.05
    return c
'''


def rows_by_name(path):
    out = {}
    for r in csv.DictReader(open(path)):
        out.setdefault(r["name"], []).append((float(r["axis-0"]), float(r["axis-1"])))
    return out


def test_predict_from_the_folder_alone(tmp_path):
    """Train with a config file of the user's, delete it, then predict from another directory
    with the model folder only: the detections evaluation gave."""
    write_images(tmp_path / "train", range(4), dots_folder=tmp_path / "dots")
    write_images(tmp_path / "test", range(10, 13), dots_folder=tmp_path / "test_dots")
    cfg = tmp_path / "myconfig.py"
    cfg.write_text(USER_CONFIG)
    wd = str(tmp_path / "model")
    log = cellcount("train", f"--config={cfg}", f"--workdir={wd}",
                    f"--images={tmp_path / 'train'}", f"--dots={tmp_path / 'dots'}",
                    f"--test-images={tmp_path / 'test'}", f"--test-dots={tmp_path / 'test_dots'}",
                    cwd=str(tmp_path)).stdout
    assert "labeled       4 images" in log and "test          3 images" in log
    assert "calibrating the detector" in log and "scoring the 3 held-out images" in log
    os.remove(cfg)
    config = json.load(open(os.path.join(wd, "config.json")))
    assert config["data"]["source"] == "folder" and config["model"]["features"] == 4
    record = json.load(open(os.path.join(wd, "inference.json")))
    assert record["ndim"] == 2 and record["channels"] == 3 and record["detector"]["name"]
    assert record["normalisation"] == {"mode": "percentile", "percentiles": [1.0, 99.8]}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = cellcount("predict", f"--model={wd}", f"--input={tmp_path / 'test'}", "--output=out",
                    cwd=str(elsewhere))
    assert "im10" in out.stdout and "cells detected" in out.stdout
    want = rows_by_name(os.path.join(wd, "eval_detections.csv"))
    assert sum(len(v) for v in want.values()) > 0
    for name in ("im10", "im11", "im12"):
        got = rows_by_name_plain(elsewhere / "out" / f"{name}_detections.csv")
        np.testing.assert_allclose(sorted(got), sorted(want.get(name, [])), atol=1e-3)
    # The library call gives the same detections, in pixels and physical units.
    model = load_model(wd)
    image = np.asarray(Image.open(tmp_path / "test" / "im11.png"))
    cells = model.detect(image)
    np.testing.assert_allclose(sorted(map(tuple, cells.pixels)), sorted(want.get("im11", [])),
                               atol=1e-3)
    np.testing.assert_allclose(cells.physical, cells.pixels)  # spacing 1
    assert model.density(image).shape == image.shape[:2]


def rows_by_name_plain(path):
    return [(float(r["axis-0"]), float(r["axis-1"])) for r in csv.DictReader(open(path))]


def test_resume_with_another_model_config_stops(tmp_path):
    c = tiny_config()
    wd = str(tmp_path / "run")
    train.train(c, wd)
    c2 = tiny_config()
    c2.model.features = 8
    with pytest.raises(InputError, match=r"model\.features: 4 -> 8"):
        train.train(c2, wd)
    # On purpose: the flag lets it through (and the checkpoint no longer fits the network).
    c3 = tiny_config()
    c3.train.steps = 6
    c3.target.scale = 50.0
    with pytest.raises(InputError, match="target.scale"):
        train.train(c3, wd)
    train.train(c3, wd, allow_config_change=True)
    assert json.load(open(os.path.join(wd, "config.json")))["target"]["scale"] == 50.0


def test_a_diverging_run_stops_at_its_first_non_finite_step(tmp_path):
    c = tiny_config()
    wd = str(tmp_path / "run")
    train.train(c, wd)  # steps 2 and 4 saved
    c.train.steps = 12
    c.optim.lr = 1e6  # optim is not part of the resume check
    with pytest.raises(train.Diverged, match=r"diverged at step \d+: non-finite") as e:
        train.train(c, wd)
    bad = int(str(e.value).split("step ")[1].split(":")[0])
    assert 4 < bad <= 12
    latest = checkpoints.manager(wd).latest_step()
    assert 4 <= latest < bad and f"latest checkpoint is step {latest}" in str(e.value)
    step, params = checkpoints.restore_params(wd)
    assert step == latest
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
    # No records of the non-finite step.
    assert all(l["step"] < bad for l in records.read_metrics(wd))


def _restore_state(c, wd):
    _, params = checkpoints.restore_params(wd)
    return params


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path):
    c = tiny_config()
    full, damaged = str(tmp_path / "full"), str(tmp_path / "damaged")
    train.train(c, full)
    shutil.copytree(full, damaged)
    # Truncate the largest file of the latest checkpoint, as a full disk leaves it.
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(damaged, "checkpoints", "4"))
             for f in fs]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.warns(UserWarning, match=r"checkpoints/4 is damaged"):
        train.train(c, damaged)
    assert os.path.isdir(os.path.join(damaged, "checkpoints_damaged", "4"))
    a, b = _restore_state(c, full), _restore_state(c, damaged)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert [l["step"] for l in records.read_metrics(damaged)] == [2, 4]


def test_run_records_metrics_tensorboard_and_plot(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    c = tiny_config()
    c.train.steps, c.train.log_every, c.eval.every = 6, 2, 4
    wd = str(tmp_path / "run")
    train.train(c, wd)
    lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [2, 4, 6]
    for key in ("loss", "supervised", "consistency", "w", "lr", "grad_norm", "param_norm",
                "update_norm", "steps_per_s", "images_per_s"):
        assert all(key in l for l in lines), key
    assert "eval_f1" in lines[1] and "eval_mae" in lines[1] and "eval_f1" not in lines[0]
    acc = EventAccumulator(os.path.join(wd, "tensorboard"))
    acc.Reload()
    for key in ("loss", "supervised", "lr", "eval_f1"):
        events = acc.Scalars(key)
        want = [(l["step"], l[key]) for l in lines if key in l]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events] == want
    png = np.asarray(Image.open(os.path.join(wd, "training.png")))
    assert png.ndim == 3 and png.shape[0] > 100


ERROR_CASES = [
    # (what the README promises, arguments, a part of the one-line message)
    ("missing image folder", ["train", "--images=nowhere", "--dots=nowhere"], "nowhere"),
    ("missing annotation folder", ["train", "--images=imgs", "--dots=nodots"], "nodots"),
    ("unreadable image", ["predict", "--model=MODEL", "--input=bad.png"], "bad.png"),
    ("dots outside the image", ["train", "--images=imgs", "--dots=outside"], "outside the image"),
    ("annotation without an image", ["train", "--images=imgs", "--dots=orphans"], "without an image"),
    ("wrong rank", ["predict", "--model=MODEL", "--input=vol.tif"], "vol.tif"),
    ("NaN in an image", ["predict", "--model=MODEL", "--input=nan.tif"], "NaN"),
    ("wrong channel count", ["predict", "--model=MODEL", "--input=grey.png"], "3 channel(s)"),
    ("empty dataset", ["train", "--images=empty", "--dots=dots"], "no PNG or TIFF images"),
    ("no labeled images", ["train", "--images=imgs", "--dots=empty"], "no labeled"),
    ("bad config value", ["train", "--config.train.parallel=vmap"], "config.train.parallel"),
    ("unknown config", ["train", "--config=nosuch"], "nosuch"),
    ("config field that does not exist", ["train", "--config.train.nosuch=1"], "nosuch"),
    ("no model folder", ["predict", "--model=nosuchmodel", "--input=imgs"], "nosuchmodel"),
    ("not a model folder", ["evaluate", "--workdir=imgs"], "imgs"),
    ("zooms that are not numbers", ["evaluate", "--workdir=imgs", "--zooms=1,big"], "--zooms"),
    ("evaluate away from the training directory", ["evaluate", "--workdir=relmodel"],
     "relative to the directory training ran from (../imgs_there, ../dots_there)"),
]


@pytest.fixture(scope="module")
def error_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    write_images(d / "imgs", range(2), dots_folder=d / "dots")
    os.makedirs(d / "outside")
    (d / "outside" / "im0.csv").write_text("y,x\n5,500\n")
    os.makedirs(d / "orphans")
    (d / "orphans" / "im9.csv").write_text("y,x\n5,5\n")
    (d / "bad.png").write_bytes(b"not a png")
    tifffile.imwrite(d / "vol.tif", np.zeros((4, 16, 16, 16), np.float32))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "grey.png")
    os.makedirs(d / "empty")
    a = np.zeros((16, 16, 3), np.float32)
    a[3, 3, 1] = np.nan
    tifffile.imwrite(d / "nan.tif", a)
    os.makedirs(d / "relmodel")  # a folder trained one directory down, data named relative to it
    (d / "relmodel" / "config.json").write_text(json.dumps(
        {"data": {"source": "folder", "images": "../imgs_there", "annotations": "../dots_there",
                  "test_images": ""}}))
    return d


@pytest.mark.parametrize("what,args,message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_input_errors_print_one_line_and_exit_2(error_dir, what, args, message):
    model = os.path.join(ROOT, "pretrained", "vgg2d_cpu")
    args = [a.replace("MODEL", model) for a in args]
    out = cellcount(*args, "--workdir=wd" if args[0] == "train" else "--verbose=false",
                    cwd=str(error_dir), ok=False)
    assert out.returncode == 2, (what, out.stdout[-1000:], out.stderr[-2000:])
    err = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (what, err)


def test_verbose_shows_the_traceback(error_dir):
    out = cellcount("predict", f"--model={ROOT}/pretrained/vgg2d_cpu", "--input=bad.png",
                    "--verbose", cwd=str(error_dir), ok=False)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_shipped_model_works_from_any_directory(tmp_path):
    img, dots = synthetic_image(0, shape=(96, 80), num_cells=(10, 20), radius=4.0)
    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "cells.png")
    out = cellcount("predict", "--model=pretrained/vgg2d_cpu", "--input=cells.png",
                    "--output=res", cwd=str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "res" / "counts.csv")))
    assert rows[0]["name"] == "cells" and "cells detected" in out.stdout
    if os.path.isdir(VGG):  # the shipped model on a VGG image it was not trained on
        model = load_model("pretrained/vgg2d_cpu")
        image = np.asarray(Image.open(os.path.join(VGG, "001cell.png")))
        assert abs(len(model.detect(image)) - 135) <= 10


def test_configs_by_name_and_the_default_for_your_own_images():
    from cellcount_jax import cli
    argv = cli._resolve_config_flag(["cellcount", "--images=x", "--config.train.steps=5"])
    assert argv[1].endswith(os.path.join("configs", "folder2d.py")) and os.path.isfile(argv[1][9:])
    argv = cli._resolve_config_flag(["cellcount", "--config=vgg2d_cpu", "--images=x"])
    assert argv == ["cellcount", "--config=" + cli.config_path("vgg2d_cpu"), "--images=x"]
    # The installed configs are the files of configs/ (no copies that could drift).
    assert os.path.samefile(cli.config_path("vgg2d_cpu"), os.path.join(ROOT, "configs", "vgg2d_cpu.py"))
    from cellcount_jax.configs import folder2d, folder3d
    assert folder2d.get_config().data.normalise == "percentile"
    assert folder3d.get_config().data.ndim == 3 and folder3d.get_config().augment.gamma > 0


def test_shipped_3d_model_counts_synthetic_nuclei():
    """`pretrained/synthetic3d` (configs/synthetic3d.py, seed 0) on a new volume of the same
    kind: it predicts with its best calibrating step and finds the nuclei."""
    from cellcount_jax import metrics
    model = load_model(os.path.join(ROOT, "pretrained", "synthetic3d"))
    assert model.step == model.record["selected"]["step"] and model.cell_diameter > 0
    img, dots = synthetic_image(1234, shape=(24, 64, 64), spacing=(2.0, 1.0, 1.0), channels=1,
                                num_cells=(40, 60), radius=4.0)
    cells = model.detect(img[..., 0])
    scores = metrics.evaluate_points([cells.pixels], [dots], 4.0, (2.0, 1.0, 1.0))
    assert scores["f1"] > 0.75, scores
