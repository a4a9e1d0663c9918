"""The train step (supervised + focal consistency), its multi-device wrapper, and the loop.

The state is a plain dict `{'step', 'params', 'opt'[, 'teacher']}`. `make_train_step` builds
one per-device pure function `step(state, batch, rng) -> (state, metrics)`; `Parallel`
runs that same body with `jax.pmap` or `jax.shard_map` over all the job's devices (several
processes: `distributed`), with gradients averaged by `lax.pmean` over the device axis.
`train_and_evaluate` is the loop: it writes the model folder (`model_folder`), the run records
(`records`), stops at the first non-finite step and saves and returns on SIGTERM, then
calibrates the detector and scores the held-out images.
"""
import os
import sys
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cellcount_jax import (checkpoints, convolutions, data, distributed, evaluation, losses,
                           model_folder, models, native, optim, perturb, records)
from cellcount_jax import predictor as predictor_lib
from cellcount_jax.errors import InputError

AXIS = "batch"


def compute_dtype(config) -> str:
    """config.model.dtype resolved: 'float32' or 'bfloat16'. 'auto' is bfloat16 for 2D
    models where the CPU formulation runs on a CPU with bf16 units (`native.bf16_units`),
    else float32: 3D models trained in bfloat16 lost F1 on the synthetic 3D recipe (README,
    Performance), 2D ones did not."""
    name = config.model.dtype
    if name not in ("float32", "bfloat16", "auto"):
        raise InputError(f"config.model.dtype must be 'float32', 'bfloat16' or 'auto', "
                         f"got {name!r}")
    if name == "auto":
        cpu = convolutions.resolve_impl(config.model.get("impl", "auto")) == "cpu"
        two_d = config.data.get("ndim", 2) == 2
        name = "bfloat16" if two_d and cpu and native.bf16_available() else "float32"
    return name


