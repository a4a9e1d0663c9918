"""An annotation being edited: the dots of one image, changed by `add`, `delete`, `move` and
`accept` (proposals, many at once), with `undo` and `redo`. Every change is on disk before
the call returns, written atomically (a temporary file, fsync, rename), so a killed server or
a closed browser loses nothing and opening the same file again continues where the user
stopped.

Files: the dots CSV (`y,x` or `z,y,x` pixel coordinates, what training reads) and beside it
`<csv stem>.progress.json`: the regions of a grid marked as reviewed, the time spent (edits
more than `IDLE` seconds apart add nothing) and the number of edits. The undo history lives
as long as the session.
"""
import json
import math
import os
import time

import numpy as np

from cellcount_jax import postprocess
from cellcount_jax.data import io
from cellcount_jax.errors import InputError

AXES = {2: ("y", "x"), 3: ("z", "y", "x")}
IDLE = 120.0
REGION = {2: (256, 256), 3: (32, 256, 256)}  # default grid cell size per axis, in pixels


def write_atomically(path: str, text: str):
    """`text` into `path` so that the file is always either the old or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


class Annotation:
    """The dots of an image of spatial `shape`, kept in the CSV `path` (read if it exists).

    Dots have integer ids, stable for the session (a reopened file numbers its rows 0..n-1).
    grid: regions per axis for the review progress (default: cells of `REGION` pixels).
    clock: seconds (time.monotonic; tests pass their own).
    """

    def __init__(self, path: str, shape, grid=None, clock=time.monotonic):
        self.path = path
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        if self.ndim not in AXES:
            raise InputError(f"annotations are of 2D images or 3D stacks, got shape {shape}")
        self.points = {}
        self._next = 0
        self._undo, self._redo = [], []
        self._clock, self._last = clock, None
        if os.path.exists(path):
            for d in io.read_dots_csv(path, self.ndim):
                self.points[self._new_id()] = self._checked(d)
        self.progress_path = os.path.splitext(path)[0] + ".progress.json"
        progress = {}
        if os.path.exists(self.progress_path):
            try:
                with open(self.progress_path) as f:
                    progress = json.load(f)
            except (OSError, ValueError) as e:
                raise InputError(f"{self.progress_path}: not a progress file ({e})") from e
        default = tuple(max(1, math.ceil(s / r)) for s, r in zip(self.shape, REGION[self.ndim]))
        if grid is not None:  # one count for every axis, or one per axis
            grid = tuple(int(g) for g in np.ravel(grid))
            grid = grid * self.ndim if len(grid) == 1 else grid
        if grid is not None and progress.get("grid") and tuple(progress["grid"]) != tuple(grid):
            raise InputError(f"{self.progress_path} was started with a grid of "
                             f"{tuple(progress['grid'])} regions; give that grid or none")
        self.grid = tuple(int(g) for g in (progress.get("grid") or grid or default))
        if len(self.grid) != self.ndim or min(self.grid) < 1:
            raise InputError(f"grid {self.grid}: one positive count per axis of {self.shape}")
        self.reviewed = {tuple(r) for r in progress.get("reviewed", [])}
        self.seconds = float(progress.get("seconds", 0.0))
        self.edits = int(progress.get("edits", 0))

    # -- the dots ---------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next += 1
        return self._next - 1

    def _checked(self, coords) -> np.ndarray:
        try:
            c = np.asarray(coords, np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise InputError(f"a dot is {self.ndim} numbers, got {coords!r}") from e
        if c.shape != (self.ndim,) or not np.isfinite(c).all():
            raise InputError(f"a dot is {self.ndim} finite coordinates "
                             f"({','.join(AXES[self.ndim])}), got {list(np.ravel(coords))}")
        nearest = postprocess.nearest_pixel(c[None])[0]
        if np.any(nearest < 0) or np.any(nearest >= self.shape):
            raise InputError(f"dot {c.tolist()} lies outside the image of shape {self.shape}")
        return c

    def _known(self, dot_id) -> int:
        if dot_id not in self.points:
            raise InputError(f"no dot with id {dot_id}")
        return dot_id

    def array(self) -> np.ndarray:
        """The dots (n, ndim) in id order."""
        return np.array([self.points[i] for i in sorted(self.points)],
                        np.float64).reshape(-1, self.ndim)

    def add(self, coords) -> int:
        dot_id = self._new_id()
        self._change([(dot_id, None, self._checked(coords))])
        return dot_id

    def accept(self, dots) -> list:
        """Adds many dots (accepted proposals) as one edit, undone in one step."""
        try:
            rows = np.asarray(dots, np.float64).reshape(-1, self.ndim)
        except (TypeError, ValueError) as e:
            raise InputError(f"expected a list of dots of {self.ndim} numbers each") from e
        checked = [self._checked(d) for d in rows]
        ids = [self._new_id() for _ in checked]
        if ids:
            self._change([(i, None, c) for i, c in zip(ids, checked)])
        return ids

    def delete(self, dot_id):
        dot_id = self._known(dot_id)
        self._change([(dot_id, self.points[dot_id], None)])

    def move(self, dot_id, coords):
        dot_id = self._known(dot_id)
        self._change([(dot_id, self.points[dot_id], self._checked(coords))])

    def undo(self) -> bool:
        return self._replay(self._undo, self._redo, backwards=True)

    def redo(self) -> bool:
        return self._replay(self._redo, self._undo, backwards=False)

    def _apply(self, changes, backwards: bool):
        for dot_id, old, new in (reversed(changes) if backwards else changes):
            value = old if backwards else new
            if value is None:
                self.points.pop(dot_id, None)
            else:
                self.points[dot_id] = value

    def _change(self, changes):
        self._apply(changes, backwards=False)
        self._undo.append(changes)
        self._redo.clear()
        self._edited()

    def _replay(self, source, target, backwards: bool) -> bool:
        if not source:
            return False
        changes = source.pop()
        self._apply(changes, backwards)
        target.append(changes)
        self._edited()
        return True

    # -- progress ---------------------------------------------------------------------------
    def region_of(self, coords) -> tuple:
        """The grid cell of a position: that of its nearest pixel (as the page computes it)."""
        pixel = postprocess.nearest_pixel(self._checked(coords)[None])[0]
        return tuple(int(p * g // s) for p, g, s in zip(pixel, self.grid, self.shape))

    def review(self, region, done: bool = True):
        """Marks a grid cell (one index per axis) as reviewed, or not."""
        try:
            region = tuple(int(r) for r in region)
        except (TypeError, ValueError) as e:
            raise InputError(f"a region is one index per axis, got {region!r}") from e
        if len(region) != self.ndim or any(not 0 <= r < g for r, g in zip(region, self.grid)):
            raise InputError(f"region {list(region)} is not a cell of the {self.grid} grid")
        (self.reviewed.add if done else self.reviewed.discard)(region)
        self._edited()

    def _edited(self):
        now = self._clock()
        if self._last is not None and now - self._last <= IDLE:
            self.seconds += now - self._last
        self._last = now
        self.edits += 1
        self.save()

    def progress(self) -> dict:
        return {"dots": len(self.points), "grid": list(self.grid),
                "reviewed": sorted(list(r) for r in self.reviewed),
                "regions": int(np.prod(self.grid)), "seconds": round(self.seconds, 1),
                "edits": self.edits}

    def save(self):
        """Writes the CSV and the progress file (atomically, each)."""
        lines = [",".join(AXES[self.ndim])]
        lines += [",".join(f"{v:.3f}" for v in self.points[i]) for i in sorted(self.points)]
        write_atomically(self.path, "\n".join(lines) + "\n")
        p = self.progress()
        write_atomically(self.progress_path, json.dumps(
            {k: p[k] for k in ("grid", "reviewed", "seconds", "edits")}) + "\n")
