"""The annotation server: a small Flask application over one image and its dots CSV, and the
page (`static/annotate/`: plain HTML, CSS and JavaScript shipped with the package).

`create_app(image, points, ndim)` serves the page at `/` and, for that image only (no request
names a file):

    GET    /api/info                 shape, channels, display range, grid, progress
    GET    /api/points               every dot {id, coords}, and the progress
    POST   /api/points               {"coords": [...]}: add a dot
    PUT    /api/points/<id>          {"coords": [...]}: move it
    DELETE /api/points/<id>          delete it
    POST   /api/accept               {"points": [[...], ...]}: add many (proposals), one undo step
    POST   /api/undo, /api/redo
    POST   /api/review               {"region": [...], "done": true|false}: a grid cell reviewed
    GET    /api/view?z=&y0=&y1=&x0=&x1=&step=   PNG of a region of a slice, every `step`-th
                                     pixel block averaged (never the whole volume); `mip=1`
                                     instead of z: of the maximum intensity projection over z
    POST   /api/propose              {"box": [[lo...], [hi...]], "source": "detector" | "model"
                                     | "both", "sigma", "threshold", "opening", "min_size",
                                     "bright"}: candidate dots in a box, not saved: the
                                     detector's (`proposals.propose`) and, with a model, its
                                     detections (`ModelProposals`)

Every edit is on disk before its answer (`annotation.Annotation`). A malformed request gets
a 4xx answer {"error": message}. Who may send requests (Host names, the token, same-origin
edits) is `access`'s. Limits, each answered with a 4xx and its reason: a request body of at
most MAX_BODY bytes (413), at most MAX_ACCEPT points per accept (413), and proposals that
answer within `propose_seconds` (422; the computation finishes in the background, and
proposals asked for meanwhile get 429).
"""
import concurrent.futures
import io as _io
import os
import threading

import numpy as np
from PIL import Image

from cellcount_jax import access, annotation, postprocess, proposals, volumes
from cellcount_jax.errors import InputError

MAX_BODY = 16 * 2 ** 20     # bytes of a request's body
MAX_ACCEPT = 200_000        # points accepted at once
PROPOSE_SECONDS = 60.0      # a proposal's answer time
MAX_VIEW = 4096 * 4096      # pixels of a region read for one view
MAX_PROPOSE = 2 ** 26       # voxels of a box proposals run on
PROJECTION_CHUNK = 2 ** 24  # values read at a time while projecting a stack
SAMPLE_PLANES = 16          # planes read to set the display range of a stack
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "annotate")


def guess_ndim(path: str) -> int:
    """2 for a PNG/JPEG or a TIFF of (y, x) or (y, x, 3|4); 3 for a folder of planes, a zarr,
    or a TIFF of (z, y, x) or (z, y, x, c)."""
    if os.path.isdir(path) and not volumes.is_zarr(path):
        return 3
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile
        try:
            with tifffile.TiffFile(path) as t:
                shape = t.series[0].shape
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise InputError(f"{path}: not a readable TIFF ({e})") from e
        return 2 if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4)) else 3
    return 3 if volumes.is_zarr(path) else 2


def display_range(volume, low=0.5, high=99.8):
    """Per-channel (lo, hi) display range (one for all channels of an RGB image) from up to
    SAMPLE_PLANES evenly spaced planes (all of a 2D image): a stack opens without being read
    whole."""
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
    if volume.channels in (3, 4):  # a colour image keeps its colours: one range for all
        lo, hi = np.full_like(lo, lo.min()), np.full_like(hi, hi.max())
    return lo.tolist(), np.maximum(hi, lo + 1e-6).tolist()


