"""`cellcount annotate` end to end in a real headless browser (Debian's Chromium driven by
Playwright): the server runs as its own process, the mouse and keys do the work, and the CSV on
disk is checked after each edit against what was done, with numpy and `proposals.propose` run
here as the reference. Screenshots go to $CELLCOUNT_ARTIFACTS (default artifacts/annotate).

The 3D test opens the QCANet 16-cell embryo (../shared/data) when it is there, else a synthetic
stack of nuclei. The latency test measures the round trip of an edit and of a slice (3D) or
view (2D) change, as the page itself times them, on a VGG image and a 2 GB stack, and writes
them to latency.json among the artefacts (the README's table); $CELLCOUNT_STACK names another
stack for it.
"""
import json
import os
import shutil
import signal
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cellcount_jax import proposals

CHROMIUM = os.environ.get("CELLCOUNT_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("CELLCOUNT_ARTIFACTS", os.path.join(ROOT, "artifacts", "annotate"))
DATA = os.path.join(ROOT, "..", "shared", "data")
QCANET = os.path.join(DATA, "qcanet", "images_raw", "16_cell_stage.tif")
VGG = os.path.join(DATA, "vgg_cells", "001cell.png")
BIG_SHAPE = (64, 4096, 4096)  # uint16: 2.15 GB

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - `pip install -e '.[test]'` has it
    sync_playwright = None
pytestmark = pytest.mark.skipif(
    sync_playwright is None or not os.path.exists(CHROMIUM),
    reason="needs playwright (the test extra) and Chromium (apt-get install chromium)")


def _slice(z):
    """The slice of a z coordinate, as the page rounds it (Math.round: halves up)."""
    return int(np.floor(z + 0.5))


def _cell(coords, grid, shape):
    """The grid region of a position, as the page and the server give it (nearest pixel)."""
    pixel = np.clip(np.floor(np.asarray(coords) + 0.5), 0, np.asarray(shape) - 1)
    return (pixel * grid // np.asarray(shape)).astype(int)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cellcount annotate` in its own process; `seconds`: from its start to its URL line."""

    def __init__(self, image, points, *flags):
        self.port = _free_port()
        self.log = points + f".{self.port}.log"
        t0 = time.perf_counter()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from cellcount_jax.cli import main; main()", "annotate",
                 image, f"--points={points}", f"--port={self.port}", *flags],
                stdout=log, stderr=subprocess.STDOUT)
        while "open http" not in open(self.log).read():
            assert self.proc.poll() is None, open(self.log).read()
            assert time.perf_counter() - t0 < 120, open(self.log).read()
            time.sleep(0.02)
        self.seconds = time.perf_counter() - t0
        # The printed URL, with its token; the page is opened as 127.0.0.1.
        self.url = re.search(r"open (http://\S+)", open(self.log).read()).group(1).replace(
            "localhost", "127.0.0.1", 1)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def servers():
    started = []
    yield lambda *a: started.append(Server(*a)) or started[-1]
    for s in started:
        if s.proc.poll() is None:
            s.kill()


class Page:
    """A page of the tool, with the helpers the tests drive it by."""

    def __init__(self, browser, url, name):
        self.page = browser.new_page(viewport={"width": 1000, "height": 720})
        self.errors = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.name, self.shots = name, 0
        self.open(url)

    def open(self, url):
        """Opens the page at the server's URL (with its token), or reloads it (url None: the
        token is then the cookie's)."""
        if url is None:
            self.page.reload()
        else:
            self.page.goto(url)
        self.page.wait_for_function("document.getElementById('status').textContent === 'ready'"
                                    " && S.image !== null", timeout=60_000)
        assert "token" not in self.page.url  # read once, and out of the address bar

    def js(self, expression, arg=None):
        return self.page.evaluate(expression, arg)

    def count(self, kind):
        return self.js(f"S.timings.{kind}.length")

    def wait(self, condition, timeout=60_000):
        self.page.wait_for_function(condition, timeout=timeout)

    def screen(self, coords):
        """Page coordinates of the image position (.., y, x)."""
        return self.js("([y, x]) => { const [sy, sx] = toScreen(y, x); "
                       "const r = canvas.getBoundingClientRect(); "
                       "return [r.left + sx, r.top + sy]; }",
                       [float(coords[-2]), float(coords[-1])])

    def edit(self, action):
        """Runs `action` (mouse or keys) and waits until the server's answer is drawn."""
        n = self.count("edit")
        action()
        self.wait(f"S.timings.edit.length > {n}")

    def click(self, coords):
        self.page.mouse.click(*self.screen(coords))

    def key(self, key, kind=None):
        n = kind and self.count(kind)
        self.page.keyboard.press(key)
        if kind:
            self.wait(f"S.timings.{kind}.length > {n}")

    def shot(self, what):
        os.makedirs(ARTIFACTS, exist_ok=True)
        self.shots += 1
        name = f"{self.name}-{self.shots:02d}-{what}.png"
        self.page.screenshot(path=os.path.join(ARTIFACTS, name))


