"""The train step (supervised + focal consistency), its multi-device wrappers, and the loop.

The state is a plain dict `{'step', 'params', 'opt'[, 'teacher']}`. `make_train_step` builds
one per-device pure function `step(state, batch, rng) -> (state, metrics)`; `parallelize`
wraps that same body with `jax.pmap` or `jax.shard_map` over the local devices, with
gradients averaged by `lax.pmean` over the device axis.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cellcount_jax import checkpoints, data, evaluation, losses, models, optim, perturb

AXIS = "batch"


def create_model(config):
    """SAU-Net of config.model; `model.dtype` 'bfloat16' computes in bfloat16 (accelerators),
    with float32 parameters and optimizer state; `model.impl` ('auto' | 'xla' | 'cpu') picks
    the convolution formulation, resolved here for the current backend."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.model.dtype not in dtypes:
        raise ValueError(f"config.model.dtype must be one of {sorted(dtypes)}, "
                         f"got {config.model.dtype!r}")
    return models.SAUNet(features=config.model.features, dropout=config.model.dropout,
                         dtype=dtypes[config.model.dtype],
                         impl=models.resolve_impl(config.model.get("impl", "auto")))


def create_train_state(config, model, tx, rng, input_shape):
    """Fresh state for inputs of `input_shape` (batch, *spatial, channels)."""
    params = models.init_params(model, rng, input_shape)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}
    if config.ssl.ema_decay > 0:
        state["teacher"] = params
    return state


def make_train_step(config, model, tx, lr_fn, axis_name=AXIS):
    """Per-device step `(state, batch, rng) -> (state, metrics)`, to run under an `axis_name`.

    batch: {'image': (B, *spatial, C), 'target': (B, *spatial)[, 'unlabeled': (U, *spatial, C)]}.
    Without 'unlabeled' the step is supervised only (w = 0, no teacher pass). The teacher is
    the current parameters under `stop_gradient` (or their EMA when `ssl.ema_decay` > 0),
    deterministic and without noise. The student sees [labeled; unlabeled] in one forward pass
    with attention dropout on and feature noise on the unlabeled rows.
    rng: a key shared by all devices; per step it is `fold_in(rng, step)`, so a resumed run
    draws the same numbers.
    """
    supervised = losses.get(config.loss.supervised)
    consistency = losses.get(config.loss.consistency)
    consistency_options = dict(config.loss.consistency_options)
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
            w = optim.consistency_weight(state["step"], ssl.ramp_steps, ssl.ramp_shape)
            x = jnp.concatenate([x, batch["unlabeled"]], axis=0)
        else:
            w = jnp.zeros((), jnp.float32)

        def loss_fn(params):
            feats = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_rng},
                                method=models.SAUNet.encode)
            if use_ssl:
                feats = perturb.feature_noise(noise_rng, feats, n_labeled, ssl.noise_rate,
                                              ssl.noise_at)
            out = model.apply({"params": params}, feats, method=models.SAUNet.decode)
            sup = supervised(out[:n_labeled], y)
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
        return new_state, metrics

    return step


class Parallel:
    """The step on all `devices`, with `jax.pmap` or `jax.shard_map` ('pmap' | 'shard_map').

    `put_state` / `get_state` move a host state to the devices and back; `put_batch` splits a
    global batch (leading axis divisible by the device count) across them.
    compiler_options: XLA options for compiling the step (`models.compiler_options`).
    """

    def __init__(self, step, mode: str = "pmap", devices=None, compiler_options=None):
        self.devices = list(devices or jax.local_devices())
        self.mode = mode
        self.options = compiler_options
        self.compiled = None
        n = len(self.devices)
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
            self.fn = jax.jit(body, donate_argnums=(0,), compiler_options=compiler_options)
        else:
            raise ValueError(f"config.train.parallel must be 'pmap' or 'shard_map', got {mode!r}")
        self.n = n

    def run_pmap(self, *args):
        # pmap takes no compiler options itself: compile once (shapes are static) with them.
        if self.options is None:
            return self.pmapped(*args)
        if self.compiled is None:
            self.compiled = self.pmapped.lower(*args).compile(compiler_options=self.options)
        return self.compiled(*args)

    def put_state(self, state):
        # Copies from host memory: the step donates its input state, the caller keeps theirs.
        state = jax.device_get(state)
        if self.mode == "pmap":
            # pmap shards the leading axis across the devices at the first call.
            return jax.tree.map(lambda a: np.stack([np.asarray(a)] * self.n), state)
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def get_state(self, state):
        if self.mode == "pmap":
            state = jax.tree.map(lambda a: a[0], state)
        return jax.device_get(state)

    def put_batch(self, batch):
        for k, v in batch.items():
            if v.shape[0] % self.n:
                raise ValueError(f"batch '{k}' of size {v.shape[0]} does not split over "
                                 f"{self.n} devices")
        if self.mode == "pmap":
            return {k: v.reshape((self.n, -1) + v.shape[1:]) for k, v in batch.items()}
        return jax.device_put(batch, NamedSharding(self.mesh, P(AXIS)))

    def __call__(self, state, batch, rng):
        state, metrics = self.fn(state, self.put_batch(batch), rng)
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda a: a[0], metrics)
        return state, metrics


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def batch_rng(seed: int, step: int):
    """Host RNG of one step's batch: the same batch for the same (seed, step), resumed or not."""
    return np.random.default_rng([seed, step])


