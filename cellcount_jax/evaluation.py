"""Evaluation on held-out images: density -> detections -> count MAE and detection F1.

The detection threshold is chosen on the labeled training images only (the threshold that
maximises their F1), never on the test set. The same protocol gives a baseline that
thresholds the image itself, so a reader sees what the network adds.
"""
import json
import os

import jax
import numpy as np

from cellcount_jax import metrics, postprocess


def make_predict_fn(model):
    """Jitted `(params, image (*spatial, C)) -> density (*spatial)`, deterministic."""
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x[None], train=False)[0])
    return lambda params, image: np.asarray(fn(params, image))


def calibrate_threshold(maps, dots, candidates, radius, spacing=None, min_size=1):
    """The candidate threshold with the best pooled F1 (then lowest MAE) on (maps, dots)."""
    best = None
    for t in candidates:
        preds = [postprocess.detect(m, t, min_size) for m in maps]
        r = metrics.evaluate_points(preds, dots, radius, spacing)
        key = (r["f1"], -r["mae"])
        if best is None or key > best[0]:
            best = (key, float(t))
    return best[1]


def score(maps, dots, threshold, radius, spacing=None, min_size=1):
    preds = [postprocess.detect(m, threshold, min_size) for m in maps]
    out = metrics.evaluate_points(preds, dots, radius, spacing)
    out["threshold"] = threshold
    out["count_mean"] = float(np.mean([len(p) for p in preds]))
    out["true_count_mean"] = float(np.mean([len(d) for d in dots]))
    return out


def evaluate(config, model, params, splits, workdir=None):
    """Scores `params` on splits['test']; writes `workdir/eval.json`; returns the summary.

    Summary: {'model': {...}, 'raw_threshold': {...}} with mae, precision, recall, f1 and the
    threshold each used.
    """
    ev = config.eval
    spacing = splits["spacing"]
    train, (test_images, test_dots) = splits["train"], splits["test"]
    predict = make_predict_fn(model)
    train_maps = [predict(params, im) for im in train.images]
    test_maps = [predict(params, im) for im in test_images]
    candidates = config.target.scale * np.asarray(ev.threshold_fractions)
    thr = calibrate_threshold(train_maps, train.dots, candidates, ev.radius, spacing, ev.min_size)
    summary = {"model": score(test_maps, test_dots, thr, ev.radius, spacing, ev.min_size)}

    # Baseline: threshold the channel mean of the (normalised) image, calibrated the same way.
    raw = lambda ims: [im.mean(-1) for im in ims]
    train_raw = raw(train.images)
    raw_candidates = np.quantile(np.concatenate([r.ravel() for r in train_raw]),
                                 np.linspace(0.3, 0.995, 40))
    raw_thr = calibrate_threshold(train_raw, train.dots, raw_candidates, ev.radius, spacing,
                                  ev.min_size)
    summary["raw_threshold"] = score(raw(test_images), test_dots, raw_thr, ev.radius, spacing,
                                     ev.min_size)
    summary["num_test_images"] = len(test_images)
    summary["radius"] = ev.radius
    print(format_table(summary), flush=True)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def format_table(summary):
    rows = [f"held-out images: {summary['num_test_images']}, match radius {summary['radius']}",
            f"{'method':<16}{'MAE':>8}{'precision':>11}{'recall':>8}{'F1':>8}{'count':>8}{'true':>8}"]
    for name in ("model", "raw_threshold"):
        r = summary[name]
        rows.append(f"{name:<16}{r['mae']:>8.2f}{100 * r['precision']:>10.2f}%"
                    f"{100 * r['recall']:>7.2f}%{100 * r['f1']:>7.2f}%"
                    f"{r['count_mean']:>8.1f}{r['true_count_mean']:>8.1f}")
    return "\n".join(rows)