def _csv(path):
    """The dots on disk, read with the csv-free reference (split lines)."""
    if not os.path.exists(path):
        return np.zeros((0, 0))
    with open(path) as f:
        header, *lines = f.read().splitlines()
    assert header in ("z,y,x", "y,x")
    return np.array([[float(v) for v in line.split(",")] for line in lines]).reshape(
        len(lines), len(header.split(",")))


def _same_rows(a, b, atol=1e-3):
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    if a.size == 0 or b.size == 0:
        return a.size == b.size
    return a.shape == b.shape and np.allclose(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])],
                                              atol=atol)


def _synthetic_stack(path, shape=(40, 96, 100), n=18, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform([4, 8, 8], np.array(shape) - [4, 8, 8], (n, 3))
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    image = sum(np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / 18)
                for centre in centres)
    import tifffile
    tifffile.imwrite(path, (image * 3000 + rng.normal(200, 20, shape)).clip(0).astype(np.uint16))


def test_3d_stack_propose_accept_region_add_delete_move_slice_undo_kill_reopen(browser, servers,
                                                                              tmp_path):
    import tifffile
    image = QCANET if os.path.exists(QCANET) else str(tmp_path / "nuclei.tif")
    if image != QCANET:
        _synthetic_stack(image)
    volume = tifffile.imread(image).astype(np.float32)
    dots = str(tmp_path / "dots.csv")
    server = servers(image, dots, "--grid=2,2,2")
    page = Page(browser, server.url, "stack")
    shape = np.array(volume.shape)
    assert page.js("S.z") == shape[0] // 2
    page.shot("opened")

    # Proposals in view: the page's box and default settings, against proposals.propose here.
    page.key("p")
    page.wait("document.getElementById('status').textContent.startsWith('proposals')")
    box = np.array(page.js("visibleBox()"))
    found = page.js("S.proposals.map((p) => p.c)")
    region = volume[tuple(slice(a, b) for a, b in zip(*box))]
    expected = proposals.propose(region, 3, sigma=1.0, opening=1, min_size=4) + box[0]
    assert len(found) > 0 and _same_rows(found, expected)
    page.shot("proposals")

    # Accept the proposals of one grid region (the one under the mouse, of this slice's z
    # range, with the most proposals): exactly those land.
    cells = [_cell(c, 2, shape) for c in found]
    targets = [np.array([page.js("S.z"), shape[1] * fy, shape[2] * fx])
               for fy in (0.25, 0.75) for fx in (0.25, 0.75)]
    target = max(targets, key=lambda t: sum((c == _cell(t, 2, shape)).all() for c in cells))
    cell = _cell(target, 2, shape)
    inside = [f for f, c in zip(found, cells) if (c == cell).all()]
    assert len(inside) >= 2, "too few proposals in the chosen region"
    page.page.mouse.move(*page.screen(target))
    page.edit(lambda: page.key("q"))
    assert _same_rows(_csv(dots), inside)
    assert page.js("S.proposals.length") == len(found) - len(inside)
    page.shot("region-accepted")
    page.key("c")

    # Add a dot with a click where nothing is near, on the current slice.
    z = page.js("S.z")
    taken = np.array([c for c in found] + [[z, -99, -99]])
    free = next(np.array([z, y, x]) for y in np.linspace(5, shape[1] - 5, 15)
                for x in np.linspace(5, shape[2] - 5, 15)
                if np.hypot(*(taken[:, 1:] - [y, x]).T).min() > 4)
    before = _csv(dots)
    page.edit(lambda: page.click(free))
    rows = _csv(dots)
    assert len(rows) == len(before) + 1
    added = rows[~np.isclose(rows[:, None], before[None]).all(-1).any(1)]
    assert len(added) == 1 and added[0][0] == z and np.abs(added[0][1:] - free[1:]).max() < 0.5
    page.shot("added")

    # Delete an accepted dot: go to its slice with the keys, click it.
    victim = inside[0]
    while page.js("S.z") != _slice(victim[0]):
        page.key("." if page.js("S.z") < _slice(victim[0]) else ",", "slice")
    assert page.page.locator("#zval").text_content() == f"{_slice(victim[0]) + 1} / {shape[0]}"
    before = _csv(dots)
    page.edit(lambda: page.click(victim))
    assert _same_rows(_csv(dots), [r for r in before if not np.allclose(r, victim, atol=1e-3)])
    page.shot("deleted")

    # Move the added dot: back to its slice, then drag it 6 pixels down and 5 to the right.
    while page.js("S.z") != z:
        page.key("." if page.js("S.z") < z else ",", "slice")
    before = _csv(dots)
    page.page.mouse.move(*page.screen(free))
    page.page.mouse.down()
    goal = free + [0, 6, 5]
    for t in np.linspace(0.1, 1, 8):
        page.page.mouse.move(*page.screen(free + t * (goal - free)))
    page.edit(page.page.mouse.up)
    moved = _csv(dots)
    assert len(moved) == len(before)
    new = moved[~np.isclose(moved[:, None], before[None], atol=1e-3).all(-1).any(1)]
    assert len(new) == 1 and new[0][0] == z and np.abs(new[0][1:] - goal[1:]).max() < 0.5
    page.shot("moved")

    # A change of slice touches no dot; undo brings the dot back to where it was added.
    page.key(".", "slice")
    assert page.js("S.z") == z + 1 and _same_rows(_csv(dots), moved)
    page.edit(lambda: page.key("Control+z"))
    assert _same_rows(_csv(dots), before)
    page.shot("undone")

    # The projection shows every dot; a click on one goes to its slice.
    page.key("m", "view")
    assert page.js("S.mip") is True
    page.shot("projection")
    apart = [r for r in before if _slice(r[0]) != page.js("S.z") and
             np.sort(np.hypot(*(before[:, 1:] - r[1:]).T))[1:].min(initial=np.inf) > 3]
    page.click(apart[0])
    page.wait(f"S.z === {_slice(apart[0][0])} && !S.mip")

    # A region ticked off as reviewed (R, under the mouse) is saved with the dots.
    corner = np.array([page.js("S.z"), 2, 2])
    page.page.mouse.move(*page.screen(corner))
    page.edit(lambda: page.key("r"))
    reviewed = [_cell(corner, 2, shape).tolist()]
    assert page.js("S.progress.reviewed") == reviewed

    # Kill the server: nothing is lost; a new one continues with the same dots and regions.
    saved = _csv(dots)
    server.kill()
    server = servers(image, dots, "--grid=2,2,2")
    page.open(server.url)
    page.open(None)  # reloaded: the cookie holds the new server's token
    assert _same_rows(page.js("S.points.map((p) => p.coords)"), saved)
    assert _same_rows(_csv(dots), saved)
    assert page.js("S.progress.reviewed") == reviewed
    assert page.page.locator("#progress").text_content().startswith(
        f"{len(saved)} dots, 1/8 regions reviewed")
    page.shot("reopened")
    assert page.errors == []


