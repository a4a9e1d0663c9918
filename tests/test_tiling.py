"""Images larger than memory: lazy readers, tiles with context, streamed and resumable output,
anisotropic resampling, Dask workers."""
import csv
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from cellcount_jax import checkpoints, model_folder, models, normalise, predict, tiling, volumes
from cellcount_jax import predictor as predictor_lib
from cellcount_jax.normalise import Normaliser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(root, ndim=3, crop=(8, 16, 16), threshold=0.0, spacing=None,
               normalisation=None):
    """A model folder with a randomly initialised 4-feature SAU-Net and a calibrated detector:
    deterministic maps with structure from the input, made in a second."""
    crop = crop[-ndim:]
    model = models.SAUNet(features=4, dropout=0.0)
    params = models.init_params(model, jax.random.PRNGKey(0), (1,) + tuple(crop) + (1,))
    record = {
        "format": model_folder.FORMAT, "package_version": "test", "ndim": ndim, "channels": 1,
        "spacing": list(spacing or [1.0] * ndim),
        "network": {"name": "SAUNet", "features": 4, "levels": models.LEVELS},
        "normalisation": normalisation or {"mode": "percentile", "percentiles": [1.0, 99.8]},
        "target": {"kind": "inverse_distance", "scale": 100.0, "sigma": 2.0, "mass_per_dot": 1.0},
        "train_crop": list(crop), "tiling": predictor_lib.tiling_default(crop),
        "detector": {"name": "peaks", "threshold": float(threshold), "min_size": 1,
                     "min_distance": 0.0, "radius": 3.0},
    }
    os.makedirs(root, exist_ok=True)
    model_folder.write_record(root, record)
    mngr = checkpoints.manager(root)
    checkpoints.save(mngr, 1, {"params": params})
    mngr.wait_until_finished()
    mngr.close()
    return root


