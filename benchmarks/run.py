"""Benchmark suite: one JSON line per measurement, on whatever backend JAX finds.

    python benchmarks/run.py                 # everything
    python benchmarks/run.py --only=train,targets --quick
    python benchmarks/run.py --quick --impls=xla,cpu   # native XLA vs the CPU formulation
    python benchmarks/run.py --only=train,torch --dtypes=float32,bfloat16   # + PyTorch --amp
    python benchmarks/run.py --only=train,torch --modes=supervised   # no SSL step
    python benchmarks/run.py --only=convs --cases=2d_128 --dtypes=bfloat16   # per conv layer

Measures, after compilation (compile time reported separately) and with
`block_until_ready`: the SSL and supervised train steps, inference, the target generator
against scipy, post-processing + matching, the cost of the run records and the
non-finite guard on the quickstart step, and, when torch is importable, the PyTorch peer
(../shared/peers/torch_saunet.py, its own timer) on the same shapes in the same run, as a
ratio (with `--dtypes=bfloat16`, the bf16 step against the peer's `--amp`; the lines name the
CPU's bf16 units that the step used, `bf16_units`). The peer runs in a child process: each
runtime's idle worker threads spin for a while after its last step and slow the other down
when both live in one process. Every line names the CPU model (`cpu`) and the memory allocator
(`allocator`: 'tcmalloc' where it is preloaded, as the `cellcount` command does by
`cellcount_jax.allocator`, else 'system'; run the suite as `LD_PRELOAD=libtcmalloc_minimal.so.4
python benchmarks/run.py` for the command's speed).

FLOPs are those of XLA's cost analysis of the step in its XLA-native formulation
(`model.impl=xla`), the same for every impl: cost analysis does not see into the native
kernels of the 'cpu' formulation.
"""
import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cellcount_jax import allocator, convolutions, models, native, optim, postprocess, metrics, targets, train  # noqa: E402
from configs import quickstart  # noqa: E402

PEER = os.path.join(ROOT, "..", "shared", "peers", "torch_saunet.py")

TRAIN_CASES = [  # (name, spatial, batch)
    ("2d_128", (128, 128), 8),
    ("2d_224", (224, 224), 8),
    ("3d_32x64x64", (32, 64, 64), 2),
    ("3d_56x200x200", (56, 200, 200), 1),
]
INFER_CASES = [("2d_256", (256, 256), 1), ("3d_64x224x224", (64, 224, 224), 1)]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model():
    """The CPU's model name and family/model numbers (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family')}, "
            f"model {info.get('model')})")


def usable_cores():
    """The CPUs this process may run on (`taskset` limits them), not all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_info():
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind,
            "devices": jax.device_count(), "cpu": cpu_model(), "cores": usable_cores(),
            "jax": jax.__version__, "allocator": "tcmalloc" if allocator.loaded() else "system",
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def emit(record):
    record.update(peak_rss_mb=round(peak_rss_mb(), 1))
    print(json.dumps(record), flush=True)


def timed(fn, args, steps, warmup, usage=None):
    """Mean seconds per call after `warmup` calls; `fn` returns arrays to block on. `usage`
    (a dict) receives the process's system seconds and minor page faults per timed call."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    dt, r1 = (time.perf_counter() - t0) / steps, resource.getrusage(resource.RUSAGE_SELF)
    if usage is not None:
        usage.update(system_s=round((r1.ru_stime - r0.ru_stime) / steps, 4),
                     page_faults=round((r1.ru_minflt - r0.ru_minflt) / steps))
    return dt


def flops_of(stage):
    """FLOPs from XLA's cost analysis of a lowered or compiled computation."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def matmul_peak(n=2048, steps=10):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    dt = timed(f, (a,), steps, 2)
    rate = 2 * n ** 3 / dt
    emit({"name": "matmul_peak", **device_info(), "n": n, "flops_per_s": rate})
    return rate