def _rgb_image(tmp_path):
    if os.path.exists(VGG):
        return VGG
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    cells = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
                for cy, cx in rng.uniform(10, 246, (60, 2)))
    rgb = np.stack([0.1 * cells, 0.2 * cells, cells], -1)
    path = str(tmp_path / "cells.png")
    Image.fromarray((rgb / rgb.max() * 255).astype(np.uint8)).save(path)
    return path


def test_model_proposals_in_their_own_colour_and_both(browser, servers, tmp_path):
    """--model offers the shipped VGG model's detections (checked against the model run here),
    switching the source re-runs at once, and a click accepts a model proposal."""
    from PIL import Image
    from cellcount_jax import model_folder
    from cellcount_jax.cli import model_path
    image = _rgb_image(tmp_path)
    dots = str(tmp_path / "dots.csv")
    server = servers(image, dots, "--model=pretrained/vgg2d_cpu")
    page = Page(browser, server.url, "model")
    assert page.js("S.info.model") == "vgg2d_cpu" and page.js("$('source').value") == "model"
    page.key("p")
    page.wait("document.getElementById('status').textContent.startsWith('proposals')", 120_000)
    found = page.js("S.proposals.map((p) => p.c)")
    assert set(page.js("S.proposals.map((p) => p.src)")) == {"model"}
    model = model_folder.load_model(model_path("vgg2d_cpu"))
    expected = model.detect(np.asarray(Image.open(image).convert("RGB"))).pixels
    assert len(found) > 10 and _same_rows(found, expected, atol=1e-3)
    page.shot("model")
    page.page.select_option("#source", "both")
    page.wait("S.proposals.some((p) => p.src === 'detector')")
    assert page.js("S.proposals.filter((p) => p.src === 'model').length") == len(found)
    page.shot("both")
    one = found[len(found) // 2]
    page.edit(lambda: page.click(one))
    assert _same_rows(_csv(dots), [one])
    assert page.errors == []


def _percentiles(ms):
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def _latency(page, dots, n, change_key, kind, ndim):
    """n edits (adds, then their undos) and n slice or view changes, as the page times them."""
    h, w = page.js("[H(), W()]")
    z = page.js("S.z")
    for i in range(n // 2):
        page.edit(lambda i=i: page.click([z, h * (0.2 + 0.6 * (i % 5) / 4),
                                          w * (0.2 + 0.6 * (i // 5 % 5) / 4)][-ndim:]))
    for _ in range(n - n // 2):
        page.edit(lambda: page.key("Control+z"))
    assert len(_csv(dots)) == 0
    if kind == "view":  # zoomed in, so that each pan asks for another region
        for _ in range(3):
            page.key("+", "view")
    for i in range(n):
        page.key(change_key[i % 2 if kind == "slice" else i // 4 % 2], kind)
    return {"edit": _percentiles(page.js("S.timings.edit")[-n:]),
            kind: _percentiles(page.js(f"S.timings.{kind}")[-n:])}


@pytest.fixture(scope="module")
def big_stack(tmp_path_factory):
    """A 2 GB uint16 BigTIFF stack: noise and bright nuclei, written plane by plane (or the
    stack $CELLCOUNT_STACK names, e.g. one not in the page cache, to time a cold open)."""
    import tifffile
    if os.environ.get("CELLCOUNT_STACK"):
        yield os.environ["CELLCOUNT_STACK"]
        return
    path = str(tmp_path_factory.mktemp("big") / "stack_2gb.tif")
    out = tifffile.memmap(path, shape=BIG_SHAPE, dtype=np.uint16, bigtiff=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    blob = (3000 * np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 60)).astype(np.uint16)
    for z in range(BIG_SHAPE[0]):
        plane = rng.integers(100, 400, BIG_SHAPE[1:], dtype=np.uint16)
        plane.reshape(64, 64, 64, 64).transpose(0, 2, 1, 3)[(z % 2)::2, ::3] += blob
        out[z] = plane
    out.flush()
    del out
    yield path
    os.remove(path)


def test_latency_of_edits_and_views_vgg_image_and_2gb_stack(browser, servers, tmp_path, big_stack):
    results = {"machine": os.environ.get("CELLCOUNT_MACHINE", ""), "cpus": os.cpu_count()}
    image = _rgb_image(tmp_path)
    server = servers(image, str(tmp_path / "vgg.csv"))
    page = Page(browser, server.url, "latency-2d")
    results["vgg"] = {"image": os.path.basename(image), "shape": page.js("S.info.shape"),
                      **_latency(page, str(tmp_path / "vgg.csv"), 40, ["ArrowRight", "ArrowLeft"],
                                 "view", 2)}
    page.shot("vgg")
    assert page.errors == []
    t0 = time.perf_counter()
    server = servers(big_stack, str(tmp_path / "big.csv"))
    page = Page(browser, server.url, "latency-3d")
    opened = time.perf_counter() - t0
    results["stack"] = {"file": os.path.basename(big_stack), "shape": page.js("S.info.shape"),
                        "gigabytes": round(os.path.getsize(big_stack) / 1e9, 2),
                        "server_start_s": round(server.seconds, 2),
                        "open_to_first_view_s": round(opened, 2),
                        **_latency(page, str(tmp_path / "big.csv"), 40, [".", ","], "slice", 3)}
    while page.js("S.zoom") < 1:  # zoomed in to a screen pixel per image pixel
        page.key("+", "view")
    for i in range(40):
        page.key(".," [i % 2], "slice")
    results["stack"]["slice_zoomed_1to1"] = _percentiles(page.js("S.timings.slice")[-40:])
    page.shot("stack")
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "latency.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results))
    assert opened < 30, f"the 2 GB stack took {opened:.1f} s to open"
    for name in ("vgg", "stack"):
        for kind, t in results[name].items():
            if isinstance(t, dict):
                assert t["p95_ms"] < 2000, (name, kind, t)
    assert page.errors == []
