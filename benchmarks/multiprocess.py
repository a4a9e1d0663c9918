"""Steps/s of the quickstart in one process with several devices and in several local
processes with one device each (gloo collectives, coordinator on 127.0.0.1), one JSON line per
layout. On one machine this shows the cost of the cross-process collectives, not a speed-up:
the processes share its cores.

    python benchmarks/multiprocess.py --steps=300 --parallel=pmap,shard_map

The rate is the mean of the launcher's `steps_per_s` records after the first (compilation
excluded), from process 0's metrics.jsonl.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, devices: int, steps: int, parallel: str, config: str):
    workdir = tempfile.mkdtemp(prefix="cellcount_mp_")
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}",
           f"--workdir={workdir}", f"--config.train.steps={steps}",
           f"--config.train.parallel={parallel}", f"--config.train.log_every={steps // 6}",
           f"--config.train.checkpoint_every={steps}", "--config.data.num_test=1"]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    port = _port()
    extra = lambda i: ([f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",
                        f"--process_id={i}"] if processes > 1 else [])
    start = time.time()
    procs = [subprocess.Popen(cmd + extra(i), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outs = [p.communicate() for p in procs]
    wall = time.time() - start
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(err[-3000:])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [json.loads(line)["steps_per_s"] for line in f if "steps_per_s" in line]
    shutil.rmtree(workdir)
    rate = sum(rates[1:]) / len(rates[1:])
    return {"processes": processes, "devices_per_process": devices, "parallel": parallel,
            "config": config, "steps": steps, "steps_per_s": round(rate, 3),
            "wall_s": round(wall, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--parallel", default="pmap,shard_map")
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--layouts", default="1x2,2x1", help="processes x devices each")
    a = p.parse_args()
    for parallel in a.parallel.split(","):
        for layout in a.layouts.split(","):
            n, d = (int(v) for v in layout.split("x"))
            print(json.dumps(run(n, d, a.steps, parallel, a.config)), flush=True)


if __name__ == "__main__":
    main()