def create_model(config):
    """SAU-Net of config.model; `model.dtype` 'bfloat16' computes in bfloat16 with float32
    parameters, optimizer state, norms and loss (on the 'cpu' formulation only the 3x3(x3)
    convolutions, on the CPU's bf16 units where it has some; `models.SAUNet`); `compute_dtype`
    resolves 'auto'. `model.impl` ('auto' | 'xla' | 'cpu') picks the convolution formulation,
    resolved here for the current backend."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[compute_dtype(config)]
    return models.SAUNet(features=config.model.features, dropout=config.model.dropout,
                         dtype=dtype,
                         impl=convolutions.resolve_impl(config.model.get("impl", "auto")))


def create_train_state(config, model, tx, rng, input_shape):
    """Fresh state for inputs of `input_shape` (batch, *spatial, channels)."""
    params = models.init_params(model, rng, input_shape)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}
    if config.ssl.ema_decay > 0:
        state["teacher"] = params
    return state


def make_train_step(config, model, tx, lr_fn, axis_name=AXIS):
    """Per-device step `(state, batch, rng) -> (state, metrics)`, to run under an `axis_name`.

    batch: {'image': (B, *spatial, C), 'target': (B, *spatial)[, 'mask': (B, *spatial),
    'unlabeled': (U, *spatial, C)]}; 'mask' limits the supervised loss (`losses`).
    Without 'unlabeled' the step is supervised only (w = 0, no teacher pass). The teacher is
    the current parameters under `stop_gradient` (or their EMA when `ssl.ema_decay` > 0),
    deterministic and without noise. The student sees [labeled; unlabeled] in one forward pass
    with attention dropout on and feature noise on the unlabeled rows (and, where the config
    asks, their intensities perturbed, `ssl.student_intensity`, and their features' channels
    dropped, `ssl.feature_dropout`).
    rng: a key shared by all devices; per step it is `fold_in(rng, step)`, so a resumed run
    draws the same numbers.
    """
    supervised = losses.get(config.loss.supervised, "supervised")
    takes_mask = losses.takes_mask(supervised)
    consistency = losses.get(config.loss.consistency, "consistency")
    consistency_options = dict(config.loss.consistency_options)
    supervised_options = dict(config.loss.get("supervised_options", {}))
    ssl = config.ssl

    def step(state, batch, rng):
        params = state["params"]
        rng = jax.random.fold_in(rng, state["step"])
        noise_rng, dropout_rng = jax.random.split(rng)
        # Dropout masks differ per device; the feature noise is shared (one u per step).
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
        x, y = batch["image"], batch["target"]
        n_labeled = x.shape[0]
        use_ssl = "unlabeled" in batch
        metrics = {}
        if use_ssl:
            teacher_params = jax.lax.stop_gradient(state.get("teacher", params))
            teacher = jax.lax.stop_gradient(
                model.apply({"params": teacher_params}, batch["unlabeled"], train=False))
            w = ssl.get("weight", 1.0) * optim.consistency_weight(state["step"], ssl.ramp_steps,
                                                                  ssl.ramp_shape)
            x = jnp.concatenate([x, batch["unlabeled"]], axis=0)
            # the student's own view of the unlabeled crops (per-device draws, as dropout's)
            x = perturb.intensity(jax.random.fold_in(dropout_rng, 2), x, n_labeled,
                                  ssl.get("student_intensity", 0.0))
        else:
            w = jnp.zeros((), jnp.float32)

        def loss_fn(params):
            feats = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_rng},
                                method=models.SAUNet.encode)
            if use_ssl:
                feats = perturb.feature_noise(noise_rng, feats, n_labeled, ssl.noise_rate,
                                              ssl.noise_at)
                feats = perturb.feature_dropout(
                    jax.random.fold_in(dropout_rng, 1), feats, n_labeled,
                    ssl.get("feature_dropout", 0.0), ssl.noise_at)
            out = model.apply({"params": params}, feats, method=models.SAUNet.decode)
            if "mask" in batch:
                if not takes_mask:
                    raise InputError(f"the supervised loss {config.loss.supervised!r} takes no "
                                     f"mask= argument, which regions of interest and "
                                     f"config.data.holdout need (see cellcount_jax.losses)")
                sup = supervised(out[:n_labeled], y, mask=batch["mask"], axis_name=axis_name,
                                 **supervised_options)
            elif takes_mask:
                sup = supervised(out[:n_labeled], y, axis_name=axis_name, **supervised_options)
            else:
                sup = supervised(out[:n_labeled], y, **supervised_options)
            terms = {"supervised": sup}
            loss = sup
            if use_ssl:
                cons = consistency(out[n_labeled:], teacher, axis_name=axis_name,
                                   **consistency_options)
                terms["consistency"] = cons
                loss = loss + w * cons
            return loss, terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, axis_name)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt": opt}
        if "teacher" in state:
            d = ssl.ema_decay
            new_state["teacher"] = jax.tree.map(lambda t, p: d * t + (1 - d) * p,
                                                state["teacher"], new_params)
        metrics.update(terms)
        metrics["loss"] = loss
        metrics = jax.lax.pmean(metrics, axis_name)
        metrics.update(w=w, lr=lr_fn(state["step"]), grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(new_params),
                       update_norm=optax.tree.norm(updates))
        # The loop stops at the first step where this is false and never saves its state.
        metrics["finite"] = jnp.all(jnp.stack([jnp.isfinite(v) for k, v in metrics.items()
                                               if k != "lr"]))
        return new_state, metrics

    return step


def _global(local, sharding):
    """The global array of which `local` is this process's part under `sharding`."""
    if isinstance(local, jax.Array) and not local.is_fully_addressable:
        return local
    if jax.dtypes.issubdtype(local.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_global(jax.random.key_data(local), sharding),
                                        impl=jax.random.key_impl(local))
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