def train_setup(spatial, batch, ssl, impl, features, dtype="float32"):
    """(parallel step, device state, device batch, rng) for the quickstart config."""
    c = quickstart.get_config()
    c.model.features = features
    c.model.impl = impl
    c.model.dtype = dtype
    c.ssl.enabled = ssl
    ch = 3 if len(spatial) == 2 else 1
    model = train.create_model(c)
    tx, lr = optim.create_optimizer(c.optim, 1000)
    state = train.create_train_state(c, model, tx, jax.random.key(0), (1, *spatial, ch))
    rng = np.random.default_rng(0)
    b = {"image": rng.normal(size=(batch, *spatial, ch)).astype(np.float32),
         "target": rng.uniform(size=(batch, *spatial)).astype(np.float32)}
    if ssl:
        b["unlabeled"] = rng.normal(size=(batch, *spatial, ch)).astype(np.float32)
    par = train.Parallel(train.make_train_step(c, model, tx, lr), "shard_map", jax.devices()[:1])
    return par, par.put_state(state), par.put_batch(b), jax.random.key(1), model.impl


def bench_train(name, spatial, batch, ssl, steps, warmup, peak, impl, features=32,
                dtype="float32"):
    par, dstate, dbatch, key, impl = train_setup(spatial, batch, ssl, impl, features, dtype)
    t0 = time.perf_counter()
    compiled = par.fn.lower(dstate, dbatch, key).compile()
    compile_s = time.perf_counter() - t0
    flops = flops_of(train_setup(spatial, batch, ssl, "xla", features)[0].fn.lower(
        dstate, dbatch, key))

    def step(s):
        return compiled(s, dbatch, key)[0]

    # The state is donated: thread it through the timed calls.
    holder = [dstate]

    def call():
        holder[0] = step(holder[0])
        return holder[0]

    usage = {}
    dt = timed(call, (), steps, warmup, usage)
    images = batch * (2 if ssl else 1)
    rec = {"name": f"train_{'ssl' if ssl else 'supervised'}_{name}", **device_info(),
           "impl": impl, "dtype": dtype,
           "bf16_units": native.bf16_units() if dtype == "bfloat16" and impl == "cpu" else None,
           "spatial": list(spatial), "batch": batch, "unlabeled_batch": batch if ssl else 0,
           "features": features, "compile_s": round(compile_s, 2),
           "step_s": round(dt, 4), "steps_per_s": round(1 / dt, 3),
           "images_per_s": round(images / dt, 3), "flops_per_step": flops,
           "flops_per_s": flops / dt, "system_s_per_step": usage["system_s"],
           "page_faults_per_step": usage["page_faults"]}
    if peak:
        rec["fraction_of_matmul_peak"] = round(flops / dt / peak, 3)
    emit(rec)
    return rec


