"""Evaluation on held-out images: density -> counts and detections -> MAE, precision/recall/F1.

Two count readouts:
- detections: `eval.detector` = 'components' (threshold, connected components, centroids),
  'peaks' (local maxima above the threshold) or 'auto' (whichever does better on the labeled
  training images); the count is the number of detections;
- integration: sum of the density divided by the mean target mass per dot measured on the
  labeled training targets (for Gaussian maps this is ~target_scale, the classic readout).
The detection threshold is the candidate with the best F1 on the labeled training images,
never chosen on the test set. The same protocol applied to the image itself (channel mean)
gives the `raw_threshold` baseline, which shows what the network adds.
"""
import csv
import json
import os

import numpy as np

from cellcount_jax import metrics, models, postprocess
from cellcount_jax.data.dataset import standardise


def make_predict_fn(model, standardise_input: bool = False):
    """`(params, image (*spatial, C)) -> density (*spatial)`: jitted and deterministic.

    Images of any size: edges are reflect-padded to a multiple of 8 and cropped back.
    """
    fn = models.jit(lambda p, x: model.apply({"params": p}, x[None], train=False)[0],
                    model.impl)
    m = 2 ** (models.LEVELS - 1)

    def predict(params, image):
        if standardise_input:
            image = standardise(image)
        spatial = image.shape[:-1]
        pad = [(0, -s % m) for s in spatial] + [(0, 0)]
        padded = np.pad(image, pad, mode="reflect" if min(spatial) > m else "edge")
        return np.asarray(fn(params, padded))[tuple(slice(0, s) for s in spatial)]

    return predict


def detect(density, threshold, detector="components", min_size=1):
    if detector == "components":
        return postprocess.detect(density, threshold, min_size)
    if detector == "peaks":
        return postprocess.local_maxima(density, threshold)
    raise ValueError(f"config.eval.detector must be 'components' or 'peaks', got {detector!r}")


def calibrate(maps, dots, candidates, radius, spacing=None, detector="components", min_size=1):
    """(detector, threshold) with the best pooled F1 (then lowest MAE) on (maps, dots).

    detector 'auto' tries 'components' and 'peaks'; the data are the labeled training images.
    """
    best = None
    for det in (("components", "peaks") if detector == "auto" else (detector,)):
        for t in candidates:
            preds = [detect(m, t, det, min_size) for m in maps]
            r = metrics.evaluate_points(preds, dots, radius, spacing)
            key = (r["f1"], -r["mae"])
            if best is None or key > best[0]:
                best = (key, det, float(t))
    return best[1], best[2]


def score(maps, dots, threshold, radii, spacing=None, detector="components", min_size=1,
          mass_per_dot=None):
    """Scores at each radius in `radii` (the first is the headline) plus per-image rows."""
    preds = [detect(m, threshold, detector, min_size) for m in maps]
    out = metrics.evaluate_points(preds, dots, radii[0], spacing)
    out["threshold"] = threshold
    out["by_radius"] = {str(r): metrics.evaluate_points(preds, dots, r, spacing) for r in radii}
    out["count_mean"] = float(np.mean([len(p) for p in preds]))
    out["true_count_mean"] = float(np.mean([len(d) for d in dots]))
    rows = []
    for p, d, m in zip(preds, dots, maps):
        tp, fp, fn = metrics.match(p, d, radii[0], spacing)
        rows.append({"true_count": len(d), "detected_count": len(p), "tp": tp, "fp": fp, "fn": fn})
        if mass_per_dot:
            rows[-1]["integrated_count"] = float(np.sum(m) / mass_per_dot)
    if mass_per_dot:
        out["mae_integration"] = float(np.mean([abs(r["integrated_count"] - r["true_count"])
                                                for r in rows]))
    return out, preds, rows


def evaluate(config, model, params, splits, workdir=None):
    """Scores `params` on splits['test']; writes to `workdir`: eval.json (summary),
    eval_per_image.csv, and inference.json (normalisation, threshold: what `predict` needs).

    Returns {'model': {...}, 'raw_threshold': {...}, ...}: mae (detections), mae_integration,
    precision, recall, f1 at `eval.radius`, `by_radius` for `eval.extra_radii`, thresholds.
    """
    ev = config.eval
    spacing = splits["spacing"]
    train, test = splits["train"], splits["test"]
    radii = [float(ev.radius)] + [float(r) for r in ev.extra_radii]
    predict = make_predict_fn(model, train.standardise_crops)
    train_maps = [predict(params, im) for im in train.images]
    test_maps = [predict(params, im) for im in test.images]
    # Thresholds relative to the typical peak of the training targets (scale for inverse
    # distance maps, the height of one Gaussian for density maps).
    peak = float(np.mean([t.max() for t in train.targets]))
    candidates = peak * np.asarray(ev.threshold_fractions)
    detector, thr = calibrate(train_maps, train.dots, candidates, radii[0], spacing,
                              ev.detector, ev.min_size)
    mass = sum(float(t.sum()) for t in train.targets) / max(sum(len(d) for d in train.dots), 1)
    model_scores, preds, rows = score(test_maps, test.dots, thr, radii, spacing, detector,
                                      ev.min_size, mass)
    model_scores["detector"] = detector
    summary = {"model": model_scores}

    raw = lambda ims: [im.mean(-1) for im in ims]
    train_raw = raw(train.images)
    raw_candidates = np.quantile(np.concatenate([r.ravel() for r in train_raw]),
                                 np.linspace(0.3, 0.995, 40))
    raw_det, raw_thr = calibrate(train_raw, train.dots, raw_candidates, radii[0], spacing,
                                 ev.detector, ev.min_size)
    summary["raw_threshold"] = score(raw(test.images), test.dots, raw_thr, radii, spacing,
                                     raw_det, ev.min_size)[0]
    summary["raw_threshold"]["detector"] = raw_det
    summary.update(num_test_images=len(test.images), radius=radii[0], detector=detector,
                   mass_per_dot=mass)
    print(format_table(summary), flush=True)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(workdir, "inference.json"), "w") as f:
            json.dump({"normalisation": splits["normalisation"], "threshold": thr,
                       "detector": detector, "min_size": ev.min_size, "spacing": spacing,
                       "mass_per_dot": mass, "radius": radii[0],
                       "channels": int(train.images[0].shape[-1])}, f, indent=2)
        with open(os.path.join(workdir, "eval_per_image.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, ["name"] + list(rows[0]))
            w.writeheader()
            for name, r in zip(test.names, rows):
                w.writerow({"name": name, **r})
    return summary


def format_table(summary):
    radii = list(summary["model"]["by_radius"])
    head = f"{'method':<15}{'MAE':>7}{'MAE int':>8}{'prec':>8}{'recall':>8}" + "".join(
        f"{'F1@' + r:>9}" for r in radii) + f"{'count':>8}{'true':>7}"
    rows = [f"held-out images: {summary['num_test_images']}, detector {summary['detector']}, "
            f"headline radius {summary['radius']}", head]
    for name in ("model", "raw_threshold"):
        r = summary[name]
        mi = r.get("mae_integration")
        rows.append(f"{name:<15}{r['mae']:>7.2f}{'' if mi is None else f'{mi:.2f}':>8}"
                    f"{100 * r['precision']:>7.2f}%{100 * r['recall']:>7.2f}%"
                    + "".join(f"{100 * r['by_radius'][k]['f1']:>8.2f}%" for k in radii)
                    + f"{r['count_mean']:>8.1f}{r['true_count_mean']:>7.1f}")
    return "\n".join(rows)