class Parallel:
    """The step on all `devices` (default: every device of the job, over all its processes),
    with `jax.pmap` or `jax.shard_map` ('pmap' | 'shard_map').

    `put_state` / `get_state` move a host state to the devices and back (every process holds
    the same host state); `put_batch` takes this process's rows of the global batch (leading
    axis divisible by its local device count) and makes the global batch of the step from the
    rows of all processes. The step is compiled with the model's compiler options for the
    devices' platform (`convolutions.compiler_options`).
    """

    def __init__(self, step, mode: str = "pmap", devices=None):
        self.devices = list(devices or jax.devices())
        self.local = [d for d in self.devices if d.process_index == jax.process_index()]
        self.mode = mode
        self.options = convolutions.compiler_options(self.devices[0].platform)
        self.compiled = None
        if mode == "pmap":
            self.pmapped = jax.pmap(step, AXIS, in_axes=(0, 0, None), devices=self.devices,
                                    donate_argnums=(0,))
            self.fn = self.run_pmap
        elif mode == "shard_map":
            self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
            # check_vma=False keeps per-device gradients of the replicated parameters local
            # (as under pmap), so the body's own pmean is the only reduction.
            body = jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(AXIS), P()),
                                 out_specs=(P(), P()), check_vma=False)
            self.fn = jax.jit(body, donate_argnums=(0,), compiler_options=self.options)
        else:
            raise InputError(f"config.train.parallel must be 'pmap' or 'shard_map', got {mode!r}")
        self.n = len(self.local)

    def run_pmap(self, *args):
        # pmap takes no compiler options itself: compile once (shapes are static) with them.
        if self.options is None:
            return self.pmapped(*args)
        if self.compiled is None:
            self.compiled = self.pmapped.lower(*args).compile(compiler_options=self.options)
        if jax.process_count() > 1:  # the compiled step takes global arrays only
            args = jax.tree.map(_global, args, self.compiled.input_shardings[0])
        return self.compiled(*args)

    def put_state(self, state):
        # Copies from host memory: the step donates its input state, the caller keeps theirs.
        state = jax.device_get(state)
        if self.mode == "pmap":
            # pmap shards the leading axis across this process's devices at the first call.
            return jax.tree.map(lambda a: np.stack([np.asarray(a)] * self.n), state)
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def _local(self, tree):
        """This process's copy of a replicated tree (pmap: the first device's row); the tree is
        still the host copy from `put_state` when no step has run."""
        def first(a):
            if isinstance(a, jax.Array):
                a = a.addressable_data(0)
            return a[0] if self.mode == "pmap" else a
        return jax.tree.map(first, tree)

    def get_state(self, state):
        return jax.device_get(self._local(state))

    def put_batch(self, batch):
        for k, v in batch.items():
            if v.shape[0] % self.n:
                raise InputError(f"batch '{k}' of {v.shape[0]} rows in this process does not "
                                 f"split over its {self.n} devices")
        if self.mode == "pmap":
            return {k: v.reshape((self.n, -1) + v.shape[1:]) for k, v in batch.items()}
        sharding = NamedSharding(self.mesh, P(AXIS))
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def __call__(self, state, batch, rng):
        state, metrics = self.fn(state, self.put_batch(batch), rng)
        return state, self._local(metrics)


def log(message: str):
    """A timestamped progress line, printed by process 0 only."""
    if distributed.is_lead():
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def batch_rng(seed: int, step: int):
    """Host RNG of one step's batch: the same batch for the same (seed, step), resumed or not."""
    return np.random.default_rng([seed, step])


class Diverged(InputError):
    """Training produced a non-finite loss, gradient or parameter."""


def _check_finite(step: int, metrics, saved_step: int):
    """Raises `Diverged` naming the step and the non-finite terms unless metrics['finite']."""
    if bool(metrics["finite"]):
        return
    m = jax.device_get(metrics)
    bad = [k for k, v in m.items() if k != "finite" and not np.isfinite(v)]
    kept = (f"the latest checkpoint is step {saved_step}" if saved_step
            else "no checkpoint was written")
    raise Diverged(f"training diverged at step {step}: non-finite {', '.join(bad)}. Nothing "
                   f"of this step was saved; {kept}. Lower config.optim.lr or check the inputs "
                   f"and targets")


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _mass_per_dot(train_set) -> float:
    return (sum(float(t.sum()) for t in train_set.targets)
            / max(sum(len(d) for d in train_set.dots), 1))


