"""The benchmark command runs and prints one JSON object per line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_benchmark_lines():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
                          "--only=targets,post", "--quick"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    names = [r["name"] for r in records]
    assert names == ["matmul_peak", "targets_2d", "targets_3d", "postprocess_match_256"]
    for r in records[1:3]:
        assert r["max_abs_err"] <= 1e-5 and r["jax_s"] > 0 and r["speedup_vs_scipy"] > 0
    assert all(r["peak_rss_mb"] > 0 for r in records)
    # The allocator the timings ran under.
    assert "glibc_tunables" in records[0] and records[0]["allocator"] in ("tcmalloc", "system")


VGG = os.path.join(ROOT, "..", "shared", "data", "vgg_cells")


@pytest.mark.skipif(not os.path.isdir(VGG), reason="VGG cells data not present")
def test_vgg_as_a_user_folder_reads_like_the_vgg_source(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vgg_folder.py"),
                          f"--out={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from cellcount_jax.data import _vgg, read_folder
    from conftest import load_config
    labeled, unlabeled, test = _vgg(load_config("vgg2d").data)
    train = read_folder(str(tmp_path / "train"), str(tmp_path / "train_dots"), 2)
    folder_test = read_folder(str(tmp_path / "test"), str(tmp_path / "test_dots"), 2)
    dotted = {n: d for n, d in zip(train.names, train.dots) if d is not None}
    assert sorted(dotted) == sorted(labeled.names) and len(train.names) == 100
    for split, names, dots in ((dotted, labeled.names, labeled.dots),
                               (dict(zip(folder_test.names, folder_test.dots)), test.names,
                                test.dots)):
        for n, d in zip(names, dots):
            np.testing.assert_array_equal(split[n], d)
