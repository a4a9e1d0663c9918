"""Counting and locating cells in new images with a trained model.

For each image of a folder (or one file): `<name>_detections.csv` (pixel and physical
coordinates, density at the detection), `<name>_density.tif` (float32 map), `<name>_overlay.png`
(the image with detections in red and, when annotations are given, ground truth in green;
3D volumes are shown as a maximum projection along z), and one `counts.csv` for all images.
The normalisation, threshold and detector come from `<workdir>/inference.json`, which
evaluation writes after training.
"""
import csv
import json
import os

import numpy as np
import tifffile
from PIL import Image

from cellcount_jax import evaluation, metrics, train
from cellcount_jax.data import Split, io, read_annotation, read_folder


def normalise_image(image, norm):
    image = image * norm.get("input_scale", 1.0)
    if norm["mode"] == "channel_stats":
        return ((image - np.asarray(norm["mean"])) / np.asarray(norm["std"])).astype(np.float32)
    return ((image - image.min()) / max(float(image.max() - image.min()), 1e-12)).astype(np.float32)


def _to_rgb8(image):
    """A displayable uint8 RGB view of (*spatial, C) (3D: max projection along z)."""
    a = image.max(0) if image.ndim == 4 else image
    a = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a[..., :1], 3, -1)
    lo, hi = np.percentile(a, 0.5), np.percentile(a, 99.8)
    return (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def _draw(rgb, points, colour, radius, cross=False):
    h, w = rgb.shape[:2]
    for p in np.asarray(points).reshape(-1, np.shape(points)[-1] if len(points) else 2):
        y, x = int(round(p[-2])), int(round(p[-1]))
        if cross:
            for d in range(-radius, radius + 1):
                for yy, xx in ((y + d, x), (y, x + d)):
                    if 0 <= yy < h and 0 <= xx < w:
                        rgb[yy, xx] = colour
        else:
            t = np.linspace(0, 2 * np.pi, 8 * radius + 8, endpoint=False)
            yy = np.clip(np.round(y + radius * np.sin(t)).astype(int), 0, h - 1)
            xx = np.clip(np.round(x + radius * np.cos(t)).astype(int), 0, w - 1)
            rgb[yy, xx] = colour
    return rgb


def overlay(image, detections, truth=None, scale: int = 2):
    """RGB uint8 overlay: ground truth as green circles, detections as red crosses."""
    rgb = _to_rgb8(image)
    rgb = np.repeat(np.repeat(rgb, scale, 0), scale, 1)
    up = lambda pts: np.asarray(pts, np.float64) * scale + (scale - 1) / 2
    if truth is not None and len(truth):
        _draw(rgb, up(truth), (0, 255, 0), 3 * scale)
    if len(detections):
        _draw(rgb, up(detections), (255, 0, 0), 2 * scale, cross=True)
    return rgb


def load_inference_info(workdir):
    path = os.path.join(workdir, "inference.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: train (or --mode=evaluate) in {workdir} first")
    with open(path) as f:
        return json.load(f)


def predict_paths(config, model, params, workdir, inputs, output, annotations=""):
    """Runs the model on `inputs` (a folder or one PNG/TIFF file), writes to `output`.

    annotations: for a folder, a folder of `<stem>.csv` / mask files; for one file, its dot
    CSV or mask file. Optional: with it, overlays show the truth and counts.csv scores."""
    info = load_inference_info(workdir)
    ndim = len(config.train.crop)
    if os.path.isdir(inputs):
        split = read_folder(inputs, annotations, ndim)
    elif os.path.isfile(inputs):
        image = io.read_image(inputs, ndim)
        dots = read_annotation(annotations, image.shape[:-1], inputs) if annotations else None
        split = Split([image], [dots], [os.path.splitext(os.path.basename(inputs))[0]])
    else:
        raise ValueError(f"--input {inputs!r} is neither a folder nor a file")
    os.makedirs(output, exist_ok=True)
    spacing = tuple(info["spacing"])
    predict = evaluation.make_predict_fn(model, info["normalisation"]["mode"] == "minmax")
    counts = []
    for image, dots, name in zip(split.images, split.dots, split.names):
        density = predict(params, normalise_image(image, info["normalisation"]))
        det = evaluation.detect(density, info["threshold"], info["detector"], info["min_size"])
        at = density[tuple(np.clip(np.round(det).astype(int), 0, np.array(density.shape) - 1).T)]
        io.write_dots_csv(os.path.join(output, f"{name}_detections.csv"), det, spacing,
                          {"density": at})
        tifffile.imwrite(os.path.join(output, f"{name}_density.tif"), density.astype(np.float32),
                         photometric="minisblack")
        Image.fromarray(overlay(image, det, dots)).save(os.path.join(output, f"{name}_overlay.png"))
        row = {"name": name, "count_detections": len(det),
               "count_integration": round(float(density.sum() / info["mass_per_dot"]), 2)}
        if dots is not None:
            tp, fp, fn = metrics.match(det, dots, info["radius"], spacing)
            row.update(true_count=len(dots), tp=tp, fp=fp, fn=fn)
        counts.append(row)
    keys = list(dict.fromkeys(k for r in counts for k in r))
    with open(os.path.join(output, "counts.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(counts)
    print(f"wrote detections, density maps and overlays of {len(counts)} image(s) to {output}")
    return counts


def predict_cli(config, workdir, inputs, output, annotations=""):
    """`launch.py --mode=predict`: the latest checkpoint of `workdir` on `inputs`."""
    channels = load_inference_info(workdir)["channels"]
    model, params = train.restore_params(config, workdir, channels)
    return predict_paths(config, model, params, workdir, inputs, output, annotations)