def train(config, workdir: str, allow_config_change: bool = False):
    """Trains on config.data into the model folder `workdir` (resuming from its newest readable
    checkpoint). Returns (predictor of the final parameters, uncalibrated; the data splits).

    In a job of several processes (`distributed`) every process runs this with the same
    arguments and `workdir` on a file system they share; each makes its rows of the global
    batch, all save the checkpoints together, and process 0 alone prints and writes the model
    folder and the records. On SIGTERM (any process) or a TPU maintenance event, every
    process saves the state of the same step and returns early: `predictor.step` is then
    below config.train.steps without a 'selected' step in its record, and the same call
    resumes."""
    lead = distributed.is_lead()
    t_start = time.perf_counter()
    minutes = float(config.train.get("minutes", 0) or 0)
    fitted = _previous_fit(workdir, minutes) if minutes else None
    if fitted:  # resuming a run fitted to its minutes: the same schedule
        config.train.steps, config.optim.sgdr_period, config.ssl.ramp_steps = fitted
    model_folder.prepare_workdir(workdir, config, allow_config_change, write=lead)
    log("loading data")
    splits = data.load(config, distributed.part())
    log(splits.summary)
    train_set = splits.train
    crop = _fit_crop(config, train_set)
    if crop != tuple(config.train.crop):
        log(f"the images are smaller than the training crop {tuple(config.train.crop)}: crops "
            f"of {crop}")
        config.train.crop = crop
        if lead:
            model_folder.write_json(os.path.join(workdir, model_folder.CONFIG),
                                    model_folder.config_to_dict(config))
    model = create_model(config)
    steps = config.train.steps
    tx, lr_fn = optim.create_optimizer(config.optim, steps)
    crop = tuple(config.train.crop)
    channels = train_set.images[0].shape[-1]
    rng = jax.random.key(config.seed)
    state = create_train_state(config, model, tx, jax.random.fold_in(rng, 0),
                               (1,) + crop + (channels,))
    dtype = compute_dtype(config)
    units = native.bf16_units() if dtype == "bfloat16" and model.impl == "cpu" else None
    log(f"SAU-Net {len(crop)}D, {models.count_params(state['params']):,} parameters, {dtype}"
        + (f" on the CPU's {units} units" if units else "") + ", "
        f"{steps} steps of {config.train.batch} labeled"
        + (f" + {config.train.unlabeled_batch} unlabeled"
           if config.ssl.enabled and train_set.unlabeled else "")
        + f" {'x'.join(map(str, crop))} crops, workdir {workdir}")
    record = model_folder.new_record(config, splits, _mass_per_dot(train_set))
    if lead:
        model_folder.write_record(workdir, record)

    manager = checkpoints.manager(workdir, config.train.checkpoint_every)
    state = checkpoints.restore_latest(manager, state, workdir)
    start = saved = int(state["step"])
    if start:
        log(f"resumed from step {start}")
    recs = records.Records(workdir, start, enabled=lead)
    predictor = predictor_lib.Predictor(predictor_lib.create_model(record), state["params"],
                                       record, start)
    every = int(config.eval.get("every", 0) or 0)
    best = _Best(workdir, every, record)

    unlabeled_batch = config.train.unlabeled_batch if config.ssl.enabled else 0
    if unlabeled_batch and not train_set.unlabeled:
        log("no unlabeled images: training without the self-supervised term")
        unlabeled_batch = 0
    per_step = config.train.batch + unlabeled_batch
    par = Parallel(make_train_step(config, model, tx, lr_fn), config.train.parallel)
    if minutes and not fitted and start == 0:
        rate, compile_s = _probe(par, state, lambda k: train_set.sample(
            batch_rng(config.seed, k), crop, config.train.batch, unlabeled_batch,
            distributed.part()), jax.random.fold_in(rng, 1))
        left = 60 * minutes - (time.perf_counter() - t_start) - compile_s
        fit_schedule(config, int(left * rate * 0.95))  # 5 %: the rate drifts as it runs
        steps = config.train.steps
        log(f"{rate:.3g} steps/s: {steps} steps fit in the {minutes:g} minutes "
            f"({_duration(left)} left after loading and compiling)")
        if lead:
            model_folder.write_json(os.path.join(workdir, model_folder.CONFIG),
                                    model_folder.config_to_dict(config))
        tx, lr_fn = optim.create_optimizer(config.optim, steps)
        par = Parallel(make_train_step(config, model, tx, lr_fn), config.train.parallel)
    if jax.process_count() > 1:
        log(f"{jax.process_count()} processes, {jax.device_count()} devices "
            f"({len(par.local)} in each process); each process makes its rows of the batch")
    part = distributed.part()
    preemption = distributed.Preemption()
    stopped = None
    dstate = par.put_state(state)
    step_key = jax.random.fold_in(rng, 1)
    bar = None
    say = (lambda s: print(s, flush=True)) if lead else (lambda s: None)  # noqa: E731
    t0 = time.perf_counter()
    t_log, done_log = t0, start
    previous = None
    if start < steps:
        log("compiling the train step")
    for step in range(start, steps):
        batch = train_set.sample(batch_rng(config.seed, step), crop, config.train.batch,
                                 unlabeled_batch, part)
        dstate, metrics = par(dstate, batch, step_key)
        done = step + 1
        if previous is not None:  # the previous step, checked while this one runs
            _check_finite(*previous, saved)
        previous = (done, metrics)
        if step == start:
            jax.block_until_ready(metrics)
            t_log, done_log = time.perf_counter(), done
            log(f"compiled and ran the first step in {t_log - t0:.1f} s; training")
            if lead and sys.stdout.isatty():  # a progress bar on a terminal, lines elsewhere
                from tqdm import tqdm
                bar = tqdm(total=steps, initial=step, unit="step", dynamic_ncols=True)
                say = bar.write
        if bar:
            bar.update(1)
        scalars = {}
        if done % config.train.log_every == 0 or done == steps:
            m = jax.device_get(metrics)
            _check_finite(done, m, saved)
            now = time.perf_counter()
            scalars = {k: float(v) for k, v in m.items() if k != "finite"}
            if done > done_log:
                rate = (done - done_log) / (now - t_log)
                scalars.update(steps_per_s=rate, images_per_s=rate * per_step)
            t_log, done_log = now, done
        if every and (done % every == 0 or done == steps):
            _check_finite(done, metrics, saved)
            t_eval = time.perf_counter()
            predictor.params, predictor.step = par.get_state(dstate)["params"], done
            scalars.update(_periodic_eval(config, predictor, splits))
            best.offer(done, scalars["calibration_f1"], predictor.params)
            t_log += time.perf_counter() - t_eval  # the step rate leaves evaluation out
        if scalars:
            recs.write(done, scalars)
            line = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            if "steps_per_s" in scalars:
                line += f" eta={_duration((steps - done) / scalars['steps_per_s'])}"
            say(f"[{time.strftime('%H:%M:%S')}] step {done}/{steps} {line}")
            if bar and "loss" in scalars:
                bar.set_postfix(loss=f"{scalars['loss']:.4g}")
        stop = preemption.reached(done)
        if done % config.train.checkpoint_every == 0 or done == steps or stop:
            _check_finite(done, metrics, saved)  # never save a non-finite state
            checkpoints.save(manager, done, par.get_state(dstate))  # every process takes part
            saved = done
        if stop:
            stopped = done
            break
    preemption.close()
    if previous is not None:
        _check_finite(*previous, saved)
    if bar:
        bar.close()
    manager.wait_until_finished()
    manager.close()
    recs.close()
    end = stopped or steps
    if stopped:
        log(f"asked to stop (SIGTERM or preemption): saved step {stopped} of {steps}; the "
            f"same command resumes from there")
    elif start < steps:
        log(f"trained {steps - start} steps in {_duration(time.perf_counter() - t0)}")
    predictor.params, predictor.step = par.get_state(dstate)["params"], end
    if not stopped:
        best.use(predictor)
        if lead:
            model_folder.write_record(workdir, record)
    if lead and records.plot(workdir):
        log(f"wrote {workdir}/{records.PLOT}, {records.METRICS} and TensorBoard records "
            f"({workdir}/{records.TENSORBOARD})")
    return predictor, splits


