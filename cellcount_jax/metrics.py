"""Counting and detection metrics: count MAE, one-to-one matching, precision/recall/F1."""
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


def match(pred: np.ndarray, gt: np.ndarray, radius: float, spacing: Optional[Sequence[float]] = None):
    """One-to-one matching of predicted and true points within `radius` (physical units).

    The assignment maximises the number of matches, then minimises their total distance
    (Hungarian algorithm). Returns (true positives, false positives, false negatives).
    """
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if len(pred) == 0 or len(gt) == 0:
        return 0, len(pred), len(gt)
    scale = np.ones(pred.shape[1]) if spacing is None else np.asarray(spacing, np.float64)
    d = cdist(pred * scale, gt * scale)
    ok = d <= radius
    # Any match beats any distance: a match costs its distance minus a constant larger than
    # every distance, a non-match costs 0.
    big = radius + 1.0
    cost = np.where(ok, d - big, 0.0)
    rows, cols = linear_sum_assignment(cost)
    tp = int(ok[rows, cols].sum())
    return tp, len(pred) - tp, len(gt) - tp


def detection_scores(tp: int, fp: int, fn: int):
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def evaluate_points(preds, gts, radius: float, spacing=None):
    """MAE of counts and pooled precision/recall/F1 over a list of images."""
    tp = fp = fn = 0
    errors = []
    for p, g in zip(preds, gts):
        a, b, c = match(p, g, radius, spacing)
        tp, fp, fn = tp + a, fp + b, fn + c
        errors.append(abs(len(p) - len(g)))
    out = {"mae": float(np.mean(errors)) if errors else 0.0, "tp": tp, "fp": fp, "fn": fn}
    out.update(detection_scores(tp, fp, fn))
    return out
