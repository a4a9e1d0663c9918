"""Multi-process training on this machine: two local processes (gloo collectives, coordinator
on 127.0.0.1, one CPU device each) against one process with two devices; kill and resume;
SIGTERM; only process 0 writes."""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from cellcount_jax import checkpoints
from cellcount_jax.data.dataset import Dataset, part_rows, striped

# Long enough that a signal sent when the first periodic checkpoint appears lands mid-run.
STEPS, EVERY = 100, 20
ARGS = ["--config=configs/quickstart.py:tiny", f"--config.train.steps={STEPS}",
        f"--config.train.checkpoint_every={EVERY}", f"--config.train.log_every={EVERY}"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start(workdir, processes: int = 2, devices: int = 1, extra=()):
    """The launcher as `processes` local processes (or one plain process) on `workdir`."""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={workdir}", *ARGS,
           *extra]
    if processes == 1:
        return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=_env(devices), cwd=ROOT)]
    port = _free_port()
    return [subprocess.Popen(cmd + [f"--coordinator=127.0.0.1:{port}",
                                    f"--num_processes={processes}", f"--process_id={i}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(devices), cwd=ROOT) for i in range(processes)]


def _finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return outs


def _params(workdir):
    step, params = checkpoints.restore_params(str(workdir))
    assert step == STEPS
    return params


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _wait_for_checkpoint(workdir, step, procs, timeout=300):
    path = os.path.join(str(workdir), "checkpoints", str(step), "commit_success.txt")
    end = time.time() + timeout
    while not os.path.exists(path):
        assert all(p.poll() is None for p in procs), "a process ended before the checkpoint"
        assert time.time() < end, "no checkpoint in time"
        time.sleep(0.05)


def test_the_parts_of_a_batch_are_the_batch_of_one_process():
    rng = np.random.default_rng(0)
    images = [rng.random((30 + i, 28, 2)).astype(np.float32) for i in range(3)]
    ds = Dataset(images, [np.zeros((0, 2))] * 3, [im[..., 0] for im in images],
                 [rng.random((26, 40 - i, 2)).astype(np.float32) for i in range(4)],
                 intensity={"noise": 0.1, "gamma": 0.3},
                 masks=[None, rng.random((31, 28)) > 0.5, None])
    whole = ds.sample(np.random.default_rng([3, 9]), (16, 16), 4, 4)
    for count in (2, 4):
        parts = [ds.sample(np.random.default_rng([3, 9]), (16, 16), 4, 4, (i, count))
                 for i in range(count)]
        for k, v in whole.items():
            assert all(len(p[k]) == 4 // count for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)


def test_a_striped_pool_draws_each_row_from_its_stripe_and_splits_by_process():
    rng = np.random.default_rng(1)
    labeled = [rng.random((20, 20, 1)).astype(np.float32) for _ in range(2)]
    # unlabeled image i is the constant i, so a crop tells which image it came from
    pool = [np.full((18 + i % 3, 22, 1), float(i), np.float32) for i in range(10)]
    ds = lambda images: Dataset(labeled, [np.zeros((0, 2))] * 2, [im[..., 0] for im in labeled],
                                images, stripes=4)
    full = ds(pool)
    seen = set()
    for step in range(40):
        rows = full.sample(np.random.default_rng([0, step]), (16, 16), 4, 4)["unlabeled"]
        for j, row in enumerate(rows):
            assert row.min() == row.max() and int(row[0, 0, 0]) % 4 == j
            seen.add(int(row[0, 0, 0]))
        for count in (2, 4):
            parts = []
            for index in range(count):
                keep = striped(len(pool), 4, part_rows(4, (index, count)))
                assert sum(keep) == ((6, 4) if count == 2 else (3, 3, 2, 2))[index]
                local = ds([im if k else None for im, k in zip(pool, keep)])
                parts.append(local.sample(np.random.default_rng([0, step]), (16, 16), 4, 4,
                                          (index, count))["unlabeled"])
            np.testing.assert_array_equal(np.concatenate(parts), rows)
    assert seen == set(range(10))


def test_a_folder_reads_only_the_unlabeled_images_of_its_stripes(tmp_path):
    import tifffile
    from conftest import load_config
    from cellcount_jax.data import _folder
    (tmp_path / "images").mkdir()
    (tmp_path / "dots").mkdir()
    for i in range(6):
        path = tmp_path / "images" / f"im{i}.tif"
        if i < 2:
            (tmp_path / "dots" / f"im{i}.csv").write_text("y,x\n5,5\n")
        if i in (3, 5):  # unlabeled images 1 and 3: stripe 1 of 2, not read by stripe 0
            path.write_bytes(b"not a tiff")
        else:
            tifffile.imwrite(path, np.full((16, 16), i, np.uint16))
    cfg = load_config("folder2d").data
    cfg.images, cfg.annotations = str(tmp_path / "images"), str(tmp_path / "dots")
    labeled, unlabeled, _ = _folder(cfg, lambda n: striped(n, 2, (0, 1)))
    assert labeled.names == ["im0", "im1"] and unlabeled.names == ["im2", "im3", "im4", "im5"]
    assert [None if im is None else int(im.max()) for im in unlabeled.images] == [2, None, 4, None]


def test_striped_channel_statistics_are_those_of_the_whole_pool():
    from conftest import tiny_config
    from cellcount_jax import data
    c = tiny_config()
    c.data.num_unlabeled = 5
    c.data.shard_unlabeled = True
    striped_load = data.load(c)
    assert len(striped_load.train.unlabeled) == 5 and striped_load.train.stripes == 2
    labeled, unlabeled, _ = data._synthetic(c.data)
    pixels = np.concatenate([im.reshape(-1, 3) for im in labeled.images + unlabeled.images])
    pixels = pixels.astype(np.float64)
    np.testing.assert_allclose(striped_load.normaliser.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(striped_load.normaliser.std, pixels.std(0) + 1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted run of two processes (pmap): (workdir, outputs of each process)."""
    workdir = tmp_path_factory.mktemp("two")
    return workdir, _finish(_start(workdir))


@pytest.mark.slow
@pytest.mark.parametrize("parallel,shard", [("pmap", False), ("shard_map", False),
                                            ("pmap", True)])
def test_two_processes_train_like_one_process_with_two_devices(tmp_path, two_processes,
                                                               parallel, shard):
    mode = [f"--config.train.parallel={parallel}", f"--config.data.shard_unlabeled={shard}"]
    one = tmp_path / "one"
    _finish(_start(one, 1, 2, mode))
    if parallel == "pmap" and not shard:
        two, outs = two_processes
    else:
        two = tmp_path / "two"
        outs = _finish(_start(two, 2, 1, mode))
    assert _max_diff(_params(one), _params(two)) <= 1e-5
    # Process 0 speaks and writes for the job: process 1 prints nothing of its own (gloo's
    # connection line is the library's), and the model folder holds the files of a
    # one-process run and no file of process 1.
    assert "trained" in outs[0][0] and "held-out images" in outs[0][0]
    said = [line for line in outs[1][0].splitlines() if line.strip()
            and not line.startswith("[Gloo]")]
    assert said == [], said[:5]
    files = lambda d: sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d)
                             for f in fs if "checkpoints" not in r and "tensorboard" not in r)
    assert files(two) == files(one)
    assert not [r for r, _, _ in os.walk(two) if "process_1" in r]
    assert len((two / "metrics.jsonl").read_text().splitlines()) == STEPS // EVERY
    if shard:  # each process read one of the two unlabeled images
        assert "(striped: 1 read by this process)" in outs[0][0]


@pytest.mark.slow
def test_killed_processes_resume_to_the_uninterrupted_result(tmp_path, two_processes):
    killed = tmp_path / "killed"
    procs = _start(killed)
    _wait_for_checkpoint(killed, EVERY, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert not os.path.exists(killed / "checkpoints" / str(STEPS))
    outs = _finish(_start(killed))
    assert "resumed from step" in outs[0][0]
    assert _max_diff(_params(two_processes[0]), _params(killed)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 1])
def test_sigterm_saves_and_every_process_exits_cleanly(tmp_path, two_processes, processes):
    """SIGTERM to the last process of a job (two processes, or one with two devices)."""
    devices = 2 // processes
    stopped = tmp_path / "stopped"
    procs = _start(stopped, processes, devices)
    _wait_for_checkpoint(stopped, EVERY, procs)
    procs[-1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    assert "asked to stop" in outs[0][0], outs[0][0][-1000:]
    saved = checkpoints.restore_params(str(stopped))[0]
    assert EVERY <= saved < STEPS
    assert not (stopped / "eval.json").exists()
    outs = _finish(_start(stopped, processes, devices))
    assert f"resumed from step {saved}" in outs[0][0]
    assert _max_diff(_params(two_processes[0]), _params(stopped)) <= 1e-5
