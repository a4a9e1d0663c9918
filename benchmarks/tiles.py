"""Tile size is part of the method: F1 and MAE of a model folder predicted whole and tile by
tile, one JSON line per tiling.

For each tiling the model's detector is recalibrated on its own calibration images (as
training does, with that tiling) and scored on its held-out images, both from the folder's
config.json; `--volume` with `--mask` (a label mask, each label one cell) or `--dots` (a dot
CSV) adds an independent volume, scored with the detector calibrated on the model's own
images.

    python benchmarks/tiles.py --model=pretrained/vgg2d_cpu --crops=1,2,4,0
    python benchmarks/tiles.py --model=workdir/q3d_general --crops=1,2,4,0
    python benchmarks/tiles.py --model=workdir/s3d_general --crops=1,2,4,0 \
        --volume=../shared/data/stardist_synthetic3d/img3d.tif \
        --mask=../shared/data/stardist_synthetic3d/mask3d.tif
    python benchmarks/big_volume.py write --path=workdir/v384.tif --shape=48,384,384 \
        --truth=workdir/v384.csv
    python benchmarks/tiles.py --model=workdir/s3d_general --crops=1,2,3,4 \
        --volume=workdir/v384.tif --dots=workdir/v384.csv

`--crops`: tile sizes in training crops per axis (0: the whole image, one network input);
`--context`: context on each side, in training crops (default 0.5).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cellcount_jax import data, evaluation, load_model, metrics, model_folder  # noqa: E402
from cellcount_jax.data import io  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model folder")
    p.add_argument("--crops", default="1,2,4,0")
    p.add_argument("--context", type=float, default=0.5)
    p.add_argument("--volume", default="", help="an extra test image")
    p.add_argument("--mask", default="", help="its label mask")
    p.add_argument("--dots", default="", help="or its cells' centres (a dot CSV)")
    a = p.parse_args()
    config = model_folder.read_config(a.model)
    splits = data.load(config)
    predictor = load_model(a.model)
    crop = np.asarray(predictor.record["train_crop"])
    largest = np.max([im.shape[:-1] for s in (splits.calibration, splits.test) for im in s.images]
                     + ([tifffile.TiffFile(a.volume).series[0].shape[:len(crop)]]
                        if a.volume else []), axis=0)
    for crops in (float(c) for c in a.crops.split(",")):
        if crops:
            tile = [int(t) for t in np.round(crop * crops)]
            context = [int(c) for c in np.round(crop * a.context)]
        else:
            tile, context = [int(s) for s in largest], [0] * len(crop)
        predictor.record["tiling"] = {"tile": tile, "context": context}
        start = time.time()
        evaluation.calibrate_record(config, predictor, splits)
        summary = evaluation.evaluate(config, predictor, splits, baseline=False, verbose=False)
        seconds = time.time() - start
        d = predictor.record["detector"]
        row = {"model": a.model, "crops": crops or "whole", "tile": tile, "context": context,
               "threshold": d["threshold"], "min_distance": d.get("min_distance", 0.0),
               "test_images": summary["num_test_images"],
               **{k: round(float(summary["model"][k]), 4)
                  for k in ("mae", "mae_corrected", "precision", "recall", "f1")},
               "tta": predictor.tta, "seconds": round(seconds, 1)}
        if a.volume:
            image = io.read_image(a.volume, predictor.ndim)
            truth = (io.read_dots_csv(a.dots, predictor.ndim) if a.dots
                     else io.dots_from_mask(tifffile.imread(a.mask)))
            det = predictor.detect(image)
            r = metrics.evaluate_points([det.pixels], [truth], d["radius"], predictor.spacing)
            row["volume"] = {"file": os.path.basename(a.volume), "true": len(truth),
                             "detections": len(det),
                             **{k: round(float(r[k]), 4) for k in ("precision", "recall", "f1")}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
