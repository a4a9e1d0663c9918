"""Counting and locating cells in new images with a model folder, tile by tile.

Every image, from a PNG to a whole-brain volume far larger than memory, is read lazily
(`volumes`) and predicted tile by tile (`tiling`); what a tile finds is written before the
next tile is taken, so memory is bounded by the tile size and an interrupted run resumes.
Per image, in the output folder:

    <name>_detections.csv   one row per cell, appended tile by tile: axis-0, axis-1[, axis-2]
                            (the pixel coordinates z, y, x, napari's column names), the
                            physical coordinates, the density at the cell
    <name>_tiles.csv        one row per finished tile: its core box, its detections,
                            integration count and share of close pairs of detections (for the
                            corrected count), and the detections file's length after it (the
                            resume record)
    <name>_run.json         the settings of the run (with a cells' diameter: the diameter used
                            and the zoom it gives) and the image's normalisation statistics
    <name>_density.tif      the density map (float32, BigTIFF when large), written tile by
                            tile; or <name>_density.ome.zarr (`density='zarr'`); or none
    <name>_overlay.png      images up to OVERLAY_VOXELS: detections as red crosses and, with
                            annotations, the truth as green circles (3D: maximum projection)

and one `counts.csv` for all images (with a cells' diameter, each image's in a column). A run
killed at any moment and started again with the same arguments continues after its last
finished tile: the detections file is cut back to the length the tile record gives, so no cell
is lost or written twice. With a Dask client (`dask.distributed`) the tiles are tasks on its
workers, each of which loads the model once; this process writes the results in the order they
finish.
"""
import csv
import functools
import itertools
import os
import sys
import time

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from cellcount_jax import metrics, model_folder, normalise, postprocess, tiling, volumes
from cellcount_jax.data import io, read_annotation, read_folder
from cellcount_jax.errors import InputError

OVERLAY_VOXELS = 2 ** 24
DENSITY_FORMATS = ("tif", "zarr", "none")


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


# ---------------------------------------------------------------------------------------------
# Inputs


def _is_plane(path: str) -> bool:
    """Whether an image file holds one 2D plane (Y, X[, C<=4])."""
    try:
        if path.lower().endswith((".tif", ".tiff")):
            with tifffile.TiffFile(path) as f:
                shape = f.series[0].shape
        else:
            with Image.open(path) as im:
                return getattr(im, "n_frames", 1) == 1
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot read image ({e})") from e
    return len(shape) == 2 or (len(shape) == 3 and shape[-1] <= 4)


def inputs(path: str, ndim: int, annotations: str = "", roi: str = ""):
    """(name, volume, dots or None, roi or None) for each image of `path`: one image file, a
    zarr / OME-Zarr, a folder of images, or (3D models) a folder of 2D planes as one z-stack.
    With `annotations` (a folder of `<stem>.csv` / masks, or one file for one image) the images
    are read whole, to be scored; `roi` limits the scores to the annotated regions."""
    if roi and not annotations:
        raise InputError("--roi needs --annotations (the region is where the dots are complete)")
    if not os.path.exists(path):
        raise InputError(f"--input {path!r}: no such file or folder")
    if os.path.isdir(path) and not volumes.is_zarr(path):
        names = io.list_images(path)
        if not names:
            raise InputError(f"{path}: no PNG/TIFF images")
        if ndim == 3 and _is_plane(os.path.join(path, names[0])):
            stack = True
        else:
            stack = False
        if annotations and not stack:
            split = read_folder(path, annotations, ndim, roi_dir=roi)
            return [(n, volumes.ArrayVolume(im, ndim, n), d, split.roi(i))
                    for i, (im, d, n) in enumerate(zip(split.images, split.dots, split.names))]
        if not stack:
            return [(os.path.splitext(n)[0], volumes.open_volume(os.path.join(path, n), ndim),
                     None, None) for n in names]
    volume = volumes.open_volume(path, ndim)
    dots = region = None
    if annotations:
        if os.path.isdir(annotations):
            raise InputError(f"--annotations {annotations!r}: one image takes one annotation file")
        dots = read_annotation(annotations, volume.shape, path)
        region = io.read_roi(roi, volume.shape) if roi else None
    return [(volume.name, volume, dots, region)]


