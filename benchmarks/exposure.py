"""Counting under another exposure: a model folder on the VGG test images with their
intensities scaled (and clipped to the 8-bit range, as a camera saturates), one JSON line per
scale with MAE, precision, recall and F1 at the model's calibrated radius.

    python benchmarks/exposure.py --model=pretrained/vgg2d_cpu --scales=0.3,1,3
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cellcount_jax import load_model, metrics  # noqa: E402
from cellcount_jax.data import io, vgg_split  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model folder")
    p.add_argument("--scales", default="0.3,1,3")
    p.add_argument("--vgg", default=os.path.join(ROOT, "..", "shared", "data", "vgg_cells"))
    a = p.parse_args()
    model = load_model(a.model)
    _, _, test = vgg_split()
    images = [io.read_image(os.path.join(a.vgg, f"{i + 1:03d}cell.png"), 2, 3) for i in test]
    dots = [io.dots_from_red_pixels(os.path.join(a.vgg, f"{i + 1:03d}dots.png")) for i in test]
    radius = model.record["detector"]["radius"]
    for scale in (float(s) for s in a.scales.split(",")):
        preds = [model.detect(np.clip(np.round(im * scale), 0, 255)).pixels for im in images]
        r = metrics.evaluate_points(preds, dots, radius, model.spacing)
        print(json.dumps({"model": a.model, "scale": scale, "images": len(images),
                          "normalisation": model.record["normalisation"]["mode"],
                          **{k: round(float(r[k]), 4) for k in ("mae", "precision", "recall",
                                                                "f1")}}), flush=True)


if __name__ == "__main__":
    main()
