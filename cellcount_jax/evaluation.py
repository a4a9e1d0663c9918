"""Calibration and scores: density -> counts and detections -> MAE, precision/recall/F1.

Two count readouts:
- detections: `eval.detector` = 'components' (threshold, connected components, centroids),
  'peaks' (local maxima above the threshold) or 'auto' (whichever does better on the labeled
  training images); the count is the number of detections;
- integration: sum of the density divided by the mean target mass per dot measured on the
  labeled training targets (for Gaussian maps this is ~target_scale, the classic readout);
- corrected: the detections plus the cells that crowding hides. Two cells closer than the
  network resolves give one peak, and in a field of cells the number of such merges grows
  with the number of close pairs, so the count is n + c * p, where p is the number of pairs of
  detections within twice the match radius (`crowding`) and c is fitted by least
  squares on the calibration images.
The detection threshold (with the input zoom, `predict.zooms`) is the candidate with the best
F1 on the labeled training images, or on held-out bands of them (`data.holdout`;
`calibrate_record`, stored in the model folder), never chosen on the test set; nearly flat
maps and thresholds that detect far more cells than there are dots are refused, and among
tied candidates the middle threshold is taken (`_search`). Where images
have regions of interest, only the dots and detections inside them count. The same protocol
applied to the image itself (channel mean) gives the `raw_threshold` baseline,
which shows what the network adds. In a job of several processes the density maps are split
across them; every process gets the same scores and process 0 prints and writes them.
"""
import csv
import itertools
import os
import warnings

import numpy as np

from cellcount_jax import distributed, metrics, postprocess
from cellcount_jax.data import io
from cellcount_jax.errors import InputError
from cellcount_jax.model_folder import write_json


def _within(maps, dots, rois, spacing):
    """Dots restricted to their regions of interest, and a detector of maps that keeps only
    the detections there: `detect(det, t, min_size, min_distance, splits)` gives, for each
    split ratio in `splits`, the detections of every map."""
    rois = rois or [None] * len(maps)
    dots = [postprocess.inside(d, r) for d, r in zip(dots, rois)]
    peaks = {}  # (map, min_distance): its maxima, the same for every threshold

    def detect(det, t, min_size, min_distance, splits=(0.0,)):
        out = []
        for i, (m, r) in enumerate(zip(maps, rois)):
            p = None
            if det == "peaks":
                if (i, min_distance) not in peaks:
                    peaks[i, min_distance] = postprocess.maxima(m, min_distance, spacing)
                p = peaks[i, min_distance]
            found = postprocess.detect_with(m, t, det, min_size, min_distance, spacing, p)
            out.append([postprocess.inside(q, r) for q in
                        postprocess.split_heavy_each(m, found, t, splits, spacing)])
        return [list(per_split) for per_split in zip(*out)]
    return dots, detect


def calibrate(maps, dots, candidates, radius, spacing=None, detector="components", min_size=1,
              rois=None, min_distances=(0.0,), max_ratio=None, peak=None, splits=(0.0,)):
    """The detector {'name', 'threshold', 'min_distance', 'split'} with the best pooled F1
    (then lowest MAE) on (maps, dots), within `rois` (bool masks or None per map) where given.

    detector 'auto' tries 'components' and 'peaks'; 'peaks' is tried with each of
    `min_distances` (physical units); each with each of `splits` (`postprocess.split_heavy`'s
    ratio; 0: no split); the data are the labeled training images (or their held-out bands).
    Degenerate candidates are refused (`_search`: `max_ratio`, `peak`).
    """
    return _search(maps, dots, candidates, radius, spacing, detector, min_size, rois,
                   min_distances, max_ratio, peak, splits=splits)[1]


FLAT = 0.05           # a map whose robust range is below this fraction of the targets' peak


def flat(maps, peak: float) -> bool:
    """Whether density maps are nearly flat: the spread between their 1st and 99.9th
    percentiles is below FLAT times the training targets' typical peak. A network that has not
    learned (or has collapsed) gives such maps, and any threshold then detects noise."""
    values = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])
    lo, hi = np.percentile(values, [1.0, 99.9])
    return bool(hi - lo < FLAT * peak)


