"""Counting in a volume larger than memory: end-to-end `cellcount predict` on a synthetic
uint16 BigTIFF, with its wall time, voxels/s and the peak resident memory of the whole process
tree (the command and its Dask workers, summed), one JSON line per run.

    python launch.py --config=configs/synthetic3d.py --workdir=workdir/s3d_general
    python benchmarks/big_volume.py write --path=/tmp/big.tif --shape=128,4096,4096
    python benchmarks/big_volume.py run --model=workdir/s3d_general --path=/tmp/big.tif \
        --workers=0,2

`write` builds the volume plane by plane from blocks of the embedded generator (the synthetic3d
recipe: 48x128x128 voxels, 500-700 nuclei of radius 4, z spacing 2), tiled over the plane with
a different block per position, so memory stays at one plane. `run` predicts it with the given
worker counts (0: in the command's own process), detections only (`--density=none`) unless
`--density` says otherwise.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cellcount_jax.data import synthetic_image  # noqa: E402

BLOCK = (48, 128, 128)


def write(path, shape, blocks=8, seed=0, truth=""):
    made = [synthetic_image(seed + i, shape=BLOCK, num_cells=(500, 700), radius=4.0,
                            spacing=(2.0, 1.0, 1.0), channels=1) for i in range(blocks)]
    bank = np.stack([m[0][..., 0] for m in made])
    bank = np.round(bank * 4000 + 100).astype(np.uint16)
    z_blocks = -(-shape[0] // BLOCK[0])
    ny, nx = shape[1] // BLOCK[1], shape[2] // BLOCK[2]
    if ny * BLOCK[1] != shape[1] or nx * BLOCK[2] != shape[2]:
        raise SystemExit(f"y and x must be multiples of {BLOCK[1:]}")
    choice = np.random.default_rng(seed).integers(0, blocks, (z_blocks, ny, nx))

    def planes():
        for z in range(shape[0]):
            tiles = bank[choice[z // BLOCK[0]], z % BLOCK[0]]  # (ny, nx, 128, 128)
            yield tiles.transpose(0, 2, 1, 3).reshape(shape[1], shape[2])

    if truth:  # every block's cells, shifted to where the block sits (those of whole z blocks)
        with open(truth, "w") as f:
            f.write("z,y,x\n")
            for (bz, by, bx), b in np.ndenumerate(choice):
                for d in made[b][1] + np.array([bz, by, bx]) * BLOCK:
                    if d[0] <= shape[0] - 1:
                        f.write(f"{d[0]:.2f},{d[1]:.2f},{d[2]:.2f}\n")
    start = time.time()
    tifffile.imwrite(path, planes(), shape=tuple(shape), dtype=np.uint16, bigtiff=True,
                     photometric="minisblack")
    print(json.dumps({"wrote": path, "shape": list(shape), "gigabytes":
                      round(os.path.getsize(path) / 1e9, 3),
                      "seconds": round(time.time() - start, 1)}), flush=True)


def tree_rss(proc):
    """Resident bytes of a process and all its descendants."""
    import psutil
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(model, path, workers, output, density, tile=None, context=None):
    import psutil
    cmd = [sys.executable, "-c", "from cellcount_jax.cli import main; main()", "predict",
           f"--model={model}", f"--input={path}", f"--output={output}", f"--density={density}",
           f"--workers={workers}", "--progress=false"] + ([f"--tile={tile}"] if tile else []) \
        + ([f"--context={context}"] if context else [])
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    seconds = time.time() - start
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    shape = tifffile.TiffFile(path).series[0].shape
    count = int(out.strip().splitlines()[-1].split()[2])  # "1 image(s), N cells detected"
    print(json.dumps({"path": path, "shape": list(shape),
                      "gigabytes": round(os.path.getsize(path) / 1e9, 3), "workers": workers,
                      "density": density, "tile": tile or "model default",
                      "context": context or "model default", "cells": count,
                      "seconds": round(seconds, 1),
                      "voxels_per_s": round(float(np.prod(shape)) / seconds),
                      "peak_rss_gb": round(peak / 1e9, 3)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["write", "run"])
    p.add_argument("--path", required=True)
    p.add_argument("--shape", default="128,4096,4096")
    p.add_argument("--model", default="workdir/s3d_general")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--density", default="none")
    p.add_argument("--tile", default="")
    p.add_argument("--context", default="")
    p.add_argument("--truth", default="", help="write: the cells' centres to this CSV")
    p.add_argument("--output", default="workdir/big_volume")
    a = p.parse_args()
    if a.what == "write":
        write(a.path, [int(s) for s in a.shape.split(",")], truth=a.truth)
        return
    for w in (int(v) for v in a.workers.split(",")):
        out = os.path.join(a.output, f"{os.path.basename(a.path)}_w{w}")
        if os.path.exists(out):
            import shutil
            shutil.rmtree(out)
        run(a.model, a.path, w, out, a.density, a.tile, a.context)


if __name__ == "__main__":
    main()