def blobs(shape, n, seed=0, sigma=1.5):
    """uint16 image of n Gaussian blobs on a noisy background, and their centres."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, np.array(shape) - 1, (n, len(shape)))
    image = np.zeros(shape)
    image[tuple(np.round(centres).astype(int).T)] = 1
    image = ndimage.gaussian_filter(image, sigma) * 4000 + rng.normal(100, 5, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), centres


@pytest.fixture(scope="module")
def model3d(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("model3d"))
    make_model(root)
    predictor = model_folder.load_model(root)
    image, _ = blobs((24, 64, 64), 60, seed=1)
    density = predictor.density(image, tile=64, context=0)
    # A threshold that keeps a few dozen peaks of the random network's map.
    predictor.record["detector"]["threshold"] = float(np.percentile(density, 97))
    model_folder.write_record(root, predictor.record)
    return root


def read_rows(path):
    with open(path, newline="") as f:
        return sorted(tuple(r) for r in list(csv.reader(f))[1:])


def test_grid_cores_partition_the_image_and_windows_hold_them():
    for shape, tile, context in [((37, 50), (16, 16), (5, 3)), ((9, 20, 33), (4, 8, 10), (2, 0, 7)),
                                 ((10, 10), (16, 16), (4, 4)), ((40,), (7,), (30,))]:
        tiles = tiling.grid(shape, tile, context)
        hits = np.zeros(shape, int)
        windows = set()
        for t in tiles:
            hits[tuple(slice(a, b) for a, b in t.core)] += 1
            windows.add(tuple(b - a for a, b in t.window))
            for (ca, cb), (wa, wb), s, c in zip(t.core, t.window, shape, context):
                assert wa <= ca and cb <= wb and 0 <= wa and wb <= s
                assert ca - wa >= min(c, ca) and wb - cb >= min(c, s - cb)
        assert (hits == 1).all()  # every voxel in exactly one core
        assert len(windows) == 1  # one window shape: one compilation


def test_owned_points_split_at_core_boundaries():
    core = ((0, 96), (96, 192))
    pts = np.array([[95.49, 96.0], [95.5, 96.0], [0.0, 95.5], [0.0, 95.49], [10, 191.6]])
    assert tiling.owned(pts, core).tolist() == [True, False, True, False, False]


def test_image_within_one_tile_equals_whole_image_prediction(model3d):
    predictor = model_folder.load_model(model3d)
    image, _ = blobs((20, 40, 48), 30, seed=2)
    x = Normaliser.from_json(predictor.record["normalisation"])(image[..., None].astype(np.float32))
    whole = predictor.network(x)
    tiled = predictor.density(image, tile=(32, 64, 64), context=(8, 8, 8))
    np.testing.assert_array_equal(tiled, whole)
    det = predictor.detect(image, tile=(32, 64, 64), context=(8, 8, 8))
    np.testing.assert_array_equal(det.pixels, predictor.detections_of(whole).pixels)


class Smoothing(predictor_lib.Predictor):
    """A 'network' that is a local operator (a Gaussian of the first channel): its map in a
    window equals the whole image's map away from the window's edges, so tiling may only
    change which tile reports a cell, never the cells."""

    def network(self, x):
        return ndimage.gaussian_filter(x[..., 0], 1.5, mode="reflect", truncate=3.0)


def test_cells_on_seams_and_corners_are_detected_once(model3d, tmp_path):
    record = dict(model_folder.read_record(model3d))
    record["detector"] = {"name": "peaks", "threshold": 0.02, "min_size": 1, "min_distance": 0.0,
                          "radius": 3.0, "crowding": {"distance": 6.0, "per_pair": 0.5}}
    record["ndim"], record["spacing"], record["train_crop"] = 2, [1.0, 1.0], [16, 16]
    record["normalisation"] = {"mode": "channel_stats", "mean": [0.0], "std": [1.0]}
    predictor = Smoothing(None, None, record, step=0)
    # Cells on the boundaries of 32x32 tiles: on a seam, on a corner, half a pixel either side
    # of one (two equal voxels: the peak is their centre), and some inside.
    cells = [(32, 10), (10, 32), (32, 32), (64, 64), (31.5, 50), (50, 63.5), (95.5, 95.5),
             (16, 16), (80, 40), (5, 90), (29, 75), (34, 75)]  # the last two: a close pair
    image = np.zeros((100, 100))
    for y, x in cells:
        for yy in {int(np.floor(y)), int(np.ceil(y))}:
            for xx in {int(np.floor(x)), int(np.ceil(x))}:
                image[yy, xx] = 1.0
    whole = predictor.detections_of(predictor.network(image[..., None]))
    assert sorted(map(tuple, whole.pixels.tolist())) == sorted(map(tuple, np.float32(cells).tolist()))
    row = predict.predict_image(predictor, volumes.ArrayVolume(image, 2), str(tmp_path), "seams",
                                tile=32, context=8, density="none", progress=False)
    got = read_rows(tmp_path / "seams_detections.csv")
    assert row["count_detections"] == len(cells) == len(got) and row["tiles"] == 16
    # the pair across the seam is counted once: half by each of its tiles
    assert row["count_corrected"] == whole.count_corrected == len(cells) + 0.5
    np.testing.assert_allclose(sorted((float(r[0]), float(r[1])) for r in got), sorted(cells))


def test_streamed_output_files(model3d, tmp_path):
    predictor = model_folder.load_model(model3d)
    image, _ = blobs((24, 64, 64), 60, seed=1)
    path = str(tmp_path / "vol.tif")
    tifffile.imwrite(path, image)
    out = str(tmp_path / "out")
    os.makedirs(out)
    row = predict.predict_image(predictor, volumes.open_volume(path, 3), out, "vol",
                                tile=(8, 32, 32), context=(4, 8, 8), progress=False)
    whole = predictor.detect(image, tile=64, context=0)
    got = np.array([[float(v) for v in r[:3]] for r in read_rows(os.path.join(out, "vol_detections.csv"))])
    # Tiles see less of the volume than one whole-volume input; the random network's map moves
    # a little, so the detections agree on most cells only.
    assert abs(row["count_detections"] - len(whole)) <= 0.2 * len(whole) + 2
    with open(os.path.join(out, "vol_detections.csv")) as f:
        header = f.readline().strip().split(",")
    assert header == ["axis-0", "axis-1", "axis-2", "z_physical", "y_physical", "x_physical",
                      "density"]
    assert len(got) == row["count_detections"]
    tiles = list(csv.DictReader(open(os.path.join(out, "vol_tiles.csv"))))
    assert len(tiles) == row["tiles"] == 3 * 2 * 2
    assert sum(int(t["detections"]) for t in tiles) == len(got)
    density = tifffile.imread(os.path.join(out, "vol_density.tif"))
    assert density.shape == image.shape and density.dtype == np.float32
    full = predictor.density(image, tile=(8, 32, 32), context=(4, 8, 8))
    np.testing.assert_allclose(density, full, rtol=1e-5, atol=1e-5)
    # The training loader reads the detections as they are.
    from cellcount_jax.data import io
    loaded = io.read_dots_csv(os.path.join(out, "vol_detections.csv"), 3)
    np.testing.assert_allclose(sorted(map(tuple, loaded)), sorted(map(tuple, got)), atol=1e-3)


def test_ome_zarr_density_is_written(model3d, tmp_path):
    zarr = pytest.importorskip("zarr")
    predictor = model_folder.load_model(model3d)
    image, _ = blobs((16, 40, 40), 20, seed=3)
    predict.predict_image(predictor, volumes.ArrayVolume(image, 3), str(tmp_path), "v",
                          tile=(8, 16, 16), context=4, density="zarr", progress=False)
    group = zarr.open_group(str(tmp_path / "v_density.ome.zarr"), mode="r")
    ms = group.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    np.testing.assert_allclose(group["0"][:], predictor.density(image, tile=(8, 16, 16), context=4),
                               rtol=1e-5, atol=1e-5)


def _cli(*args):
    return [sys.executable, "-c", "from cellcount_jax.cli import main; main()", *args]


def test_killed_run_resumes_without_losing_or_duplicating_cells(model3d, tmp_path):
    image, _ = blobs((32, 96, 96), 150, seed=4)
    path = str(tmp_path / "vol.tif")
    tifffile.imwrite(path, image)
    args = ["predict", f"--model={model3d}", f"--input={path}", "--tile=8,16,16",
            "--context=4,8,8", "--progress=false"]
    ref = subprocess.run(_cli(*args, f"--output={tmp_path / 'ref'}"), capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = read_rows(tmp_path / "ref" / "vol_detections.csv")
    assert len(want) > 20
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, f"--output={out}"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ledger = out / "vol_tiles.csv"
    deadline = time.time() + 300
    while time.time() < deadline:
        if ledger.exists() and len(ledger.read_text().splitlines()) > 30:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(ledger.read_text().splitlines()) - 1
    assert 0 < finished < 4 * 6 * 6, finished  # killed mid-way
    done = subprocess.run(_cli(*args, f"--output={out}"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_rows(out / "vol_detections.csv") == want
    np.testing.assert_array_equal(tifffile.imread(out / "vol_density.tif"),
                                  tifffile.imread(tmp_path / "ref" / "vol_density.tif"))
    # The same output folder with other settings is refused, not mixed.
    other = subprocess.run(_cli(*args[:-2], "--tile=16", f"--output={out}"),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "other settings (tile)" in other.stderr


def test_torn_writes_are_cut_back_on_resume(model3d, tmp_path):
    """A kill between the detections and the tile record, or inside a line of either."""
    predictor = model_folder.load_model(model3d)
    image, _ = blobs((16, 48, 48), 40, seed=5)
    kw = dict(tile=(8, 16, 16), context=4, density="none", progress=False)
    os.makedirs(tmp_path / "a")
    predict.predict_image(predictor, volumes.ArrayVolume(image, 3), str(tmp_path / "a"), "v", **kw)
    want = read_rows(tmp_path / "a" / "v_detections.csv")
    for cut in ("between", "in_ledger_line", "in_csv_line"):
        out = tmp_path / cut
        os.makedirs(out)
        for name in ("v_detections.csv", "v_tiles.csv", "v_run.json"):
            (out / name).write_bytes((tmp_path / "a" / name).read_bytes())
        lines = (out / "v_tiles.csv").read_text().splitlines(keepends=True)
        keep = lines[:6]  # header + 5 tiles
        length = int(keep[-1].strip().split(",")[-1])
        data = (out / "v_detections.csv").read_bytes()
        if cut == "between":  # the next tile's cells were written, its record was not
            (out / "v_tiles.csv").write_text("".join(keep))
            (out / "v_detections.csv").write_bytes(data[:int(lines[6].strip().split(",")[-1])])
        elif cut == "in_ledger_line":
            (out / "v_tiles.csv").write_text("".join(keep) + lines[6][:5])
            (out / "v_detections.csv").write_bytes(data[:int(lines[6].strip().split(",")[-1])])
        else:
            (out / "v_tiles.csv").write_text("".join(keep))
            (out / "v_detections.csv").write_bytes(data[:length + 7])
        row = predict.predict_image(predictor, volumes.ArrayVolume(image, 3), str(out), "v", **kw)
        assert read_rows(out / "v_detections.csv") == want
        assert row["tiles"] == 3 * 3  # z: one window spans the 16 planes


def test_two_dask_workers_give_the_detections_of_one_process(model3d, tmp_path):
    pytest.importorskip("distributed")
    image, _ = blobs((16, 64, 64), 60, seed=6)
    path = str(tmp_path / "vol.tif")
    tifffile.imwrite(path, image)
    predictor = model_folder.load_model(model3d)
    kw = dict(tile=(8, 32, 32), context=(2, 8, 8), progress=False)
    os.makedirs(tmp_path / "one")
    predict.predict_image(predictor, volumes.open_volume(path, 3), str(tmp_path / "one"), "vol",
                          **kw)
    rows = predict.predict_folder(model3d, path, str(tmp_path / "two"), workers=2, **kw)
    assert rows[0]["tiles"] == 2 * 2 * 2
    one = np.array(read_rows(tmp_path / "one" / "vol_detections.csv"), float)
    two = np.array(read_rows(tmp_path / "two" / "vol_detections.csv"), float)
    assert len(one) > 5
    np.testing.assert_allclose(two, one, atol=2e-3)
    np.testing.assert_allclose(tifffile.imread(tmp_path / "two" / "vol_density.tif"),
                               tifffile.imread(tmp_path / "one" / "vol_density.tif"), atol=1e-4)
    # An existing cluster, by its scheduler's address (as dask-jobqueue gives it).
    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        predict.predict_folder(model3d, path, str(tmp_path / "sched"),
                               scheduler=cluster.scheduler_address, **kw)
    np.testing.assert_allclose(np.array(read_rows(tmp_path / "sched" / "vol_detections.csv"),
                                        float), one, atol=2e-3)


def test_anisotropic_volume_is_resampled_to_the_model_grid(tmp_path):
    root = make_model(str(tmp_path / "model"), spacing=[1.0, 1.0, 1.0])
    predictor = model_folder.load_model(root)
    image, _ = blobs((12, 40, 40), 20, seed=7)
    vol = volumes.ArrayVolume(image, 3)
    resampled = tiling.Resampled(vol, (2.0, 1.0, 1.0))  # z planes 2 apart -> 1 apart
    assert resampled.shape == (23, 40, 40)
    grid = np.meshgrid(np.arange(23) / 2.0, np.arange(40), np.arange(40), indexing="ij")
    want = ndimage.map_coordinates(image.astype(np.float64), grid, order=1)
    np.testing.assert_allclose(resampled.read()[..., 0], want, rtol=1e-5)
    # Any box reads the same values as the whole.
    np.testing.assert_allclose(resampled.read(((5, 17), (3, 30), (0, 40)))[..., 0],
                               want[5:17, 3:30], rtol=1e-5)
    predictor.record["detector"]["threshold"] = float(
        np.percentile(predictor.density(resampled.read()[..., 0]), 97))
    predict.predict_image(predictor, vol, str(tmp_path), "aniso", spacing=(2.0, 1.0, 1.0),
                          tile=(16, 32, 32), context=4, density="none", progress=False)
    got = np.array([[float(v) for v in r[:6]] for r in read_rows(tmp_path / "aniso_detections.csv")])
    on_grid = predictor.detect(resampled.read()[..., 0], tile=(16, 32, 32), context=4).pixels
    assert len(got) == len(on_grid) > 3
    np.testing.assert_allclose(sorted(map(tuple, got[:, :3])),
                               sorted(map(tuple, on_grid / [2.0, 1.0, 1.0])), atol=2e-3)
    np.testing.assert_allclose(got[:, 3:], got[:, :3] * [2.0, 1.0, 1.0], atol=2e-3)


# ---- lazy readers -------------------------------------------------------------------------


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_plane_folder_is_a_z_stack_in_natural_order_read_plane_by_plane(tmp_path, monkeypatch):
    image, _ = blobs((12, 30, 40), 10, seed=8)
    for z in range(12):  # names that sort wrongly as text: plane10 before plane2
        Image.fromarray(image[z]).save(tmp_path / f"plane{z}.png") if z % 2 else \
            tifffile.imwrite(tmp_path / f"plane{z}.tif", image[z])
    vol = volumes.open_volume(str(tmp_path), 3)
    assert vol.shape == (12, 30, 40) and vol.channels == 1
    read = []
    original = volumes.PlaneFolder._plane
    monkeypatch.setattr(volumes.PlaneFolder, "_plane",
                        lambda self, z: read.append(z) or original(self, z))
    box = ((3, 6), (5, 20), (10, 30))
    np.testing.assert_array_equal(vol.read(box)[..., 0], image[3:6, 5:20, 10:30])
    assert read == [3, 4, 5]
    with pytest.raises(Exception, match="needs a 3D model"):
        volumes.open_volume(str(tmp_path), 2)


def test_bigtiff_is_memory_mapped_and_read_by_box(tmp_path):
    image = np.random.default_rng(0).integers(0, 4000, (64, 256, 256), dtype=np.uint16)  # 8 MB
    path = str(tmp_path / "big.tif")
    tifffile.imwrite(path, image, bigtiff=True)
    vol = volumes.open_volume(path, 3)
    assert vol.kind == "tiff-memmap" and vol.shape == image.shape
    box = ((10, 12), (0, 32), (5, 37))
    out, peak = _peak_bytes(lambda: vol.read(box))
    np.testing.assert_array_equal(out[..., 0], image[10:12, :32, 5:37])
    assert peak < image.nbytes / 20


def test_compressed_tiff_and_ome_zarr_are_read_by_chunks(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = np.random.default_rng(1).integers(0, 4000, (32, 128, 128), dtype=np.uint16)
    path = str(tmp_path / "comp.tif")
    tifffile.imwrite(path, image, compression="zlib", tile=(64, 64))
    vol = volumes.open_volume(path, 3)
    assert vol.kind == "tiff-zarr"
    out, peak = _peak_bytes(lambda: vol.read(((4, 6), (0, 20), (70, 90))))
    np.testing.assert_array_equal(out[..., 0], image[4:6, :20, 70:90])
    assert peak < image.nbytes / 8
    # OME-Zarr with t, c, z, y, x axes and two channels.
    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    data = np.stack([image, image // 2])[None]  # (1, 2, z, y, x)
    arr = group.create_array("0", shape=data.shape, dtype="uint16", chunks=(1, 1, 8, 32, 32))
    arr[:] = data
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
        {"name": "z", "type": "space"}, {"name": "y", "type": "space"},
        {"name": "x", "type": "space"}], "datasets": [{"path": "0"}]}]
    vol = volumes.open_volume(str(tmp_path / "img.ome.zarr"), 3)
    assert vol.shape == (32, 128, 128) and vol.channels == 2
    out, peak = _peak_bytes(lambda: vol.read(((8, 16), (32, 64), (0, 32))))
    np.testing.assert_array_equal(out, np.moveaxis(data[0, :, 8:16, 32:64, :32], 0, -1))
    assert peak < data.nbytes / 8


def test_streamed_statistics_match_numpy_without_reading_the_whole(tmp_path, monkeypatch):
    image, _ = blobs((160, 128, 128), 200, seed=9)  # 5 MB
    path = str(tmp_path / "v.tif")
    tifffile.imwrite(path, image)
    monkeypatch.setattr(normalise, "WHOLE_STATISTICS", 10_000)
    monkeypatch.setattr(normalise, "SLAB_VALUES", 4096 * 4)
    vol = volumes.open_volume(path, 3)
    pct = Normaliser("percentile", percentiles=(1.0, 99.8))
    (offset, scale), peak = _peak_bytes(lambda: pct.affine(vol))
    lo, hi = np.percentile(image.astype(np.float64), [1.0, 99.8])
    np.testing.assert_allclose([offset[0], offset[0] + scale[0]], [lo, hi], rtol=1e-6)
    assert peak < image.nbytes / 2  # never the whole volume (as float32 it is 2x the file)
    # Floating-point volumes: a histogram, to 1/65536 of the range.
    fimage = image.astype(np.float32) / 7.0
    fvol = volumes.ArrayVolume(fimage, 3)
    offset, scale = pct.affine(fvol)
    lo, hi = np.percentile(fimage.astype(np.float64), [1.0, 99.8])
    span = float(fimage.max() - fimage.min())
    assert abs(offset[0] - lo) < span / 65536 * 2 and abs(offset[0] + scale[0] - hi) < span / 65536 * 2
    # minmax: (x - min) / range, standardised by the whole image's mean and std.
    mm = Normaliser("minmax")
    offset, scale = mm.affine(vol)
    y = (image - image.min()) / (image.max() - image.min())
    want = (y - y.mean()) / (y.std() + 1e-6)
    np.testing.assert_allclose(Normaliser.apply(image[..., None], (offset, scale))[..., 0], want,
                               rtol=1e-4, atol=1e-4)


def test_one_nearest_pixel_rule_for_half_coordinates():
    """Dots, detections and tile ownership all take a point's nearest pixel as floor(x + 0.5)
    (halves up; np.round would send 2.5 to 2 and 3.5 to 4)."""
    import jax.numpy as jnp
    from cellcount_jax import postprocess, targets, tiling
    from cellcount_jax.data.dataset import check_dots
    pts = np.array([[2.5, 3.5], [0.49, 6.5], [-0.5, 7.49]])
    np.testing.assert_array_equal(postprocess.nearest_pixel(pts), [[3, 4], [0, 7], [0, 7]])
    np.testing.assert_array_equal(postprocess.nearest_pixel(pts, (3, 7)), [[2, 4], [0, 6], [0, 6]])
    # The target's dot pixel, the tile that owns the point and the ROI test agree.
    counts = np.asarray(targets.rasterize(jnp.asarray(pts[:2], jnp.float32), 2, (8, 8)))
    assert counts[3, 4] == 1 and counts[0, 7] == 1 and counts.sum() == 2
    assert tiling.owned(pts[:1], ((3, 4), (4, 5))).all()
    assert not tiling.owned(pts[:1], ((2, 3), (3, 4))).any()
    roi = np.zeros((8, 8), bool)
    roi[3, 4] = True
    np.testing.assert_array_equal(postprocess.inside(pts[:1], roi), pts[:1])
    with pytest.raises(Exception, match="outside"):
        check_dots(np.array([[7.5, 1.0]]), (8, 8), "im")  # nearest pixel 8: outside
    check_dots(np.array([[7.49, 1.0], [-0.5, 0.0]]), (8, 8), "im")
