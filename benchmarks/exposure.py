"""Counting under another exposure: a model folder on the VGG test images with their
intensities scaled, one JSON line per scale with MAE (of the detections and of the count
corrected for crowding), precision, recall and F1 at the model's calibrated radius. By default
the scaled values are kept as they are (a camera with headroom); `--saturate` rounds and clips
them to the 8-bit range of the files, as an 8-bit camera would record a brighter exposure (the
line then gives the fraction of saturated pixels).

    python benchmarks/exposure.py --model=pretrained/vgg2d_cpu --scales=0.3,1,3 [--saturate]
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
    p.add_argument("--saturate", action="store_true", help="round and clip to 0-255")
    p.add_argument("--vgg", default=os.path.join(ROOT, "..", "shared", "data", "vgg_cells"))
    a = p.parse_args()
    model = load_model(a.model)
    _, _, test = vgg_split()
    images = [io.read_image(os.path.join(a.vgg, f"{i + 1:03d}cell.png"), 2, 3) for i in test]
    dots = [io.dots_from_red_pixels(os.path.join(a.vgg, f"{i + 1:03d}dots.png")) for i in test]
    radius = model.record["detector"]["radius"]
    for scale in (float(s) for s in a.scales.split(",")):
        scaled = [np.clip(np.round(im * scale), 0, 255) if a.saturate else im * scale
                  for im in images]
        cells = [model.detect(im) for im in scaled]
        r = metrics.evaluate_points([c.pixels for c in cells], dots, radius, model.spacing)
        r["mae_corrected"] = np.mean([abs(c.count_corrected - len(d)) for c, d in zip(cells, dots)])
        extra = ({"saturated_fraction": round(float(np.mean([np.mean(im == 255) for im in scaled])), 4)}
                 if a.saturate else {})
        print(json.dumps({"model": a.model, "scale": scale, "saturate": a.saturate, **extra,
                          "images": len(images),
                          "normalisation": model.record["normalisation"]["mode"],
                          "tta": model.tta,
                          **{k: round(float(r[k]), 4) for k in ("mae", "mae_corrected",
                                                                "precision", "recall", "f1")}}),
              flush=True)


if __name__ == "__main__":
    main()