def _fit_crop(config, train_set):
    """config.train.crop, each axis cut to the smallest image the crops are drawn from
    (labeled, and unlabeled where they train), rounded down to a multiple of the network's
    2^(LEVELS-1)."""
    m = 2 ** (models.LEVELS - 1)
    images = train_set.images + (train_set.unlabeled if config.ssl.enabled else [])
    smallest = np.min([im.shape[:-1] for im in images if im is not None], axis=0)
    return tuple(int(c) if c <= s else max(m, int(s) // m * m)
                 for c, s in zip(config.train.crop, smallest))


def _previous_fit(workdir, minutes):
    """(steps, sgdr_period, ramp_steps) of a run in `workdir` fitted to the same `minutes`
    that has checkpoints to resume from, else None."""
    path = os.path.join(workdir, model_folder.CONFIG)
    ckpts = checkpoints.directory(workdir)
    if not (os.path.exists(path) and os.path.isdir(ckpts)
            and any(n.isdigit() for n in os.listdir(ckpts))):
        return None
    old = model_folder.read_config(workdir)
    if float(old.train.get("minutes", 0) or 0) != minutes:
        return None
    return int(old.train.steps), int(old.optim.sgdr_period), int(old.ssl.ramp_steps)


def _probe(par, state, sample, key, seconds: float = 15.0, max_steps: int = 100):
    """(steps/s, compile seconds) of the train step `par` with its input pipeline: compiles
    it, then times steps on a copy of `state` for about `seconds` (at least 5 steps, at most
    `max_steps`) and throws the copy away. In a job of several processes, the slowest rate
    (all then fit the same number of steps)."""
    t = time.perf_counter()
    probe_state, metrics = par(par.put_state(state), sample(0), key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    t, k = time.perf_counter(), 0
    while k < 5 or (k < max_steps and time.perf_counter() - t < seconds):
        probe_state, metrics = par(probe_state, sample(k + 1), key)
        k += 1
        if k % 5 == 0:
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    rate = k / (time.perf_counter() - t)
    return float(distributed.gather_exact(np.float64(rate)).min()), compile_s


def fit_schedule(config, steps: int):
    """Sets config.train.steps to `steps` (at least 1) with the schedule scaled to it: the
    SGDR periods (as many as fit from config.optim.sgdr_period, doubling, stretched so that
    the last one ends at the last step, which may drop a few steps) and the consistency ramp
    (the same fraction of the steps as before)."""
    steps = max(1, int(steps))
    o = config.optim
    if o.schedule == "sgdr":
        mult, k = int(o.sgdr_mult), 1
        total = lambda n: sum(mult ** i for i in range(n))  # noqa: E731
        while o.sgdr_period * total(k + 1) <= steps:
            k += 1
        o.sgdr_period = max(1, steps // total(k))
        steps = o.sgdr_period * total(k)
    config.ssl.ramp_steps = max(1, round(config.ssl.ramp_steps * steps / config.train.steps))
    config.train.steps = steps


def _periodic_eval(config, predictor, splits):
    """The current parameters calibrated on the calibration images (`calibration_f1`: the F1
    of the chosen detector there) and, where there are test images, their held-out F1 and
    MAE (records only: the test images never choose anything). Without test-time
    augmentation: it ranks the steps at a sixteenth of the cost of the 3D flips; the final
    calibration uses them."""
    tta = predictor.record.get("test_time_augmentation", False)
    predictor.record["test_time_augmentation"] = False
    try:
        with warnings.catch_warnings():  # an early, still flat map is expected here
            warnings.simplefilter("ignore")
            out = {"calibration_f1": evaluation.calibrate_record(config, predictor, splits)}
        if splits.test is not None:
            s = evaluation.evaluate(config, predictor, splits, baseline=False,
                                    verbose=False)["model"]
            out.update(eval_f1=s["f1"], eval_mae=s["mae"], eval_precision=s["precision"],
                       eval_recall=s["recall"])
    finally:
        predictor.record["test_time_augmentation"] = tta
        predictor.record["detector"] = None
    return out


class _Best:
    """The step whose parameters calibrate best (`calibration_f1` of `_periodic_eval`: on the
    held-out bands of the labeled images where `data.holdout` is set, else on the labeled
    images themselves), kept in the model folder's `checkpoints.BEST` with its score, so that
    a resumed run goes on comparing with it. Ties go to the later step. `use` puts the best
    parameters into the predictor and records {'step', 'calibration_f1', 'every'} as the
    record's 'selected' (prediction then loads them: `model_folder.load_model`)."""

    def __init__(self, workdir, every, record):
        self.workdir, self.every, self.record = workdir, every, record
        self.step, self.score = None, -1.0
        if every:
            step, tree = checkpoints.restore_tree(workdir, checkpoints.BEST)
            if step is not None:
                self.step, self.score = step, float(tree["score"])

    def offer(self, step, score, params):
        if score < self.score:
            return
        self.step, self.score = step, score
        mngr = checkpoints.manager(self.workdir, max_to_keep=1, name=checkpoints.BEST)
        checkpoints.save(mngr, step, {"params": params, "score": np.float32(score)})
        mngr.wait_until_finished()
        mngr.close()

    def use(self, predictor):
        if self.step is None:
            self.record.pop("selected", None)
            return
        if self.step != predictor.step:
            _, params = checkpoints.restore_params(self.workdir, checkpoints.BEST)
            predictor.params, predictor.step = jax.device_put(params), self.step
        self.record["selected"] = {"step": int(self.step), "calibration_f1": self.score,
                                   "every": self.every}
        log(f"the parameters of step {self.step} calibrated best (F1 {100 * self.score:.2f} % "
            f"on the calibration images): the model folder predicts with them")


def calibrate_and_evaluate(config, predictor, splits, workdir: str):
    """Chooses the detector and threshold on the labeled images, stores them in the model
    folder and scores the held-out split (if any). Returns the summary (or None)."""
    n = len(splits.train.images)
    where = "held-out bands of the" if splits.held_out else "the"
    log(f"calibrating the detector and threshold on {where} {n} labeled training images")
    evaluation.calibrate_record(config, predictor, splits)
    d = predictor.record["detector"]
    lead = distributed.is_lead()
    if lead:
        model_folder.write_record(workdir, predictor.record)
    between = f", peaks at least {d['min_distance']:.3g} apart" if d["min_distance"] else ""
    if d.get("split"):
        between += f", split where a detection holds {d['split']:g}x a typical one's mass"
    zoom = f", input zoom {predictor.zoom:g}" if len(evaluation.zooms(config)) > 1 else ""
    log(f"detector {d['name']}, threshold {d['threshold']:.4g}{between}{zoom}, saved in "
        f"{workdir}/{model_folder.RECORD}")
    if splits.test is None:
        log("no test images: no held-out scores")
        return None
    log(f"scoring the {len(splits.test.images)} held-out images")
    return evaluation.evaluate(config, predictor, splits, workdir if lead else None)


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False):
    """Trains into the model folder `workdir`, calibrates, evaluates; returns the summary
    (None when the run was stopped early by SIGTERM or a preemption, to be resumed)."""
    predictor, splits = train(config, workdir, allow_config_change)
    # Stopped early: below the last step without a best step chosen (a finished run with
    # `eval.every` may predict with an earlier step, recorded as 'selected').
    if predictor.step < config.train.steps and "selected" not in predictor.record:
        return None
    return calibrate_and_evaluate(config, predictor, splits, workdir)


def _data_paths(config):
    """The files and folders config.data reads (as written, for its source)."""
    d = config.data
    keys = {"vgg": ("path",), "folder": ("images", "annotations", "test_images",
                                         "test_annotations", "roi", "test_roi")}
    return [d[k] for k in keys.get(d.get("source"), ()) if d.get(k)]


def evaluate_workdir(workdir: str, tta: Optional[bool] = None, zooms=None):
    """Recalibrates and scores the newest checkpoint of a model folder on the data of its own
    `config.json` (no config argument); `tta` True/False turns test-time augmentation on/off
    in the folder's record (None: as it is); `zooms` replaces the config's `predict.zooms`
    (the input zooms calibration chooses from; kept in the folder's config.json)."""
    config = model_folder.read_config(workdir)
    missing = [p for p in _data_paths(config) if not os.path.isabs(p) and not os.path.exists(p)]
    if missing:
        raise InputError(
            f"{os.path.join(workdir, model_folder.CONFIG)} names its data relative to the "
            f"directory training ran from ({', '.join(missing)}), not found from {os.getcwd()}: "
            "run `cellcount evaluate` from that directory")
    if zooms:
        if "predict" not in config:
            config.predict = {}
        config.predict.zooms = tuple(float(z) for z in zooms)
        evaluation.zooms(config)
        if distributed.is_lead():
            model_folder.write_json(os.path.join(workdir, model_folder.CONFIG),
                                    model_folder.config_to_dict(config))
    log("loading data")
    splits = data.load(config, distributed.part())
    log(splits.summary)
    predictor = model_folder.load_model(workdir)
    log(f"model of step {predictor.step}")
    if tta is not None:
        predictor.record["test_time_augmentation"] = bool(tta)
    if predictor.tta:
        log(f"test-time augmentation: the mean of {len(predictor.augmentations())} flips")
    return calibrate_and_evaluate(config, predictor, splits, workdir)
