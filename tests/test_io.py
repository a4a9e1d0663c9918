"""Loaders for the formats users have, and one clear error per bad input."""
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellcount_jax.data import io, read_folder, vgg_split

VGG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "vgg_cells")
QCANET = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "qcanet")


def write_png(path, a):
    Image.fromarray(a).save(path)


def test_dots_csv_axes_and_napari(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("x,y,label\n3.5,1,a\n7,2.25,b\n")
    np.testing.assert_allclose(io.read_dots_csv(str(p), 2), [[1, 3.5], [2.25, 7]])
    p.write_text("index,axis-0,axis-1,axis-2\n0,1,2,3\n1,4,5,6\n")
    np.testing.assert_allclose(io.read_dots_csv(str(p), 3), [[1, 2, 3], [4, 5, 6]])
    p.write_text("z,y,x\n")
    assert io.read_dots_csv(str(p), 3).shape == (0, 3)
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="a.csv.*names no y,x"):
        io.read_dots_csv(str(p), 2)
    p.write_text("y,x\n1,oops\n")
    with pytest.raises(ValueError, match="a.csv.*bad number"):
        io.read_dots_csv(str(p), 2)


def test_dots_from_mask_labels_and_binary():
    m = np.zeros((10, 10), np.uint16)
    m[1:4, 1:4] = 5
    m[6:8, 6:9] = 9
    np.testing.assert_allclose(io.dots_from_mask(m), [[2, 2], [6.5, 7]])
    b = (m > 0).astype(np.uint8) * 255
    np.testing.assert_allclose(io.dots_from_mask(b), [[2, 2], [6.5, 7]])


def test_read_image_types(tmp_path):
    write_png(str(tmp_path / "g.png"), np.full((8, 8), 7, np.uint8))
    write_png(str(tmp_path / "c.png"), np.zeros((8, 8, 4), np.uint8))
    tifffile.imwrite(str(tmp_path / "v.tif"), np.ones((4, 8, 8), np.uint16) * 1000,
                     photometric="minisblack")
    tifffile.imwrite(str(tmp_path / "f.tif"), np.ones((8, 8), np.float32), photometric="minisblack")
    assert io.read_image(str(tmp_path / "g.png"), 2).shape == (8, 8, 1)
    assert io.read_image(str(tmp_path / "c.png"), 2).shape == (8, 8, 3)
    v = io.read_image(str(tmp_path / "v.tif"), 3)
    assert v.shape == (4, 8, 8, 1) and v.dtype == np.float32 and v.max() == 1000
    assert io.read_image(str(tmp_path / "f.tif"), 2).shape == (8, 8, 1)
    with pytest.raises(ValueError, match="v.tif.*expected a 2D image"):
        io.read_image(str(tmp_path / "v.tif"), 2)
    with pytest.raises(ValueError, match="g.png.*expected 3 channel"):
        io.read_image(str(tmp_path / "g.png"), 2, channels=3)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png.*cannot read"):
        io.read_image(str(tmp_path / "bad.png"), 2)
    tifffile.imwrite(str(tmp_path / "nan.tif"), np.full((8, 8), np.nan, np.float32),
                     photometric="minisblack")
    with pytest.raises(ValueError, match="nan.tif.*NaN"):
        io.read_image(str(tmp_path / "nan.tif"), 2)


def make_folder(tmp_path):
    img, ann = tmp_path / "images", tmp_path / "dots"
    img.mkdir()
    ann.mkdir()
    for name in ("a", "b", "c"):
        tifffile.imwrite(str(img / f"{name}.tif"), np.zeros((4, 16, 16), np.uint16),
                         photometric="minisblack")
    (ann / "a.csv").write_text("z,y,x\n1,2,3\n2,10,12\n")
    m = np.zeros((4, 16, 16), np.uint8)
    m[1:3, 4:6, 4:6] = 255
    tifffile.imwrite(str(ann / "b.tif"), m, photometric="minisblack")
    return str(img), str(ann)