def bench_torch(spatial, batch, steps, warmup, jax_rec, amp=False):
    """The peer's own timer, `torch_saunet.py`, in a child process (see the module docstring);
    amp: under bfloat16 autocast."""
    name = f"torch_peer_supervised_{len(spatial)}d" + ("_amp" if amp else "")
    if importlib.util.find_spec("torch") is None:
        emit({"name": name, "skipped": "torch not importable"})
        return
    if not os.path.exists(PEER):
        emit({"name": name, "skipped": f"{PEER} not found"})
        return
    args = [sys.executable, PEER, "--ndim", str(len(spatial)), "--size", str(spatial[-1]),
            "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]
    if len(spatial) == 3:
        args += ["--depth", str(spatial[0])]
    if amp:
        args.append("--amp")
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        emit({"name": name, "skipped": f"peer failed: {run.stderr.strip()[-500:]}"})
        return
    peer = json.loads(run.stdout.strip().splitlines()[-1])
    rec = {"name": name, "torch": peer["torch"], "amp_bfloat16": amp, "threads": peer["threads"],
           "spatial": peer["spatial"], "batch": batch, "params": peer["params"],
           "step_s": peer["step_s"], "images_per_s": peer["images_per_s"]}
    if jax_rec:
        rec["jax_impl"] = jax_rec["impl"]
        rec["jax_dtype"] = jax_rec["dtype"]
        rec["jax_images_per_s"] = jax_rec["images_per_s"]
        rec["ratio_jax_over_torch"] = round(jax_rec["images_per_s"] / rec["images_per_s"], 3)
    emit(rec)


def conv_layers(spatial, batch, channels, features=32):
    """(input shape, kernel shape) of every 3x3(x3) convolution of SAU-Net."""
    nd, cin, out = len(spatial), channels, []
    for level in range(models.LEVELS):
        f, s = features * 2 ** level, tuple(v // 2 ** level for v in spatial)
        out += [((batch, *s, cin), (3,) * nd + (cin, f)), ((batch, *s, f), (3,) * nd + (f, f))]
        cin = f
    for level in reversed(range(models.LEVELS - 1)):
        f, s = features * 2 ** level, tuple(v // 2 ** level for v in spatial)
        out += [((batch, *s, 2 * f), (3,) * nd + (2 * f, f)), ((batch, *s, f), (3,) * nd + (f, f))]
    return out


def bench_convs(name, spatial, batch, dtype, steps, warmup):
    """Forward + input and kernel gradients of every 3x3(x3) convolution of SAU-Net (f = 32)
    by the CPU formulation (in bfloat16: `conv_bf16`, float32 operands and results, as in
    the network), one layer at a time: the share of the step they take; and, when torch is
    importable, PyTorch's time for the same layers (`torch_convs.py`, in a child process as
    the peer; in bfloat16 under autocast), per layer."""
    if dtype == "bfloat16":
        conv = convolutions.conv_bf16
    else:
        conv = convolutions.conv2d if len(spatial) == 2 else convolutions.conv3d_folded
    pads = ((1, 1),) * len(spatial)
    rng = np.random.default_rng(0)
    layers = conv_layers(spatial, batch, 3 if len(spatial) == 2 else 1)
    secs = []
    for shape, kshape in layers:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        k = jnp.asarray(rng.normal(size=kshape) * 0.1, jnp.float32)
        grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k, pads) ** 2), (0, 1)))
        secs.append(timed(lambda: grad(x, k), (), steps, warmup))
    rec = {"name": f"convs_{name}", **device_info(), "dtype": dtype,
           "bf16_units": native.bf16_units() if dtype == "bfloat16" else None,
           "spatial": list(spatial), "batch": batch, "layers_s": round(sum(secs), 4),
           "layer_s": [round(t, 5) for t in secs]}
    if importlib.util.find_spec("torch") is not None:
        args = [sys.executable, os.path.join(ROOT, "benchmarks", "torch_convs.py"),
                json.dumps(layers), "--steps", str(steps), "--warmup", str(warmup)]
        run = subprocess.run(args + (["--amp"] if dtype == "bfloat16" else []),
                             capture_output=True, text=True)
        if run.returncode == 0:
            peer = json.loads(run.stdout.strip().splitlines()[-1])
            rec.update(torch=peer["torch"], torch_threads=peer["threads"],
                       torch_layers_s=round(sum(peer["layer_s"]), 4),
                       torch_layer_s=peer["layer_s"],
                       ratio_jax_over_torch=round(sum(peer["layer_s"]) / sum(secs), 3))
        else:
            rec["torch_skipped"] = run.stderr.strip()[-500:]
    emit(rec)


def bench_infer(name, spatial, batch, steps, warmup, impl):
    ch = 3 if len(spatial) == 2 else 1
    model = models.SAUNet(32, impl=convolutions.resolve_impl(impl))
    params = models.init_params(model, jax.random.key(0), (1, *spatial, ch))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *spatial, ch)), jnp.float32)
    fn = convolutions.jit(lambda p, x: model.apply({"params": p}, x))
    t0 = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    xla_model = models.SAUNet(32, impl="xla")
    flops = flops_of(jax.jit(lambda p, x: xla_model.apply({"params": p}, x)).lower(params, x))
    dt = timed(compiled, (params, x), steps, warmup)
    emit({"name": f"infer_{name}", **device_info(), "impl": model.impl, "spatial": list(spatial), "batch": batch,
          "compile_s": round(compile_s, 2), "step_s": round(dt, 4),
          "images_per_s": round(batch / dt, 3), "flops_per_s": flops / dt})


