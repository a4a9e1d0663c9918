"""The annotation server: a small Flask application over one image and its dots CSV.

`create_app(image, points, ndim)` serves, for that image only (no request names a file):

    GET    /api/info                 shape, channels, display range, grid, progress
    GET    /api/points               every dot {id, coords}, and the progress
    POST   /api/points               {"coords": [...]}: add a dot
    PUT    /api/points/<id>          {"coords": [...]}: move it
    DELETE /api/points/<id>          delete it
    POST   /api/accept               {"points": [[...], ...]}: add many (proposals), one undo step
    POST   /api/undo, /api/redo
    POST   /api/review               {"region": [...], "done": true|false}: a grid cell reviewed
    GET    /api/view?z=&y0=&y1=&x0=&x1=&step=   PNG of a region of a slice, every `step`-th
                                     pixel block averaged (never the whole volume)
    POST   /api/propose              {"box": [[lo...], [hi...]], "sigma", "threshold",
                                     "opening", "min_size", "bright"}: candidate dots in a box
                                     (`proposals.propose`), not saved

Every edit is on disk before its answer (`annotation.Annotation`). A malformed request gets
a 4xx answer {"error": message}.
"""
import io as _io

import numpy as np
from PIL import Image

from cellcount_jax import annotation, proposals, volumes
from cellcount_jax.errors import InputError

MAX_VIEW = 4096 * 4096      # pixels of a region read for one view
MAX_PROPOSE = 2 ** 26       # voxels of a box proposals run on
SAMPLE_PLANES = 16          # planes read to set the display range of a stack


def display_range(volume, low=0.5, high=99.8):
    """Per-channel (lo, hi) display range from up to SAMPLE_PLANES evenly spaced planes (all
    of a 2D image): a stack opens without being read whole."""
    if volume.ndim == 2:
        sample = volume.read()
    else:
        zs = np.unique(np.linspace(0, volume.shape[0] - 1, SAMPLE_PLANES).round().astype(int))
        step = max(1, int(np.sqrt(volume.shape[1] * volume.shape[2] / 2 ** 20)))
        sample = np.concatenate([volume.read(((z, z + 1), (0, volume.shape[1]),
                                              (0, volume.shape[2])))[0, ::step, ::step]
                                 for z in zs])
    flat = sample.reshape(-1, volume.channels)
    lo, hi = np.percentile(flat, [low, high], axis=0)
    return lo.tolist(), np.maximum(hi, lo + 1e-6).tolist()


def _int(args, key, default=None, lo=None, hi=None):
    text = args.get(key)
    if text is None:
        if default is None:
            raise InputError(f"missing parameter {key!r}")
        return default
    try:
        value = int(text)
    except ValueError as e:
        raise InputError(f"parameter {key!r} must be an integer, got {text!r}") from e
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"parameter {key!r}={value} is outside [{lo}, {hi}]")
    return value


def _json(request, *keys):
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InputError("expected a JSON object body")
    missing = [k for k in keys if k not in body]
    if missing:
        raise InputError(f"missing field(s) {missing}")
    return body