class Projection:
    """The maximum intensity projection over z of a stack (y, x, c), computed on first use, a
    few planes at a time, and kept; with its own display range."""

    def __init__(self, volume):
        self.volume, self._lock, self._value = volume, threading.Lock(), None

    def get(self):
        with self._lock:
            if self._value is None:
                v = self.volume
                plane = int(np.prod(v.shape[1:])) * v.channels
                k = max(1, PROJECTION_CHUNK // plane)
                mip = np.full((*v.shape[1:], v.channels), -np.inf, np.float32)
                for z in range(0, v.shape[0], k):
                    box = ((z, min(z + k, v.shape[0])), (0, v.shape[1]), (0, v.shape[2]))
                    np.maximum(mip, v.read(box).max(0), out=mip)
                lo, hi = np.percentile(mip.reshape(-1, v.channels), [0.5, 99.8], axis=0)
                if v.channels in (3, 4):
                    lo, hi = np.full_like(lo, lo.min()), np.full_like(hi, hi.max())
                self._value = mip, lo.tolist(), np.maximum(hi, lo + 1e-6).tolist()
            return self._value


class ModelProposals:
    """A trained model's detections as proposals: the model's tiles over the whole image
    (`Predictor.tiling`, one window shape, so one compilation), each predicted once when a box
    first touches it and kept; normalised by the whole image's statistics, as `cellcount
    predict` does. The statistics and the first tile (at the image's centre) are computed in
    the background from the start. spacing: the image's, when it differs from the model's
    (resampled to the model's grid; detections mapped back to the image's pixels)."""

    def __init__(self, model_dir: str, volume, spacing=None):
        from cellcount_jax import model_folder, tiling
        self.predictor = p = model_folder.load_model(model_dir)
        self.name = os.path.basename(os.path.normpath(model_dir))
        if p.ndim != volume.ndim or p.record["channels"] != volume.channels:
            raise InputError(f"--model={model_dir} takes {p.ndim}D images with "
                             f"{p.record['channels']} channel(s); {volume.name} is "
                             f"{volume.ndim}D with {volume.channels}")
        if not p.calibrated:
            raise InputError(f"--model={model_dir}: no calibrated detector (training did not "
                             f"finish); run `cellcount evaluate --workdir={model_dir}`")
        self.grid_volume, self.zoom, _ = p.input_grid(volume, spacing)
        self.tiles = tiling.grid(self.grid_volume.shape, *p.tiling())
        self.done = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error = None
        threading.Thread(target=self._prepare, daemon=True).start()

    def _prepare(self):
        try:
            self.affine = self.predictor.normaliser.affine(self.grid_volume)
            centre = [s // 2 for s in self.grid_volume.shape]
            self._ready.set()
            self._predict(self._touching(centre, [c + 1 for c in centre]))
        except Exception as e:  # noqa: BLE001 - reported to the page on its next request
            self._error = f"{type(e).__name__}: {e}"
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _touching(self, lo, hi):
        return [t for t in self.tiles if all(a < h and b > l for (a, b), l, h in
                                             zip(t.core, lo, hi))]

    def _predict(self, tiles):
        from cellcount_jax import tiling
        with self._lock:  # one network call at a time; a tile is predicted once
            todo = [t for t in tiles if t.index not in self.done]
            for r in tiling.predict_tiles(self.predictor, self.grid_volume, self.affine, todo):
                self.done[r.tile.index] = r.pixels
        return np.concatenate([self.done[t.index] for t in tiles] +
                              [np.zeros((0, len(self.zoom)), np.float32)])

    def propose(self, start, stop) -> np.ndarray:
        """Detections (n, ndim) in image pixels inside the box [start, stop)."""
        self._ready.wait()
        if self._error:
            raise InputError(f"the model could not predict this image ({self._error})")
        # One model pixel more each side: a detection is owned by the tile of its nearest model
        # pixel, which can lie just outside the box's image on the model's grid.
        lo = np.floor(np.asarray(start) * self.zoom).astype(int) - 1
        hi = np.ceil(np.asarray(stop) * self.zoom).astype(int) + 1
        try:
            pts = self._predict(self._touching(lo, hi)) / self.zoom
        except Exception as e:  # noqa: BLE001 - any failure of the model is reported as such
            raise InputError(f"the model could not predict this image ({type(e).__name__}: "
                             f"{e})") from e
        nearest = postprocess.nearest_pixel(pts)
        return pts[np.all((nearest >= start) & (nearest < stop), axis=1)]


def _png(region, lo, hi, step):
    """PNG bytes of a region (y, x, c): `step`-pixel blocks averaged, `lo`..`hi` to 0..255."""
    h, w = region.shape[0] // step, region.shape[1] // step
    if step > 1 and h and w:
        region = region[:h * step, :w * step].reshape(h, step, w, step, -1).mean((1, 3))
    scaled = (region - np.float32(lo)) / (np.float32(hi) - np.float32(lo))
    pixels = (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]
    if pixels.ndim == 3 and pixels.shape[-1] == 2:
        pixels = np.concatenate([pixels, np.zeros_like(pixels[..., :1])], -1)
    out = _io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


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


def _flag(body, key, default):
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise InputError(f"{key!r} must be true or false, got {value!r}")
    return value


def _json(request, *keys):
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InputError("expected a JSON object body")
    missing = [k for k in keys if k not in body]
    if missing:
        raise InputError(f"missing field(s) {missing}")
    return body


def create_app(image_path: str, points_path: str, ndim: int, grid=None, model: str = None,
               spacing=None, *, token: str = None, require_token: bool = True,
               host: str = "127.0.0.1", allow_hosts=(), propose_seconds: float = PROPOSE_SECONDS):
    """The Flask application serving `image_path` (any `volumes.open_volume` input) and
    editing the dots CSV `points_path` (created on the first edit); `model`: a model folder
    whose detections are offered as proposals too (`ModelProposals`, with `spacing`).

    token, require_token, host, allow_hosts: who may use it (`access`): the token (None: a
    new one, or $CELLCOUNT_TOKEN; `app.config['token']`), or none at all where
    `require_token` is False (a loopback `host` only); the address it is served on and the
    further Host names allowed. propose_seconds: the longest a proposal is waited for."""
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    token = access.resolve_token(token, require_token, host)
    volume = volumes.open_volume(image_path, ndim)
    dots = annotation.Annotation(points_path, volume.shape, grid)
    lo, hi = display_range(volume)
    projection = Projection(volume) if volume.ndim == 3 else None
    model = ModelProposals(model, volume, spacing) if model else None
    app = Flask(__name__, static_folder=STATIC, static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["token"] = token
    access.install(app, token, host, allow_hosts)

    @app.get("/")
    def page():
        return app.send_static_file("index.html")

    @app.errorhandler(InputError)
    def bad_input(e):
        return jsonify(error=str(e)), 400

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e):
        return jsonify(error=f"a request body may hold at most {MAX_BODY} bytes"), 413

    @app.errorhandler(HTTPException)
    def http_error(e):
        return jsonify(error=e.description), e.code

    lock = threading.Lock()  # views are read concurrently; edits happen one at a time

    def state():
        return {"points": [{"id": i, "coords": dots.points[i].tolist()}
                           for i in sorted(dots.points)], "progress": dots.progress()}

    @app.get("/api/info")
    def info():
        return jsonify(shape=list(volume.shape), ndim=volume.ndim, channels=volume.channels,
                       dtype=str(volume.dtype), name=volume.name, display=[lo, hi],
                       points_file=points_path, progress=dots.progress(),
                       model=model and model.name, model_ready=bool(model and model.ready))

    @app.get("/api/points")
    def points():
        return jsonify(state())

    def one_at_a_time(fn):
        def locked(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)
        locked.__name__ = fn.__name__
        return locked

    @app.post("/api/points")
    @one_at_a_time
    def add():
        dot_id = dots.add(_json(request, "coords")["coords"])
        return jsonify(id=dot_id, **state())

    @app.put("/api/points/<int:dot_id>")
    @one_at_a_time
    def move(dot_id):
        dots.move(dot_id, _json(request, "coords")["coords"])
        return jsonify(state())

    @app.delete("/api/points/<int:dot_id>")
    @one_at_a_time
    def delete(dot_id):
        dots.delete(dot_id)
        return jsonify(state())

    @app.post("/api/accept")
    @one_at_a_time
    def accept():
        points = _json(request, "points")["points"]
        if isinstance(points, list) and len(points) > MAX_ACCEPT:
            return jsonify(error=f"{len(points)} points in one accept; at most {MAX_ACCEPT} "
                                 f"(accept them in parts)"), 413
        ids = dots.accept(points)
        return jsonify(ids=ids, **state())

    @app.post("/api/undo")
    @one_at_a_time
    def undo():
        return jsonify(done=dots.undo(), **state())

    @app.post("/api/redo")
    @one_at_a_time
    def redo():
        return jsonify(done=dots.redo(), **state())

    @app.post("/api/review")
    @one_at_a_time
    def review():
        body = _json(request, "region")
        dots.review(body["region"], _flag(body, "done", True))
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
        if a.get("mip") not in (None, "0"):
            if projection is None:
                raise InputError("a projection needs a 3D stack")
            mip, mlo, mhi = projection.get()
            png = _png(mip[y0:y1, x0:x1], mlo, mhi, step)
        else:
            if volume.ndim == 3:
                z = _int(a, "z", None, 0, volume.shape[0] - 1)
                box = ((z, z + 1),) + box
            region = volume.read(box).reshape(y1 - y0, x1 - x0, volume.channels)
            png = _png(region, lo, hi, step)
        return png, 200, {"Content-Type": "image/png", "Cache-Control": "no-store"}

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
        source = body.get("source", "detector")
        if source not in ("detector", "model", "both"):
            raise InputError(f"source must be 'detector', 'model' or 'both', got {source!r}")
        if source != "detector" and model is None:
            raise InputError("no model: start with --model=WORKDIR for model proposals")
        try:
            options = dict(sigma=float(body.get("sigma", 1.0)),
                           threshold=(None if body.get("threshold") is None
                                      else float(body["threshold"])),
                           opening=int(body.get("opening", 1)),
                           min_size=int(body.get("min_size", 4)),
                           bright=_flag(body, "bright", True))
        except (TypeError, ValueError) as e:
            raise InputError(f"bad proposal parameters ({e})") from e

        def run():
            out = {}
            if source != "model":
                region = volume.read(tuple(zip(start.tolist(), stop.tolist())))
                try:
                    found = proposals.propose(region, volume.ndim, **options)
                except (TypeError, ValueError) as e:
                    raise InputError(f"bad proposal parameters ({e})") from e
                out["detector"] = (found + start).tolist()
            if source != "detector":
                out["model"] = model.propose(start, stop).tolist()
            return out

        with proposing:
            if running and not running[-1].done():
                return jsonify(error="the proposals of an earlier box are still being "
                                     "computed; ask again in a moment"), 429
            running[:] = [worker.submit(run)]
        try:
            return jsonify(points=running[-1].result(timeout=propose_seconds))
        except concurrent.futures.TimeoutError:
            return jsonify(error=f"the proposals took longer than {propose_seconds:g} s; "
                                 f"propose on a smaller box (this one finishes in the "
                                 f"background)"), 422

    # Proposals run one at a time on their own thread, so that a request can stop waiting.
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="proposals")
    proposing, running = threading.Lock(), []

    app.config["annotation"] = dots
    return app


def serve(image_path: str, points_path: str, ndim: int, host: str = "127.0.0.1",
          port: int = 8765, model: str = None, spacing=None, grid=None, *, token: str = None,
          require_token: bool = True, allow_hosts=()):
    """Serves the page and the API until interrupted (Ctrl+C); prints the URL (with the
    token: `create_app`)."""
    import logging
    import socket
    from urllib.parse import quote
    from werkzeug.serving import make_server

    def busy(e):
        return InputError(f"cannot serve on {host}:{port} ({getattr(e, 'strerror', None) or e}"
                          f"); choose another --port")

    access.resolve_token(token, require_token, host)  # flags checked before the image opens
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:  # before the image and the model are opened
            probe.bind((host, port))
        except OSError as e:
            raise busy(e) from e
    app = create_app(image_path, points_path, ndim, grid, model, spacing, token=token,
                     require_token=require_token, host=host, allow_hosts=allow_hosts)
    dots = app.config["annotation"]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    try:
        server = make_server(host, port, app, threaded=True)  # listening from here on
    except (OSError, SystemExit) as e:
        raise busy(e) from e
    shown = ("localhost" if access.is_loopback(host) else
             socket.gethostname() if host in access.WILDCARD_ADDRESSES else
             f"[{host}]" if ":" in host else host)
    query = f"?token={quote(app.config['token'])}" if app.config["token"] else ""
    also = f", proposals of {model}" if model else ""
    print(f"annotating {image_path} ({'x'.join(map(str, dots.shape))}), dots in {points_path} "
          f"({len(dots.points)} so far{also})\nopen http://{shown}:{port}/{query} (Ctrl+C "
          f"stops; every edit is already saved)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