def _search(maps, dots, candidates, radius, spacing, detector, min_size, rois, min_distances,
            max_ratio=None, peak=None, what="the density maps", splits=(0.0,)):
    """((F1, -MAE), detector) of `calibrate`'s choice, or (None, None) when every candidate is
    refused.

    Refused, with a warning that says what to do: maps that are nearly flat (`flat`, with the
    targets' `peak`), and candidates that detect more than `max_ratio` times as many cells as
    the maps have dots (a threshold in the background: it may still match every dot of a
    sparse image). Each candidate is tried with each of `splits` (`postprocess.split_heavy`'s
    ratios). Among the candidates that tie for the best score (few dots give many ties),
    the middle one of each detector's tied thresholds is taken, not the lowest: it is the
    furthest from a threshold where the count changes.
    """
    if peak is not None and flat(maps, peak):
        warnings.warn(f"calibration: {what} are nearly flat (spread below {FLAT:g} of the "
                      f"targets' peak {peak:.3g}); the network has not learned to mark cells. "
                      f"Train longer (config.train.steps), check that the dots belong to the "
                      f"images, or lower config.optim.lr", stacklevel=3)
        return None, None
    dots, detect = _within(maps, dots, rois, spacing)
    n_dots = sum(len(d) for d in dots)
    results, refused = [], []
    for det in (postprocess.DETECTORS if detector == "auto" else (detector,)):
        for md, t in itertools.product(min_distances if det == "peaks" else (0.0,),
                                       candidates):
            for split, preds in zip(splits, detect(det, t, min_size, md, splits)):
                n = sum(len(p) for p in preds)
                r = metrics.evaluate_points(preds, dots, radius, spacing)
                key = (r["f1"], -r["mae"])
                if max_ratio and n > max_ratio * n_dots + 1:
                    refused.append((key, det, float(t), n))
                    continue
                results.append((key, {"name": det, "threshold": float(t),
                                      "min_distance": float(md), "split": float(split)}))
    best_key = max((k for k, _ in results), default=None)
    better = [r for r in refused if best_key is None or r[0] > best_key]
    if better:  # a refused candidate would have been chosen
        _, det, t, n = max(better)
        warnings.warn(f"calibration: refused {det} at threshold {t:.3g}, the best score on the "
                      f"calibration images, because it detects {n} cells where they have "
                      f"{n_dots} dots (more than {max_ratio:g} times); "
                      + ("the best of the other candidates is taken" if results else
                         "no other candidate is left") +
                      ". The map does not separate cells from background well: train longer, "
                      "or check that the dots mark every cell of the labeled images",
                      stacklevel=3)
    if not results:
        return None, None
    tied = [d for k, d in results if k == best_key]
    first = tied[0]
    kind = lambda d: (d["name"], d["min_distance"], d["split"])  # noqa: E731
    same = [d for d in tied if kind(d) == kind(first)]
    return best_key, same[(len(same) - 1) // 2]


def crowding(preds, dots, distance, spacing=None):
    """{'distance', 'per_pair'}: the least-squares c of true = detected + c * close pairs
    (pairs of detections within `distance`) over images (0 where no image has a pair)."""
    pairs = np.array([postprocess.close_pairs(p, distance, spacing) for p in preds])
    missed = np.array([len(d) - len(p) for p, d in zip(preds, dots)], np.float64)
    c = float(pairs @ missed / (pairs @ pairs)) if pairs.any() else 0.0
    return {"distance": float(distance), "per_pair": c}


def corrected_count(points, crowd, spacing=None) -> float:
    """The detections' count plus the cells that crowding hides (`crowding`)."""
    pairs = postprocess.close_pairs(points, crowd["distance"], spacing)
    return postprocess.corrected_count(len(points), pairs, crowd)


def score(maps, dots, threshold, radii, spacing=None, detector="components", min_size=1,
          mass_per_dot=None, rois=None, min_distance=0.0, crowd=None, split=0.0):
    """Scores at each radius in `radii` (the first is the headline) plus per-image rows; with
    `rois`, of the dots and detections inside each image's region of interest (and the
    integration count of the map's mass there); with `crowd` (`crowding`), the corrected
    count's MAE too."""
    dots, detect = _within(maps, dots, rois, spacing)
    preds = detect(detector, threshold, min_size, min_distance, (split,))[0]
    out = metrics.evaluate_points(preds, dots, radii[0], spacing)
    out["threshold"] = threshold
    out["by_radius"] = {str(r): metrics.evaluate_points(preds, dots, r, spacing) for r in radii}
    out["count_mean"] = float(np.mean([len(p) for p in preds]))
    out["true_count_mean"] = float(np.mean([len(d) for d in dots]))
    rows = []
    for p, d, m, r in zip(preds, dots, maps, rois or [None] * len(maps)):
        tp, fp, fn = metrics.match(p, d, radii[0], spacing)
        rows.append({"true_count": len(d), "detected_count": len(p), "tp": tp, "fp": fp, "fn": fn})
        if mass_per_dot:
            mass = np.sum(m) if r is None else np.sum(m[r])
            rows[-1]["integrated_count"] = float(mass / mass_per_dot)
        if crowd:
            rows[-1]["corrected_count"] = round(corrected_count(p, crowd, spacing), 2)
    if mass_per_dot:
        out["mae_integration"] = float(np.mean([abs(r["integrated_count"] - r["true_count"])
                                                for r in rows]))
    if crowd:
        out["mae_corrected"] = float(np.mean([abs(r["corrected_count"] - r["true_count"])
                                              for r in rows]))
    return out, preds, rows


def _min_distances(ev):
    """The peak detector's minimum distances to try, in physical units."""
    return float(ev.radius) * np.asarray(ev.get("min_distance_fractions", (0.0,)))


def _splits(ev):
    """The ratios of `postprocess.split_heavy` to try (0: no split)."""
    return tuple(float(r) for r in (ev.get("split_ratios") or (0.0,)))


def _maps(predictor, images):
    """Density maps of normalised images; in a job of several processes each computes its
    share and all get every map (`distributed.gather_maps`)."""
    return distributed.gather_maps(lambda im: predictor.density(im, normalised=True), images,
                                   [im.shape[:-1] for im in images])


def zooms(config):
    """The input zooms that calibration chooses from (`predict.zooms`; (1,) where absent)."""
    values = tuple(float(z) for z in ((config.get("predict") or {}).get("zooms") or (1.0,)))
    if any(not 0.25 <= z <= 4 for z in values):
        raise InputError(f"config.predict.zooms must lie in [0.25, 4], got {values}")
    return values


def calibrate_record(config, predictor, splits):
    """Chooses the input zoom (among `predict.zooms`), detector and threshold on
    splits.calibration (the labeled training images, or held-out bands of them:
    `data.calibration_split`) and stores them in `predictor.record` ('zoom', 'detector'):
    the best pooled F1, then the lowest MAE, then the first zoom listed. Thresholds are tried
    relative to the typical peak of the training targets (scale for inverse distance maps, one
    Gaussian's height for density maps). Degenerate candidates are refused (`_search`: nearly
    flat maps, more than `eval.max_detections_ratio` times the dots); where every candidate is
    refused, the best of them is kept with `'degenerate': True` in the record. Returns the
    pooled F1 of the choice on the calibration images (0 where degenerate)."""
    ev, train = config.eval, splits.train
    cal = splits.calibration
    peak = float(np.mean([t.max() for t in train.targets]))
    candidates = peak * np.asarray(ev.threshold_fractions)
    max_ratio = float(ev.get("max_detections_ratio", 0.0) or 0.0) or None
    args = (candidates, float(ev.radius), splits.spacing, ev.detector, ev.min_size, cal.rois,
            _min_distances(ev))
    ratios = _splits(ev)
    best, degenerate = None, False
    for zoom in zooms(config):
        predictor.record["zoom"] = zoom
        zoom_maps = _maps(predictor, cal.images)
        key, zoom_detector = _search(zoom_maps, cal.dots, *args, max_ratio, peak,
                                     f"the density maps at input zoom {zoom:g}", ratios)
        if key is not None and (best is None or key > best[0]):
            best = (key, zoom, zoom_detector, zoom_maps)
    if best is None:  # every candidate refused: keep the best one, marked
        degenerate = True
        warnings.warn("calibration: every candidate detector was refused; the model folder "
                      "keeps the best of them, marked 'degenerate', and its counts are not to "
                      "be trusted", stacklevel=2)
        for zoom in zooms(config):
            predictor.record["zoom"] = zoom
            zoom_maps = _maps(predictor, cal.images)
            key, zoom_detector = _search(zoom_maps, cal.dots, *args, splits=ratios)
            if best is None or key > best[0]:
                best = (key, zoom, zoom_detector, zoom_maps)
    key, predictor.record["zoom"], detector, maps = best
    held_out = splits.held_out
    dots, detect = _within(maps, cal.dots, cal.rois, splits.spacing)
    preds = detect(detector["name"], detector["threshold"], ev.min_size, detector["min_distance"],
                   (detector["split"],))[0]
    predictor.record["detector"] = {
        **detector, "min_size": int(ev.min_size), "radius": float(ev.radius),
        "crowding": crowding(preds, dots, 2 * float(ev.radius), splits.spacing),
        "calibration_f1": float(key[0]),
        "calibrated_on": f"{'held-out bands of ' if held_out else ''}{len(cal.images)} labeled "
                         f"training images"}
    if degenerate:
        predictor.record["detector"]["degenerate"] = True
    return 0.0 if degenerate else float(key[0])


def evaluate(config, predictor, splits, workdir=None, baseline=True, verbose=True):
    """Scores a calibrated `predictor` on splits.test and returns the summary:
    {'model': {...}[, 'raw_threshold': {...}], ...} with mae (detections), mae_integration,
    mae_corrected, precision, recall, f1 at `eval.radius`, `by_radius` for `eval.extra_radii`.

    With `workdir`: eval.json (summary), eval_per_image.csv and eval_detections.csv (every
    detection of every test image, inside its region of interest where it has one; pixel and
    physical coordinates).
    """
    ev = config.eval
    spacing = splits.spacing
    test = splits.test
    radii = [float(ev.radius)] + [float(r) for r in ev.extra_radii]
    d = predictor.record["detector"]
    test_maps = _maps(predictor, test.images)
    mass = predictor.record["target"]["mass_per_dot"]
    model_scores, preds, rows = score(test_maps, test.dots, d["threshold"], radii, spacing,
                                      d["name"], d["min_size"], mass, test.rois,
                                      d.get("min_distance", 0.0), d.get("crowding"),
                                      d.get("split", 0.0))
    model_scores["detector"] = d["name"]
    summary = {"model": model_scores}
    if baseline:
        raw = lambda ims: [im.mean(-1) for im in ims]
        cal = splits.calibration
        cal_raw = raw(cal.images)
        raw_candidates = np.quantile(np.concatenate([r.ravel() for r in cal_raw]),
                                     np.linspace(0.3, 0.995, 40))
        raw_det = calibrate(cal_raw, cal.dots, raw_candidates, radii[0], spacing,
                            ev.detector, ev.min_size, cal.rois, _min_distances(ev))
        summary["raw_threshold"] = score(raw(test.images), test.dots, raw_det["threshold"], radii,
                                         spacing, raw_det["name"], ev.min_size, rois=test.rois,
                                         min_distance=raw_det["min_distance"])[0]
        summary["raw_threshold"]["detector"] = raw_det["name"]
    summary.update(num_test_images=len(test.images), radius=radii[0], detector=d["name"],
                   zoom=predictor.zoom, mass_per_dot=mass, step=predictor.step)
    if verbose and distributed.is_lead():
        print(format_table(summary), flush=True)
    if workdir:
        write_json(os.path.join(workdir, "eval.json"), summary)
        with open(os.path.join(workdir, "eval_per_image.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, ["name"] + list(rows[0]))
            w.writeheader()
            for name, r in zip(test.names, rows):
                w.writerow({"name": name, **r})
        write_detections(os.path.join(workdir, "eval_detections.csv"), test.names, preds,
                         spacing)
    return summary


def write_detections(path, names, points, spacing):
    """One CSV of the detections of several images (`io.detection_columns` with the name)."""
    with open(path, "w", newline="") as f:
        f.write(",".join(io.detection_columns(len(spacing), name=True)) + "\r\n")
        f.writelines(io.detection_rows(pts, spacing, name=name)
                     for name, pts in zip(names, points))


def format_table(summary):
    radii = list(summary["model"]["by_radius"])
    head = (f"{'method':<15}{'MAE':>7}{'MAE int':>8}{'MAE cor':>8}{'prec':>8}{'recall':>8}"
            + "".join(f"{'F1@' + r:>9}" for r in radii)) + f"{'count':>8}{'true':>7}"
    rows = [f"held-out images: {summary['num_test_images']}, detector {summary['detector']}, "
            f"headline radius {summary['radius']}", head]
    for name in ("model", "raw_threshold"):
        if name not in summary:
            continue
        r = summary[name]
        mi, mc = r.get("mae_integration"), r.get("mae_corrected")
        rows.append(f"{name:<15}{r['mae']:>7.2f}{'' if mi is None else f'{mi:.2f}':>8}"
                    f"{'' if mc is None else f'{mc:.2f}':>8}"
                    f"{100 * r['precision']:>7.2f}%{100 * r['recall']:>7.2f}%"
                    + "".join(f"{100 * r['by_radius'][k]['f1']:>8.2f}%" for k in radii)
                    + f"{r['count_mean']:>8.1f}{r['true_count_mean']:>7.1f}")
    return "\n".join(rows)