def create_app(image_path: str, points_path: str, ndim: int, grid=None):
    """The Flask application serving `image_path` (any `volumes.open_volume` input) and
    editing the dots CSV `points_path` (created on the first edit)."""
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    volume = volumes.open_volume(image_path, ndim)
    dots = annotation.Annotation(points_path, volume.shape, grid)
    lo, hi = display_range(volume)
    app = Flask(__name__)

    @app.errorhandler(InputError)
    def bad_input(e):
        return jsonify(error=str(e)), 400

    @app.errorhandler(HTTPException)
    def http_error(e):
        return jsonify(error=e.description), e.code

    def state():
        return {"points": [{"id": i, "coords": dots.points[i].tolist()}
                           for i in sorted(dots.points)], "progress": dots.progress()}

    @app.get("/api/info")
    def info():
        return jsonify(shape=list(volume.shape), ndim=volume.ndim, channels=volume.channels,
                       dtype=str(volume.dtype), name=volume.name, display=[lo, hi],
                       points_file=points_path, progress=dots.progress())

    @app.get("/api/points")
    def points():
        return jsonify(state())

    @app.post("/api/points")
    def add():
        dot_id = dots.add(_json(request, "coords")["coords"])
        return jsonify(id=dot_id, **state())

    @app.put("/api/points/<int:dot_id>")
    def move(dot_id):
        dots.move(dot_id, _json(request, "coords")["coords"])
        return jsonify(state())

    @app.delete("/api/points/<int:dot_id>")
    def delete(dot_id):
        dots.delete(dot_id)
        return jsonify(state())

    @app.post("/api/accept")
    def accept():
        ids = dots.accept(_json(request, "points")["points"])
        return jsonify(ids=ids, **state())

    @app.post("/api/undo")
    def undo():
        return jsonify(done=dots.undo(), **state())

    @app.post("/api/redo")
    def redo():
        return jsonify(done=dots.redo(), **state())

    @app.post("/api/review")
    def review():
        body = _json(request, "region")
        dots.review(body["region"], bool(body.get("done", True)))
        return jsonify(progress=dots.progress())

    @app.get("/api/view")
    def view():
        a = request.args
        ys, xs = volume.shape[-2:]
        y0, y1 = _int(a, "y0", 0, 0, ys - 1), _int(a, "y1", ys, 1, ys)
        x0, x1 = _int(a, "x0", 0, 0, xs - 1), _int(a, "x1", xs, 1, xs)
        step = _int(a, "step", 1, 1, 1024)
        if y1 <= y0 or x1 <= x0:
            raise InputError("an empty region: y0 < y1 and x0 < x1 are needed")
        if (y1 - y0) * (x1 - x0) > MAX_VIEW:
            raise InputError(f"a region of {(y1 - y0) * (x1 - x0)} pixels is larger than "
                             f"{MAX_VIEW}; view a part of it")
        box = ((y0, y1), (x0, x1))
        if volume.ndim == 3:
            z = _int(a, "z", None, 0, volume.shape[0] - 1)
            box = ((z, z + 1),) + box
        region = volume.read(box).reshape(y1 - y0, x1 - x0, volume.channels)
        h, w = (y1 - y0) // step, (x1 - x0) // step
        if step > 1 and h and w:
            region = region[:h * step, :w * step].reshape(h, step, w, step, -1).mean((1, 3))
        scaled = (region - np.float32(lo)) / (np.float32(hi) - np.float32(lo))
        pixels = (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
        pixels = pixels[..., 0] if volume.channels == 1 else pixels[..., :3]
        if pixels.ndim == 3 and pixels.shape[-1] == 2:
            pixels = np.concatenate([pixels, np.zeros_like(pixels[..., :1])], -1)
        out = _io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
        return out.getvalue(), 200, {"Content-Type": "image/png", "Cache-Control": "no-store"}

    @app.post("/api/propose")
    def propose():
        body = _json(request, "box")
        try:
            start, stop = (np.asarray(b, np.int64) for b in body["box"])
        except (TypeError, ValueError) as e:
            raise InputError("box must be [[start per axis], [stop per axis]]") from e
        if start.shape != (volume.ndim,) or stop.shape != (volume.ndim,):
            raise InputError(f"box must give {volume.ndim} starts and {volume.ndim} stops")
        start = np.clip(start, 0, volume.shape)
        stop = np.clip(stop, 0, volume.shape)
        if (stop <= start).any():
            raise InputError("an empty box")
        if np.prod(stop - start) > MAX_PROPOSE:
            raise InputError(f"a box of {int(np.prod(stop - start))} voxels is larger than "
                             f"{MAX_PROPOSE}")
        region = volume.read(tuple(zip(start.tolist(), stop.tolist())))
        try:
            found = proposals.propose(
                region, volume.ndim, sigma=float(body.get("sigma", 1.0)),
                threshold=None if body.get("threshold") is None else float(body["threshold"]),
                opening=int(body.get("opening", 1)), min_size=int(body.get("min_size", 4)),
                bright=bool(body.get("bright", True)))
        except (TypeError, ValueError) as e:
            raise InputError(f"bad proposal parameters ({e})") from e
        return jsonify(points=(found + start).tolist())

    app.config["annotation"] = dots
    return app