# ---------------------------------------------------------------------------------------------
# Files of one image


def _append(path: str, text: str):
    """Appends and forces the bytes to disk; returns the file's new length."""
    with open(path, "a", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _finished_tiles(ledger: str, detections: str):
    """The tiles a previous run finished, from its tile record; cuts a half-written last
    record line and the detections written after the last finished tile."""
    done, good = {}, 0
    with open(ledger, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    header = lines[0]
    good = len(header) + 1
    names = header.decode().strip().split(",")
    for line in lines[1:-1]:  # the part after the last newline is incomplete
        row = dict(zip(names, line.decode().strip().split(",")))
        done[int(row["tile"])] = row
        good += len(line) + 1
    with open(ledger, "r+b") as f:
        f.truncate(good)
    if done:
        length = max(int(r["csv_bytes"]) for r in done.values())
    else:
        with open(detections, "rb") as f:
            length = len(f.readline())
    with open(detections, "r+b") as f:
        f.truncate(length)
    return done


class _DensityStore:
    """The density map on disk, written core by core: a (Big)TIFF memory map or an OME-Zarr
    image (chunks of one tile core)."""

    def __init__(self, path, kind, shape, chunks, spacing, resume):
        self.kind, self.path = kind, path
        if kind == "tif":
            # Mapped for each write only: an open mapping would keep every page written so far
            # in the process's resident memory.
            if not (resume and os.path.exists(path)):
                created = tifffile.memmap(path, shape=tuple(shape), dtype=np.float32,
                                       bigtiff=4 * np.prod(shape) > 2 ** 31 - 2 ** 25,
                                       photometric="minisblack")
                del created
        elif kind == "zarr":
            zarr = volumes._zarr()
            if resume and os.path.exists(path):
                self.array = zarr.open_group(path, mode="r+")["0"]
            else:
                group = zarr.open_group(path, mode="w", zarr_format=2)
                self.array = group.create_array("0", shape=tuple(shape), dtype="float32",
                                                chunks=tuple(chunks), fill_value=0.0)
                axes = [{"name": a, "type": "space"} for a in "zyx"[3 - len(shape):]]
                group.attrs["multiscales"] = [{
                    "version": "0.4", "name": "density", "axes": axes,
                    "datasets": [{"path": "0", "coordinateTransformations": [
                        {"type": "scale", "scale": [float(s) for s in spacing]}]}]}]

    def write(self, core, values):
        index = tuple(slice(a, b) for a, b in core)
        if self.kind == "tif":
            mapped = tifffile.memmap(self.path, mode="r+")
            mapped[index] = values
            mapped.flush()
            del mapped
        else:
            self.array[index] = values


def _density_store(kind, path, shape, chunks, spacing, resume):
    return None if kind == "none" else _DensityStore(path, kind, shape, chunks, spacing, resume)


# ---------------------------------------------------------------------------------------------
# Running tiles: here or on Dask workers


@functools.lru_cache(maxsize=2)
def _worker_model(model_dir: str):
    return model_folder.load_model(model_dir)


@functools.lru_cache(maxsize=4)
def _worker_volume(spec):
    return _open_spec(spec)


def _open_spec(spec):
    if spec[0] == "resampled":
        return tiling.Resampled(_open_spec(spec[1]), spec[2])
    return volumes.open_spec(spec)


def _dask_tile(model_dir, spec, affine, tile, keep_density):
    """One tile on a Dask worker: the model and the volume are opened once per worker."""
    volume = _worker_volume(spec) if spec[0] != "array" else _open_spec(spec)
    return next(tiling.predict_tiles(_worker_model(model_dir), volume, affine, [tile],
                                     keep_density=keep_density))


def _results(predictor, volume, affine, todo, keep_density, client, model_dir):
    """TileResults of the tiles `todo`, in the order they finish."""
    if client is None:
        yield from tiling.predict_tiles(predictor, volume, affine, todo, keep_density=keep_density)
        return
    from distributed import as_completed
    if model_dir is None:
        raise InputError("prediction on Dask workers needs the model as a folder path")
    spec = volume.spec()
    pending = iter(todo)
    in_flight = 2 * max(1, len(client.scheduler_info()["workers"])) + 1
    submit = lambda t: client.submit(_dask_tile, model_dir, spec, affine, t,  # noqa: E731
                                     keep_density, pure=False)
    queue = as_completed([submit(t) for t in itertools.islice(pending, in_flight)])
    for future in queue:
        result = future.result()
        future.release()
        nxt = next(pending, None)
        if nxt is not None:
            queue.add(submit(nxt))
        yield result


def predict_image(predictor, volume, output: str, name: str, *, tile=None, context=None,
                  spacing=None, diameter=None, density: str = "tif", client=None,
                  model_dir: str = None, progress: bool = True) -> dict:
    """Predicts one image (`volumes.Volume`) tile by tile into `output` (module docstring);
    resumes a previous run of the same settings. Returns its row of counts.csv.

    tile, context: voxels per axis (default: the model's, `Predictor.tiling`). spacing: the
    image's voxel spacing when it differs from the model's; diameter: its cells' diameter when
    they are larger or smaller than the model's training cells (in the units of `spacing`,
    without it in pixels; or 'auto' to estimate it; `Predictor.input_zoom`). The image is
    resampled by the zoom they give for the network (linear interpolation, tile by tile) and
    detections are mapped back to the image's pixels (physical coordinates in `spacing`, else
    the model's). density: 'tif', 'zarr' or 'none'. client: a `dask.distributed.Client` whose
    workers run the tiles (they load `model_dir`)."""
    channels = predictor.record["channels"]
    if volume.channels != channels:
        where = getattr(volume, "path", None) or getattr(volume, "folder", None) or name
        raise InputError(f"{where}: the model takes images with {channels} channel(s), this "
                         f"one has {volume.channels}")
    if density not in DENSITY_FORMATS:
        raise InputError(f"--density must be one of {DENSITY_FORMATS}, got {density!r}")
    model_spacing = np.asarray(predictor.spacing, np.float64)
    grid_volume, zoom, used = predictor.input_grid(volume, spacing, diameter)
    if used is not None:
        unit = "" if spacing is not None else " pixels"
        how = "estimated" if diameter == "auto" else "given"
        scale = f"{zoom[-1]:.4g}" if np.allclose(zoom, zoom[-1]) else f"{zoom.round(4).tolist()}"
        print(f"{name}: cells {used:.4g}{unit} across ({how}), the model's "
              f"{predictor.cell_diameter:.4g}: resampled by {scale}", flush=True)
    spacing = predictor.input_spacing(spacing)
    tile, context = predictor.tiling(tile, context)
    tiles = tiling.grid(grid_volume.shape, tile, context)
    os.makedirs(output, exist_ok=True)
    paths = {k: os.path.join(output, f"{name}_{k}") for k in
             ("detections.csv", "tiles.csv", "run.json")}
    density_path = os.path.join(output, f"{name}_density." + ("ome.zarr" if density == "zarr"
                                                              else "tif"))
    source = getattr(volume, "path", None) or getattr(volume, "folder", None)
    source = os.path.abspath(source) if source else name
    settings = {"input": source, "shape": list(volume.shape),
                "channels": volume.channels, "model_step": predictor.step,
                "detector": predictor.record.get("detector"), "zoom": predictor.zoom,
                "spacing": spacing.tolist(),
                "model_spacing": model_spacing.tolist(), "grid_shape": list(grid_volume.shape),
                "tile": list(tile), "context": list(context), "density": density}
    if used is not None:  # only then: runs without a diameter stay resumable as they were
        settings.update(diameter={"given": diameter if diameter == "auto" else float(diameter),
                                  "used": round(float(used), 4),
                                  "model": predictor.cell_diameter},
                        grid_zoom=zoom.tolist())
    resume = os.path.exists(paths["run.json"]) and os.path.exists(paths["tiles.csv"])
    if resume:
        previous = model_folder.read_json(paths["run.json"])
        diff = [k for k in settings if previous.get("settings", {}).get(k) != settings[k]]
        if diff:
            raise InputError(f"{output} holds a run on {name} with other settings ({', '.join(diff)}"
                             f"); use another --output or delete {paths['run.json']}")
        affine = tuple(np.asarray(v, np.float32) for v in previous["affine"])
        done = _finished_tiles(paths["tiles.csv"], paths["detections.csv"])
    else:
        if progress and volume.size * volume.channels > normalise.WHOLE_STATISTICS:
            print(f"{name}: {volume.shape} voxels x {volume.channels} channel(s), "
                  f"{len(tiles)} tile(s); normalisation statistics...", file=sys.stderr,
                  flush=True)
        affine = predictor.normaliser.affine(grid_volume)
        ndim = volume.ndim
        axes = "zyx"[3 - ndim:]
        with open(paths["detections.csv"], "w", newline="") as f:
            f.write(",".join(io.detection_columns(ndim, ["density"])) + "\r\n")
        with open(paths["tiles.csv"], "w", newline="") as f:
            f.write(",".join(["tile"] + [f"{a}0" for a in axes] + [f"{a}1" for a in axes]
                             + ["detections", "integration", "pairs", "csv_bytes"]) + "\n")
        store = _density_store(density, density_path, grid_volume.shape, tile, model_spacing,
                               False)
        # Written last: a run.json means every file of the run exists.
        model_folder.write_json(paths["run.json"], {
            "settings": settings, "affine": [a.tolist() for a in affine]})
        done = {}
    if resume:
        store = _density_store(density, density_path, grid_volume.shape, tile, model_spacing,
                               True)
    todo = [t for t in tiles if t.index not in done]
    mass_per_dot = predictor.record["target"]["mass_per_dot"]
    bar = _progress(len(tiles), len(done), name, progress)
    start, voxels = time.time(), 0
    for r in _results(predictor, grid_volume, affine, todo, store is not None, client, model_dir):
        if store is not None:
            store.write(r.tile.core, r.core_density)
        pixels = r.pixels / zoom if grid_volume is not volume else r.pixels
        length = _append(paths["detections.csv"], io.detection_rows(pixels, spacing,
                                                                     [r.density]))
        _append(paths["tiles.csv"], ",".join(
            [str(r.tile.index)] + [str(a) for a, _ in r.tile.core] + [str(b) for _, b in r.tile.core]
            + [str(len(pixels)), f"{r.mass / mass_per_dot:.3f}", f"{r.pairs:g}", str(length)])
            + "\n")
        voxels += r.tile.core_size
        if bar is not None:
            bar.set_postfix_str(f"{voxels / max(time.time() - start, 1e-9):.3g} voxels/s")
            bar.update(1)
    if bar is not None:
        bar.close()
    done = _finished_tiles(paths["tiles.csv"], paths["detections.csv"])
    detections = sum(int(r["detections"]) for r in done.values())
    pairs = sum(float(r.get("pairs", 0.0)) for r in done.values())
    row = {"name": name, "count_detections": detections,
           "count_corrected": round(predictor.corrected_count(detections, pairs), 2),
           "count_integration": round(sum(float(r["integration"]) for r in done.values()), 2),
           "tiles": len(done)}
    if used is not None:
        row["diameter"] = round(float(used), 4)
    return row


def _progress(total, initial, name, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="tile", desc=name, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


# ---------------------------------------------------------------------------------------------
# The command


def predict_paths(predictor, path: str, output: str, annotations: str = "", roi: str = "", *,
                  tile=None, context=None, spacing=None, diameter=None, density: str = "tif",
                  client=None, model_dir: str = None, progress: bool = True):
    """Runs `predictor` on the images of `path` (`inputs`), writes to `output`, prints one
    line per image and returns the rows of counts.csv (with `annotations`: scored at the
    model's match radius, scaled with the cells where `diameter` rescales them, inside `roi`
    when given). spacing, diameter: as `predict_image` (diameter 'auto': estimated on each
    image)."""
    items = inputs(path, predictor.ndim, annotations, roi)
    os.makedirs(output, exist_ok=True)
    radius = predictor.record["detector"]["radius"] if predictor.calibrated else None
    counts, lines = [], []
    for name, volume, dots, region in items:
        row = predict_image(predictor, volume, output, name, tile=tile, context=context,
                            spacing=spacing, diameter=diameter, density=density, client=client,
                            model_dir=model_dir, progress=progress)
        det = None
        if dots is not None or volume.size <= OVERLAY_VOXELS:
            det = io.read_dots_csv(os.path.join(output, f"{name}_detections.csv"), volume.ndim)
        if volume.size <= OVERLAY_VOXELS:
            Image.fromarray(overlay(volume.read(), det, dots)).save(
                os.path.join(output, f"{name}_overlay.png"))
        line = (f"{name:<24}{row['count_detections']:>11d}{row['count_corrected']:>10.1f}"
                f"{row['count_integration']:>12.1f}")
        if dots is not None:
            dots = postprocess.inside(dots, region)
            match_radius = radius
            if row.get("diameter"):  # the cells' size in the units of the match's spacing
                size = row["diameter"] * (1.0 if spacing is not None else predictor.spacing[-1])
                match_radius = radius * size / predictor.cell_diameter
            tp, fp, fn = metrics.match(postprocess.inside(det, region), dots, match_radius,
                                       predictor.spacing if spacing is None else spacing)
            row.update(true_count=len(dots), tp=tp, fp=fp, fn=fn)
            line += f"{len(dots):>6d}{tp:>6d}{fp:>6d}{fn:>6d}"
        lines.append(line)
        counts.append(row)
    print(f"{'image':<24}{'detections':>11}{'corrected':>10}{'integration':>12}" +
          (f"{'true':>6}{'TP':>6}{'FP':>6}{'FN':>6}" if annotations else ""), flush=True)
    print("\n".join(lines), flush=True)
    keys = list(dict.fromkeys(k for r in counts for k in r))
    with open(os.path.join(output, "counts.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(counts)
    total = sum(r["count_detections"] for r in counts)
    print(f"{len(counts)} image(s), {total} cells detected; detections, density maps, overlays "
          f"and counts.csv in {output}", flush=True)
    return counts


def dask_client(workers: int = 0, scheduler: str = ""):
    """A `dask.distributed.Client`: on an existing scheduler's address, or on a LocalCluster of
    `workers` processes (one thread each); None for neither (run in this process)."""
    if not workers and not scheduler:
        return None
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise InputError("--workers and --scheduler need the optional dependencies: "
                         "pip install 'cellcount_jax[big]'") from e
    if scheduler:
        return Client(scheduler)
    return Client(LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                               dashboard_address=None))


def predict_folder(workdir: str, inputs_path: str, output: str, annotations: str = "",
                   roi: str = "", workers: int = 0, scheduler: str = "", **kwargs):
    """`cellcount predict`: the model folder `workdir` on `inputs_path`."""
    client = dask_client(workers, scheduler)
    try:
        return predict_paths(model_folder.load_model(workdir), inputs_path, output, annotations,
                             roi, client=client, model_dir=os.path.abspath(workdir), **kwargs)
    finally:
        if client is not None:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