def scipy_idk(shape, dots, spacing):
    seeds = np.ones(shape, bool)
    seeds[tuple(dots.astype(int).T)] = False
    d = ndimage.distance_transform_edt(seeds, sampling=spacing)
    return 1.0 / (d ** (0.02 * d + 0.75) + 1.0)


def bench_targets(shape, n, spacing, steps):
    rng = np.random.default_rng(0)
    dots = np.stack([rng.integers(0, s, n) for s in shape], 1).astype(np.float32)
    fn = lambda: targets.inverse_distance(dots, n, shape, spacing)
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    dt_jax = timed(fn, (), steps, 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        ref = scipy_idk(shape, dots, spacing)
    dt_scipy = (time.perf_counter() - t0) / steps
    err = float(np.abs(np.asarray(fn()) - ref).max())
    emit({"name": f"targets_{len(shape)}d", **device_info(), "shape": list(shape), "dots": n,
          "spacing": list(spacing), "compile_s": round(compile_s, 2),
          "jax_s": round(dt_jax, 5), "scipy_s": round(dt_scipy, 5),
          "speedup_vs_scipy": round(dt_scipy / dt_jax, 3), "max_abs_err": err})


def bench_post(steps):
    rng = np.random.default_rng(0)
    dots = rng.uniform(0, 255, (176, 2)).astype(np.float32)
    density = 100 * np.asarray(targets.inverse_distance(dots, 176, (256, 256)))
    density += rng.uniform(0, 5, density.shape)

    def run():
        det = postprocess.detect(density, 50.0)
        return metrics.match(det, dots, 5.0)

    run()
    t0 = time.perf_counter()
    for _ in range(steps):
        r = run()
    emit({"name": "postprocess_match_256", "dots": 176, "tp_fp_fn": list(r),
          "step_s": round((time.perf_counter() - t0) / steps, 5)})


def bench_records(blocks, block_steps):
    """Cost of the run records and of the non-finite guard on the quickstart's train step
    (f = 16, 64x64 crops, 4 labeled + 4 unlabeled, pmap on one device, as the loop runs it):
    `blocks` adjacent pairs of `block_steps` steps without and with them, the mean and standard
    error of their time ratio; then the time of writing one metrics line + TensorBoard scalars,
    and of the final plot."""
    import tempfile
    from cellcount_jax import records

    c = quickstart.get_config()
    model = train.create_model(c)
    tx, lr = optim.create_optimizer(c.optim, c.train.steps)
    crop, n = tuple(c.train.crop), c.train.batch
    state = train.create_train_state(c, model, tx, jax.random.key(0), (1, *crop, 3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(n, *crop, 3)).astype(np.float32),
             "target": rng.uniform(size=(n, *crop)).astype(np.float32),
             "unlabeled": rng.normal(size=(c.train.unlabeled_batch, *crop, 3)).astype(np.float32)}
    par = train.Parallel(train.make_train_step(c, model, tx, lr), "pmap", jax.devices()[:1])
    dstate = par.put_state(state)
    key = jax.random.key(1)
    workdir = tempfile.mkdtemp()
    recs = records.Records(workdir)
    write_s = []

    def block(guarded, dstate):
        previous = None
        t0 = time.perf_counter()
        for i in range(block_steps):
            dstate, m = par(dstate, batch, key)
            if guarded and previous is not None:
                train._check_finite(i, previous, 0)
            previous = m
            if (i + 1) % c.train.log_every == 0 or i + 1 == block_steps:
                scalars = {k: float(v) for k, v in jax.device_get(m).items() if k != "finite"}
                if guarded:
                    t1 = time.perf_counter()
                    recs.write(i + 1, scalars)
                    write_s.append(time.perf_counter() - t1)
        jax.block_until_ready(dstate)
        return dstate, (time.perf_counter() - t0) / block_steps

    dstate, _ = block(False, dstate)  # compile and warm up
    # Adjacent pairs (order alternating) cancel the machine's drift; the ratio of each pair
    # is one sample of the overhead.
    times = {False: [], True: []}
    for b in range(blocks):
        for guarded in ((False, True) if b % 2 == 0 else (True, False)):
            dstate, dt = block(guarded, dstate)
            times[guarded].append(dt)
    recs.close()
    t0 = time.perf_counter()
    records.plot(workdir)
    plot_s = time.perf_counter() - t0
    ratios = np.asarray(times[True]) / np.asarray(times[False]) - 1
    plain = float(np.mean(times[False]))
    overhead = float(ratios.mean())
    steps = c.train.steps
    emit({"name": "records_and_guard_quickstart", **device_info(), "pairs": blocks,
          "block_steps": block_steps, "plain_step_s": round(plain, 5),
          "guarded_step_s": round(float(np.mean(times[True])), 5),
          "step_overhead": round(overhead, 4),
          "step_overhead_stderr": round(float(ratios.std(ddof=1) / np.sqrt(len(ratios))), 4),
          "record_write_ms": round(1e3 * float(np.mean(write_s)), 3), "plot_s": round(plot_s, 3),
          "quickstart_overhead_s": round(steps * plain * overhead + plot_s
                                         + steps / c.train.log_every * float(np.mean(write_s)), 2),
          "quickstart_training_s": round(steps * plain, 1)})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="train,torch,infer,targets,post,records",
                   help="comma-separated subset of train,torch,convs,infer,targets,post,records")
    p.add_argument("--cases", default="", help="comma-separated train case names to run")
    p.add_argument("--quick", action="store_true", help="small cases only, fewer steps")
    p.add_argument("--impls", default="auto",
                   help="comma-separated model impls to time (auto, xla, cpu), e.g. xla,cpu")
    p.add_argument("--modes", default="ssl,supervised",
                   help="comma-separated train steps to time (ssl, supervised); the peer's "
                        "ratio is against the supervised step")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated compute dtypes of the train steps (float32, bfloat16); "
                        "the peer runs with --amp for bfloat16")
    a = p.parse_args()
    impls = a.impls.split(",")
    only = set(a.only.split(","))
    modes = set(a.modes.split(","))
    steps, warmup = (2, 1) if a.quick else (5, 2)
    peak = matmul_peak()
    cases = [c for c in TRAIN_CASES if not a.cases or c[0] in a.cases.split(",")]
    if a.quick:
        cases = [c for c in cases if c[0] in ("2d_128", "3d_32x64x64")]
    for name, spatial, batch in cases:
        big = np.prod(spatial) * batch > 300_000
        # 3 warm-up steps: XLA runs step k + 1 before step k's temporaries are freed, so the
        # block cache maps a second block for them within the first few steps.
        s, w = (2, 1) if big else (5, 3)
        for dtype in a.dtypes.split(","):
            rec = None
            for impl in impls if "train" in only else ():
                if "ssl" in modes:
                    bench_train(name, spatial, batch, True, s, w, peak, impl, dtype=dtype)
                if "supervised" in modes:
                    rec = bench_train(name, spatial, batch, False, s, w, peak, impl, dtype=dtype)
            if "torch" in only and name in ("2d_128", "3d_32x64x64"):
                # ratio against the last impl timed
                bench_torch(spatial, batch, s, w, rec, amp=dtype == "bfloat16")
            if "convs" in only:
                bench_convs(name, spatial, batch, dtype, s, w)
    if "infer" in only:
        for name, spatial, batch in INFER_CASES[: 1 if a.quick else None]:
            for impl in impls:
                bench_infer(name, spatial, batch, 2 if a.quick else steps, 1, impl)
    if "targets" in only:
        bench_targets((256, 256), 176, (1.0, 1.0), 20)
        bench_targets((56, 200, 200), 900, (1.0, 1.0, 1.0), 3 if a.quick else 5)
    if "post" in only:
        bench_post(10)
    if "records" in only:
        bench_records(4, 20) if a.quick else bench_records(30, 20)


if __name__ == "__main__":
    main()