def train_and_evaluate(config, workdir: str):
    """Trains on config.data, checkpoints into `workdir`, evaluates; returns the eval summary."""
    splits = data.load(config)
    train_set = splits["train"]
    model = create_model(config)
    steps = config.train.steps
    tx, lr_fn = optim.create_optimizer(config.optim, steps)
    crop = tuple(config.train.crop)
    channels = train_set.images[0].shape[-1]
    rng = jax.random.key(config.seed)
    state = create_train_state(config, model, tx, jax.random.fold_in(rng, 0),
                               (1,) + crop + (channels,))
    log(f"SAU-Net {len(crop)}D, {models.count_params(state['params']):,} parameters")

    manager = checkpoints.manager(workdir, config.train.checkpoint_every)
    state = checkpoints.restore_latest(manager, state)
    start = int(state["step"])
    if start:
        log(f"resumed from step {start} in {workdir}")

    unlabeled_batch = config.train.unlabeled_batch if config.ssl.enabled else 0
    step_fn = make_train_step(config, model, tx, lr_fn)
    par = Parallel(step_fn, config.train.parallel,
                   compiler_options=models.compiler_options(model.impl))
    dstate = par.put_state(state)
    step_key = jax.random.fold_in(rng, 1)
    t0, t_log = time.perf_counter(), time.perf_counter()
    for step in range(start, steps):
        batch = train_set.sample(batch_rng(config.seed, step), crop, config.train.batch,
                                 unlabeled_batch)
        dstate, metrics = par(dstate, batch, step_key)
        done = step + 1
        if done % config.train.log_every == 0 or done == steps:
            m = jax.device_get(metrics)
            now = time.perf_counter()
            rate = (config.train.log_every if done % config.train.log_every == 0
                    else done % config.train.log_every) / (now - t_log)
            t_log = now
            terms = " ".join(f"{k}={float(v):.4g}" for k, v in m.items())
            log(f"step {done}/{steps} {terms} steps/s={rate:.2f}")
        if done % config.train.checkpoint_every == 0 or done == steps:
            checkpoints.save(manager, done, par.get_state(dstate))
    manager.wait_until_finished()
    log(f"trained {steps - start} steps in {time.perf_counter() - t0:.1f} s")
    state = par.get_state(dstate)
    summary = evaluation.evaluate(config, model, state["params"], splits, workdir)
    manager.close()
    return summary


def restore_params(config, workdir: str, channels: int):
    """Model and parameters of the latest checkpoint in `workdir`."""
    model = create_model(config)
    tx, _ = optim.create_optimizer(config.optim, config.train.steps)
    state = create_train_state(config, model, tx, jax.random.key(config.seed),
                               (1,) + tuple(config.train.crop) + (channels,))
    manager = checkpoints.manager(workdir, config.train.checkpoint_every)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}; train first (--mode=train)")
    state = checkpoints.restore_latest(manager, state)
    manager.close()
    return model, state["params"]


def evaluate_checkpoint(config, workdir: str):
    """Evaluates the latest checkpoint in `workdir` on the held-out split."""
    splits = data.load(config)
    model, params = restore_params(config, workdir, splits["train"].images[0].shape[-1])
    return evaluation.evaluate(config, model, params, splits, workdir)