def test_folder_dataset_labeled_unlabeled(tmp_path):
    img, ann = make_folder(tmp_path)
    s = read_folder(img, ann, 3)
    assert s.names == ["a", "b", "c"]
    np.testing.assert_allclose(s.dots[0], [[1, 2, 3], [2, 10, 12]])
    np.testing.assert_allclose(s.dots[1], [[1.5, 4.5, 4.5]])
    assert s.dots[2] is None  # no annotation: unlabeled


def test_folder_errors_name_the_file(tmp_path):
    img, ann = make_folder(tmp_path)
    (tmp_path / "dots" / "a.csv").write_text("z,y,x\n1,2,16\n")
    with pytest.raises(ValueError, match="a.csv: 1 dots lie outside"):
        read_folder(img, ann, 3)
    (tmp_path / "dots" / "a.csv").write_text("z,y,x\n1,2,3\n")
    (tmp_path / "dots" / "zzz.csv").write_text("z,y,x\n")
    with pytest.raises(ValueError, match="annotation files without an image.*zzz"):
        read_folder(img, ann, 3)
    os.remove(tmp_path / "dots" / "zzz.csv")
    tifffile.imwrite(str(tmp_path / "dots" / "b.tif"), np.zeros((4, 8, 8), np.uint8),
                     photometric="minisblack")
    with pytest.raises(ValueError, match="b.tif: mask shape"):
        read_folder(img, ann, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no PNG or TIFF images"):
        read_folder(str(empty), "", 2)
    with pytest.raises(ValueError, match="not a folder"):
        read_folder(str(tmp_path / "missing"), "", 2)


def test_vgg_split_is_the_papers():
    lab, unl, test = vgg_split()
    assert lab.tolist() == [126, 138, 112, 89, 154, 127, 106, 103]
    assert len(unl) == 92 and len(test) == 100
    assert len(set(lab) | set(unl) | set(test)) == 200


@pytest.mark.skipif(not os.path.isdir(VGG), reason="VGG cells not present (../shared/data)")
def test_vgg_dots_count_red_pixels():
    d = io.dots_from_red_pixels(os.path.join(VGG, "001dots.png"))
    assert len(d) == 135  # touching dots are separate pixels, not blobs


@pytest.mark.skipif(not os.path.isdir(QCANET), reason="QCANet embryos not present (../shared/data)")
def test_qcanet_masks_give_the_nuclei_counts():
    s = read_folder(os.path.join(QCANET, "images_raw"), os.path.join(QCANET, "images_ndn"), 3)
    assert [len(d) for d in s.dots] == [16, 8]  # 16_cell_stage, 8_cell_stage


def folder_config(img, ann, **kw):
    from conftest import load_config
    c = load_config()
    c.data.source, c.data.images, c.data.annotations = "folder", img, ann
    c.data.ndim = kw.get("ndim", 2)
    c.data.test_names = kw.get("test_names", ())
    return c


def test_folder_load_errors(tmp_path):
    from cellcount_jax import data
    img = tmp_path / "images"
    img.mkdir()
    write_png(str(img / "a.png"), np.zeros((16, 16), np.uint8))
    write_png(str(img / "b.png"), np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="different channel counts"):
        data.load(folder_config(str(img), ""))
    os.remove(img / "b.png")
    with pytest.raises(ValueError, match="no labeled training images"):
        data.load(folder_config(str(img), "", test_names=()))
    with pytest.raises(ValueError, match="test_names.*'zz'"):
        data.load(folder_config(str(img), "", test_names=("zz",)))
    c = folder_config(str(img), "")
    c.data.source = "vgg"
    c.data.path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="VGG cells folder"):
        data.load(c)


def test_files_and_volumes_import_without_jax():
    """What Dask workers and the annotation server import to read files brings no JAX."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import sys\n"
                          "import cellcount_jax.data.io, cellcount_jax.volumes, cellcount_jax.data\n"
                          "from cellcount_jax.data import io, synthetic\n"
                          "print('jax' in sys.modules)\n"
                          "from cellcount_jax.data import load, Splits\n"
                          "print('jax' in sys.modules, load.__module__, Splits.__name__)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "cellcount_jax.data.pipeline", "Splits"]
