"""The annotation tool's proposals (against known blob centres and a brute-force Otsu) and its
edit store (every edit on disk, read back by the training reader)."""
import json
import os

import numpy as np
import pytest

from cellcount_jax import annotation, proposals
from cellcount_jax.data import io
from cellcount_jax.errors import InputError


def _blobs(shape, centres, sigma=1.5, noise=0.02, seed=0):
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    image = sum(np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * sigma ** 2))
                for centre in centres)
    return image + np.random.default_rng(seed).normal(0, noise, shape)


def _matched(found, centres, tolerance):
    d = np.linalg.norm(found[:, None] - np.asarray(centres)[None], axis=-1)
    return len(found) == len(centres) and (d.min(0) < tolerance).all()


def test_proposals_find_blobs_of_known_centres_2d_rgb_and_dark():
    rng = np.random.default_rng(1)
    centres = [(10 + 20 * i + rng.uniform(-2, 2), 12 + 18 * j + rng.uniform(-2, 2))
               for i in range(4) for j in range(5)]
    image = _blobs((96, 100), centres)
    found = proposals.propose(image, 2, sigma=1.0)
    assert _matched(found, centres, 0.3)
    rgb = np.stack([0.2 * image, 0.5 * image, image], -1)
    np.testing.assert_allclose(proposals.propose(rgb, 2, sigma=1.0), found, atol=0.05)
    assert _matched(proposals.propose(1 - image, 2, sigma=1.0, bright=False), centres, 0.3)


def test_3d_opening_splits_blobs_joined_by_a_thin_bridge():
    centres = [(8.0, 10.0, 10.0), (8.0, 10.0, 24.0), (20.0, 22.0, 16.0)]
    image = _blobs((28, 32, 34), centres, sigma=2.0, noise=0.0)
    image[8, 10, 10:25] = 1.0  # a one-voxel line joining the first two
    joined = proposals.propose(image, 3, sigma=0.0, opening=0)
    assert len(joined) == 2
    split = proposals.propose(image, 3, sigma=0.0, opening=1)
    assert _matched(split, centres, 0.3)
    assert len(proposals.propose(image, 3, sigma=0.0, opening=1, min_size=10 ** 6)) == 0


def test_otsu_threshold_maximises_the_between_class_variance():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0.2, 0.05, 4000), rng.normal(0.7, 0.1, 1000)])

    def between(t):
        low, high = values[values <= t], values[values > t]
        return len(low) * len(high) * (low.mean() - high.mean()) ** 2 / len(values) ** 2

    s = np.sort(values)
    best = max(between(t) for t in (s[:-1] + s[1:])[::7] / 2)
    t = proposals.otsu_threshold(values)
    assert between(t) >= 0.999 * best and 0.3 < t < 0.55
    try:
        from skimage.filters import threshold_otsu
    except ImportError:
        return
    assert abs(t - threshold_otsu(values)) < (values.max() - values.min()) / 256


def test_every_edit_is_on_disk_and_undo_redo_replay_it(tmp_path):
    path = str(tmp_path / "stack.csv")
    clock = iter(np.arange(0, 1000, 10.0))
    a = annotation.Annotation(path, (40, 300, 520), clock=lambda: next(clock))
    assert a.grid == (2, 2, 3)
    on_disk = lambda: io.read_dots_csv(path, 3)  # the reader training uses

    first = a.add((1, 2.5, 3))
    np.testing.assert_allclose(on_disk(), [[1, 2.5, 3]])
    ids = a.accept([(5, 6, 7), (8, 9, 10)])
    assert len(on_disk()) == 3
    a.move(ids[0], (5, 60, 70))
    a.delete(first)
    np.testing.assert_allclose(on_disk(), [[5, 60, 70], [8, 9, 10]])
    assert a.undo()  # the delete
    assert a.undo()  # the move
    np.testing.assert_allclose(on_disk(), [[1, 2.5, 3], [5, 6, 7], [8, 9, 10]])
    assert a.undo()  # the whole accept, in one step
    np.testing.assert_allclose(on_disk(), [[1, 2.5, 3]])
    assert a.redo() and a.redo()
    np.testing.assert_allclose(on_disk(), [[1, 2.5, 3], [5, 60, 70], [8, 9, 10]])
    a.add((39, 299, 519))  # a new edit clears what could be redone
    assert not a.redo()

    a.review(a.region_of((39, 299, 519)))
    assert a.progress()["reviewed"] == [[1, 1, 2]]
    again = annotation.Annotation(path, (40, 300, 520))  # a restart continues
    np.testing.assert_allclose(again.array(), a.array())
    assert again.progress()["reviewed"] == [[1, 1, 2]] and again.seconds == a.seconds > 0
    assert json.load(open(tmp_path / "stack.progress.json"))["edits"] == a.edits


