"""Counting and locating cells in new images with a model folder.

For each image of a folder (or one file): `<name>_detections.csv` (pixel and physical
coordinates, density at the detection), `<name>_density.tif` (float32 map), `<name>_overlay.png`
(the image with detections as red crosses and, when annotations are given, ground truth as
green circles, with a legend; 3D volumes as a maximum projection along z), and one
`counts.csv` for all images. Everything comes from the model folder (`model_folder.load_model`).
"""
import csv
import os

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from cellcount_jax import metrics, model_folder, postprocess
from cellcount_jax.data import Split, io, read_annotation, read_folder
from cellcount_jax.errors import InputError


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
    """RGB uint8 overlay: ground truth as green circles, detections as red crosses, and a
    legend strip below the image with the counts."""
    rgb = _to_rgb8(image)
    rgb = np.repeat(np.repeat(rgb, scale, 0), scale, 1)
    up = lambda pts: np.asarray(pts, np.float64) * scale + (scale - 1) / 2
    if truth is not None and len(truth):
        _draw(rgb, up(truth), (0, 255, 0), 3 * scale)
    if len(detections):
        _draw(rgb, up(detections), (255, 0, 0), 2 * scale, cross=True)
    legend = Image.new("RGB", (rgb.shape[1], 14 if truth is None else 28), (0, 0, 0))
    draw = ImageDraw.Draw(legend)
    draw.text((4, 1), f"+ red: {len(detections)} detections", fill=(255, 64, 64))
    if truth is not None:
        draw.text((4, 15), f"o green: {len(truth)} annotated cells", fill=(64, 255, 64))
    return np.concatenate([rgb, np.asarray(legend)], 0)


def read_inputs(inputs: str, ndim: int, annotations: str = "", roi: str = ""):
    """A Split of a folder of images or of one image file, with optional annotations and
    regions of interest (folders, or files for one image)."""
    if roi and not annotations:
        raise InputError("--roi needs --annotations (the region is where the dots are complete)")
    if os.path.isdir(inputs):
        return read_folder(inputs, annotations, ndim, roi_dir=roi)
    if os.path.isfile(inputs):
        image = io.read_image(inputs, ndim)
        dots = read_annotation(annotations, image.shape[:-1], inputs) if annotations else None
        rois = [io.read_roi(roi, image.shape[:-1])] if roi else None
        return Split([image], [dots], [os.path.splitext(os.path.basename(inputs))[0]], rois)
    raise InputError(f"--input {inputs!r} is neither a folder nor a file")


def predict_paths(predictor, inputs: str, output: str, annotations: str = "", roi: str = ""):
    """Runs `predictor` on `inputs` (a folder or one PNG/TIFF file), writes to `output`,
    prints one line per image and returns the rows of counts.csv.

    annotations: for a folder, a folder of `<stem>.csv` / mask files; for one file, its dot
    CSV or mask file. Optional: with it, overlays show the truth and counts.csv scores.
    roi: regions of interest of partly dotted annotations (`io.read_roi`, a folder or a file
    like `annotations`): the scores count the dots and detections inside them only."""
    split = read_inputs(inputs, predictor.ndim, annotations, roi)
    os.makedirs(output, exist_ok=True)
    spacing = predictor.spacing
    radius = predictor.record["detector"]["radius"] if predictor.calibrated else None
    counts = []
    print(f"{'image':<24}{'detections':>11}{'integration':>12}" +
          (f"{'true':>6}{'TP':>6}{'FP':>6}{'FN':>6}" if annotations else ""), flush=True)
    for i, (image, dots, name) in enumerate(zip(split.images, split.dots, split.names)):
        density = predictor.density(image)
        det = predictor.detections_of(density)
        io.write_dots_csv(os.path.join(output, f"{name}_detections.csv"), det.pixels, spacing,
                          {"density": det.density})
        tifffile.imwrite(os.path.join(output, f"{name}_density.tif"), density.astype(np.float32),
                         photometric="minisblack")
        Image.fromarray(overlay(image, det.pixels, dots)).save(
            os.path.join(output, f"{name}_overlay.png"))
        row = {"name": name, "count_detections": len(det),
               "count_integration": round(det.count_integration, 2)}
        line = f"{name:<24}{len(det):>11d}{det.count_integration:>12.1f}"
        if dots is not None:
            dots = postprocess.inside(dots, split.roi(i))
            tp, fp, fn = metrics.match(postprocess.inside(det.pixels, split.roi(i)), dots, radius,
                                       spacing)
            row.update(true_count=len(dots), tp=tp, fp=fp, fn=fn)
            line += f"{len(dots):>6d}{tp:>6d}{fp:>6d}{fn:>6d}"
        print(line, flush=True)
        counts.append(row)
    keys = list(dict.fromkeys(k for r in counts for k in r))
    with open(os.path.join(output, "counts.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(counts)
    total = sum(r["count_detections"] for r in counts)
    print(f"{len(counts)} image(s), {total} cells detected; detections, density maps, overlays "
          f"and counts.csv in {output}", flush=True)
    return counts


def predict_folder(workdir: str, inputs: str, output: str, annotations: str = "", roi: str = ""):
    """`cellcount predict`: the model folder `workdir` on `inputs`."""
    return predict_paths(model_folder.load_model(workdir), inputs, output, annotations, roi)
