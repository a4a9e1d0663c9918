"""The input zoom: F1 and MAE of a model folder at each input zoom, one JSON line per zoom.

For each zoom the detector is recalibrated at that zoom on the model's calibration images
(as training does; from the folder's config.json) and scored on them and on its held-out
images. `--pool` (VGG models) also scores the images of the unlabeled pool with their dots,
which recipes with 8 labeled images never train on with labels: a check of the zoom that
calibration would choose without looking at the test images.

    python benchmarks/zooms.py --model=pretrained/vgg2d_cpu --zooms=1,1.03,1.06,1.09 --pool
"""
import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cellcount_jax import data, evaluation, load_model, model_folder  # noqa: E402


def pool_split(config, normaliser):
    """The VGG unlabeled pool as a labeled Split (its dots read from the data folder)."""
    cfg = config.data
    if cfg.source != "vgg":
        raise SystemExit("--pool needs a model trained on the VGG cells (data.source 'vgg')")
    _, pool, _ = data.vgg_split(cfg.split_seed, cfg.num_labeled)
    split = data.vgg_labeled(cfg.path, pool)
    split.images = [normaliser.image(im) for im in split.images]
    return split


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model folder")
    p.add_argument("--zooms", default="1,1.03,1.06,1.09")
    p.add_argument("--pool", action="store_true", help="score the VGG unlabeled pool too")
    a = p.parse_args()
    config = model_folder.read_config(a.model)
    splits = data.load(config)
    predictor = load_model(a.model)
    sets = {"calibration": splits.calibration, "test": splits.test}
    if a.pool:
        sets["pool"] = pool_split(config, splits.normaliser)
    for zoom in (float(z) for z in a.zooms.split(",")):
        config.predict.zooms = (zoom,)
        start = time.time()
        evaluation.calibrate_record(config, predictor, splits)
        d = predictor.record["detector"]
        row = {"model": a.model, "zoom": zoom, "tta": predictor.tta, "threshold": d["threshold"],
               "min_distance": d.get("min_distance", 0.0)}
        for name, split in sets.items():
            s = evaluation.evaluate(config, predictor, dataclasses.replace(splits, test=split),
                                    baseline=False, verbose=False)["model"]
            row[name] = {"images": len(split.images),
                         **{k: round(float(s[k]), 4)
                            for k in ("mae", "mae_corrected", "precision", "recall", "f1")}}
        row["seconds"] = round(time.time() - start, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