def test_bad_edits_are_refused_and_change_nothing(tmp_path):
    path = str(tmp_path / "image.csv")
    a = annotation.Annotation(path, (64, 64))
    a.add((3, 4))
    for bad in [(64, 1), (-0.6, 3), (np.nan, 2), (1, 2, 3)]:
        with pytest.raises(InputError):
            a.add(bad)
    with pytest.raises(InputError, match="no dot with id 7"):
        a.delete(7)
    with pytest.raises(InputError):
        a.review((1, 0))  # a 64x64 image is one grid cell
    np.testing.assert_allclose(io.read_dots_csv(path, 2), [[3, 4]])


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "image.csv")
    a = annotation.Annotation(path, (64, 64))
    a.add((3, 4))

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        a.add((5, 6))
    np.testing.assert_allclose(io.read_dots_csv(path, 2), [[3, 4]])


def authorised(app):
    """A Flask test client that sends the app's token with every request."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"token {app.config['token']}"
    return client


@pytest.fixture
def server(tmp_path):
    pytest.importorskip("flask")
    import tifffile
    from cellcount_jax import annotate
    centres = [(6.0, 20.0, 30.0), (14.0, 40.0, 12.0), (20.0, 50.0, 50.0)]
    stack = _blobs((24, 64, 72), centres, sigma=2.0, noise=0.0) * 3000 + 100
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack.astype(np.uint16))
    points = tmp_path / "stack.csv"
    app = annotate.create_app(str(path), str(points), 3)
    return authorised(app), str(points), centres, stack


def test_the_server_edits_the_csv_and_serves_regions(server):
    from PIL import Image
    client, points, centres, stack = server
    info = client.get("/api/info").get_json()
    assert info["shape"] == [24, 64, 72] and info["channels"] == 1
    r = client.post("/api/points", json={"coords": [6, 20, 30]})
    assert r.status_code == 200 and r.get_json()["id"] == 0
    np.testing.assert_allclose(io.read_dots_csv(points, 3), [[6, 20, 30]])
    found = client.post("/api/propose", json={"box": [[0, 0, 0], [24, 64, 72]], "sigma": 1.0,
                                              "opening": 1}).get_json()["points"]["detector"]
    assert _matched(np.asarray(found), centres, 0.5)
    r = client.post("/api/accept", json={"points": found[1:]}).get_json()
    assert len(io.read_dots_csv(points, 3)) == 3 and r["ids"] == [1, 2]
    client.put("/api/points/1", json={"coords": [15, 41, 13]})
    client.delete("/api/points/0")
    assert len(io.read_dots_csv(points, 3)) == 2
    assert client.post("/api/undo").get_json()["done"]
    assert len(io.read_dots_csv(points, 3)) == 3
    assert client.post("/api/redo").get_json()["done"]
    assert len(client.get("/api/points").get_json()["points"]) == 2
    review = client.post("/api/review", json={"region": [0, 0, 0]}).get_json()
    assert review["progress"]["reviewed"] == [[0, 0, 0]]
    png = client.get("/api/view?z=6&y0=8&y1=40&x0=16&x1=48&step=2")
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    view = np.asarray(Image.open(_bytes(png.data))).astype(float)
    (lo,), (hi,) = info["display"]
    blocks = stack[6, 8:40, 16:48].reshape(16, 2, 16, 2).mean((1, 3))
    expected = np.clip((blocks - lo) / (hi - lo), 0, 1) * 255
    assert view.shape == (16, 16) and np.abs(view - expected).max() <= 1.0
    assert 0 < (view == 255).sum() < view.size  # a blob, clipped at the display range
    mip = client.get("/api/view?mip=1&y0=4&y1=64&x0=0&x1=72&step=3")
    view = np.asarray(Image.open(_bytes(mip.data))).astype(float)
    projection = stack.astype(np.float32).max(0)
    lo, hi = np.percentile(projection, [0.5, 99.8])
    blocks = projection[4:64, :72].reshape(20, 3, 24, 3).mean((1, 3))
    expected = np.clip((blocks - lo) / (hi - lo), 0, 1) * 255
    assert view.shape == (20, 24) and np.abs(view - expected).max() <= 1.0
    assert all(view[int(y - 4) // 3, int(x) // 3] > 150 for _, y, x in centres)  # all slices


def _bytes(data):
    import io as _io
    return _io.BytesIO(data)


def test_the_server_refuses_bad_requests_and_serves_no_other_file(server):
    client, points, _, _ = server
    for method, url, body in [
            ("post", "/api/points", {"coords": [99, 0, 0]}),          # outside the stack
            ("post", "/api/points", {"where": [1, 2, 3]}),            # no coords
            ("post", "/api/points", None),                            # no JSON
            ("put", "/api/points/42", {"coords": [1, 1, 1]}),         # no such dot
            ("get", "/api/view?z=99", None),                           # no such slice
            ("get", "/api/view?z=1&step=x", None),                     # not a number
            ("get", "/api/view?y0=3", None),                           # 3D needs z
            ("post", "/api/propose", {"box": [[0, 0], [5, 5]]}),       # 2 axes for 3D
            ("post", "/api/review", {"region": [9, 9, 9]}),            # not a grid cell
            ("post", "/api/propose", {"box": [[0] * 3, [5] * 3], "source": "model"}),  # no model
            ("post", "/api/propose", {"box": [[0] * 3, [5] * 3], "source": "/etc"}),
            ("post", "/api/propose", {"box": [[0] * 3, [5] * 3], "bright": "false"}),
            ("post", "/api/review", {"region": "ab"}),
            ("post", "/api/review", {"region": [0, 0, 0], "done": "no"}),
            ("post", "/api/accept", {"points": "x"}),
            ("post", "/api/points", {"coords": "x"}),
            ("get", "/../../etc/passwd", None),
            ("get", "/api/..%2F..%2Fetc%2Fpasswd", None),
            ("get", "/static/../../etc/passwd", None),
            ("delete", "/api/points/abc", None)]:
        r = getattr(client, method)(url, json=body) if body is not None else \
            getattr(client, method)(url)
        assert 400 <= r.status_code < 500, (method, url, r.status_code)
        assert r.is_json and r.get_json()["error"], (method, url)
        assert b"root:" not in r.data
    assert not os.path.exists(points)  # nothing was written


def test_the_page_is_served_and_nothing_outside_it(server):
    client = server[0]
    page = client.get("/")
    assert page.status_code == 200 and b"/static/app.js" in page.data
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../annotate.py").status_code == 404
    assert client.get("/static/%2e%2e/annotate.py").status_code == 404


def test_the_annotate_command_refuses_bad_input_in_one_line(tmp_path):
    import socket
    import subprocess
    import sys
    image = tmp_path / "im.png"
    from PIL import Image
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [([str(tmp_path / "missing.tif")], "no such image"),
             ([str(image), "--ndim=4"], "--ndim=4"),
             ([str(image), f"--port={port}"], "choose another --port"),
             ([str(image), "--model=somewhere"], "--model=somewhere: no such model folder"),
             ([str(image), "--model=vgg2d_cpu"], "takes 2D images with 3 channel(s)"),
             ([str(image), "--spacing=1,1"], "--spacing goes with --model"),
             ([str(image), "--grid=2,x"], "expected comma-separated numbers"),
             ([str(image), "--grid=2,2,2"], "one positive count per axis"),
             ([str(image), "--distributed"], "go with train and evaluate")]
    try:
        for args, message in cases:
            out = subprocess.run([sys.executable, "-c", "from cellcount_jax.cli import main; main()",
                                  "annotate", *args], capture_output=True, text=True,
                                 cwd=str(tmp_path), timeout=120)
            assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-500:])
            assert out.stderr.count("\n") == 1
    finally:
        busy.close()
    assert not (tmp_path / "im.csv").exists()


def test_a_reopened_file_keeps_its_grid(tmp_path):
    path = str(tmp_path / "image.csv")
    a = annotation.Annotation(path, (512, 512), grid=(4, 4))
    a.review((3, 1))
    assert annotation.Annotation(path, (512, 512)).grid == (4, 4)
    with pytest.raises(InputError, match="give that grid or none"):
        annotation.Annotation(path, (512, 512), grid=(2, 2))


def test_model_proposals_on_another_spacing_are_the_predict_command_s_detections(tmp_path):
    """The shipped VGG model on an image at half its pixel size: the proposals in a box are
    `cellcount predict --spacing`'s detections (resampled to the model's grid, mapped back)."""
    pytest.importorskip("flask")
    from PIL import Image
    from cellcount_jax import annotate, model_folder, predict, volumes
    from cellcount_jax.cli import model_path
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:200, :180]
    cells = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0)
                for cy, cx in rng.uniform(10, 170, (40, 2)))
    rgb = (np.stack([0.1 * cells, 0.2 * cells, cells], -1) / cells.max() * 255).astype(np.uint8)
    image = str(tmp_path / "cells.png")
    Image.fromarray(rgb).save(image)
    app = annotate.create_app(image, str(tmp_path / "cells.csv"), 2,
                              model=model_path("vgg2d_cpu"), spacing=(0.5, 0.5))
    box = [[20, 30], [150, 170]]
    found = np.asarray(authorised(app).post("/api/propose", json={
        "box": box, "source": "model"}).get_json()["points"]["model"]).reshape(-1, 2)
    predictor = model_folder.load_model(model_path("vgg2d_cpu"))
    predict.predict_image(predictor, volumes.open_volume(image, 2), str(tmp_path / "out"),
                          "cells", spacing=(0.5, 0.5), density="none", progress=False)
    rows = np.loadtxt(tmp_path / "out" / "cells_detections.csv", delimiter=",", skiprows=1,
                      ndmin=2)[:, :2]
    inside = rows[np.all((np.floor(rows + 0.5) >= box[0]) & (np.floor(rows + 0.5) < box[1]), 1)]
    assert len(inside) > 5
    np.testing.assert_allclose(found[np.lexsort(found.T[::-1])],
                               inside[np.lexsort(inside.T[::-1])], atol=1e-3)


def test_a_grey_2d_image_is_served_and_edited(tmp_path):
    pytest.importorskip("flask")
    from PIL import Image
    from cellcount_jax import annotate
    image = (np.random.default_rng(0).random((50, 70)) * 200).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "grey.png")
    client = authorised(annotate.create_app(str(tmp_path / "grey.png"),
                                            str(tmp_path / "grey.csv"), 2))
    info = client.get("/api/info").get_json()
    assert info["shape"] == [50, 70] and info["ndim"] == 2 and info["channels"] == 1
    view = np.asarray(Image.open(_bytes(client.get("/api/view?y0=10&y1=50&x0=0&x1=70").data)))
    (lo,), (hi,) = info["display"]
    np.testing.assert_allclose(view, np.clip((image[10:] - lo) / (hi - lo), 0, 1) * 255, atol=1)
    assert client.get("/api/view?mip=1").status_code == 400  # no projection of a 2D image
    client.post("/api/points", json={"coords": [12.5, 3]})
    assert open(tmp_path / "grey.csv").read() == "y,x\n12.500,3.000\n"
