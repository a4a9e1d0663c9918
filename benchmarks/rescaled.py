"""Cells of another size: a model folder on the VGG test images zoomed by each scale (cells
`scale` times as large), one JSON line per (scale, mode) with F1, precision, recall and MAE at
the model's match radius times the scale, and the time per image.

Modes (`--diameter`): 'none' predicts the zoomed images as they are; 'auto' estimates the
cells' diameter on each image (`cellsize.estimate`) and rescales it to the model's training
cells (`Predictor.detect(image, diameter=...)`); 'true' gives the diameter it should find,
the model's training diameter times the scale. The first line is the reference, the images
as they are (scale 1, 'none'); every line gives its F1 as a ratio to the reference's. Images
are zoomed with `scipy.ndimage.zoom` (linear, pixel centres to pixel centres) and so are
their dots: a dot at pixel d goes to (d + 0.5) * s - 0.5, s = zoomed size / size per axis.

    python benchmarks/rescaled.py --model=pretrained/vgg2d_cpu --scales=0.5,1,2 \
        --diameter=none,auto,true [--images=100]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cellcount_jax import load_model, metrics  # noqa: E402
from cellcount_jax.data import io, vgg_split  # noqa: E402

MODES = ("none", "auto", "true")


def zoomed(image, dots, scale: float):
    """An image (*spatial, C) zoomed by `scale` per spatial axis (linear) and its dots."""
    factors = [scale] * (image.ndim - 1) + [1]
    out = ndimage.zoom(image, factors, order=1, grid_mode=True, mode="nearest")
    s = np.array(out.shape[:-1]) / np.array(image.shape[:-1])
    return out, (np.asarray(dots, np.float64) + 0.5) * s - 0.5


def run(model, images, dots, scale: float, mode: str) -> dict:
    """The scores of one (scale, mode) and its timings."""
    pairs = [zoomed(im, d, scale) for im, d in zip(images, dots)]
    radius = model.record["detector"]["radius"] * scale
    found, used, seconds = [], [], []
    for image, _ in pairs:
        start = time.perf_counter()
        diameter = None
        if mode == "auto":
            diameter = model.input_zoom(image, diameter="auto")[1]
        elif mode == "true":
            diameter = model.cell_diameter * scale
        found.append(model.detect(image, diameter=diameter))
        seconds.append(time.perf_counter() - start)
        used.append(diameter)
    r = metrics.evaluate_points([c.pixels for c in found], [d for _, d in pairs], radius,
                                model.spacing)
    row = {"scale": scale, "mode": mode, "images": len(images),
           "shape": list(pairs[0][0].shape[:-1]), "radius": round(radius, 3),
           **{k: round(float(r[k]), 4) for k in ("f1", "precision", "recall", "mae")}}
    if mode != "none":
        ratios = np.array(used) / (model.cell_diameter * scale)
        row.update(diameter_median=round(float(np.median(used)), 3),
                   diameter_vs_true_median=round(float(np.median(ratios)), 4),
                   diameter_vs_true_range=[round(float(ratios.min()), 4),
                                           round(float(ratios.max()), 4)])
    # The first image compiles the network for its window shape (an estimated diameter gives
    # each image its own shape: each compiles).
    row.update(first_image_s=round(seconds[0], 2),
               seconds_per_image=round(float(np.mean(seconds[1:] or seconds)), 3))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(ROOT, "pretrained", "vgg2d_cpu"),
                   help="a model folder")
    p.add_argument("--scales", default="0.5,1,2")
    p.add_argument("--diameter", default="none,auto,true",
                   help="modes, comma-separated: none, auto, true")
    p.add_argument("--images", type=int, default=100, help="the first N of the test images")
    p.add_argument("--vgg", default=os.path.join(ROOT, "..", "shared", "data", "vgg_cells"))
    a = p.parse_args()
    modes = [m.strip() for m in a.diameter.split(",")]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--diameter: modes among {MODES}, got {a.diameter!r}")
    if not os.path.isdir(a.vgg):
        print(f"skipped: no VGG cells data at {a.vgg}", file=sys.stderr)
        return
    model = load_model(a.model)
    if set(modes) - {"none"} and not model.cell_diameter:
        raise SystemExit(f"{a.model}: the model records no cell size ('cell_size')")
    test = vgg_split()[2][:a.images]
    images = [io.read_image(os.path.join(a.vgg, f"{i + 1:03d}cell.png"), 2, 3) for i in test]
    dots = [io.dots_from_red_pixels(os.path.join(a.vgg, f"{i + 1:03d}dots.png")) for i in test]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    common = {"model": a.model, "tta": model.tta, "model_diameter": model.cell_diameter,
              "cores": cores}
    reference = run(model, images, dots, 1.0, "none")
    print(json.dumps({**common, **reference, "f1_vs_reference": 1.0}), flush=True)
    for scale in (float(s) for s in a.scales.split(",")):
        for mode in modes:
            if (scale, mode) == (1.0, "none"):
                continue
            row = run(model, images, dots, scale, mode)
            row["f1_vs_reference"] = round(row["f1"] / max(reference["f1"], 1e-12), 4)
            print(json.dumps({**common, **row}), flush=True)


if __name__ == "__main__":
    main()
