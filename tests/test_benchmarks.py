"""The benchmark command runs and prints one JSON object per line."""
import json
import os
import subprocess
import sys

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
