"""The train step: stop-gradient teacher, multi-device equivalence, EMA, resume."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, tiny_config
from cellcount_jax import checkpoints, losses, models, native, optim, perturb, train


def setup(config, lr=1e-2):
    model = train.create_model(config)
    lr_fn = optax.constant_schedule(lr)
    tx = optax.sgd(lr_fn)  # update = -lr * grad, so updates expose gradients
    state = train.create_train_state(config, model, tx, jax.random.key(0), (1, 16, 16, 3))
    return model, tx, lr_fn, state


def random_batch(seed, labeled=2, unlabeled=2):
    rng = np.random.default_rng(seed)
    b = {"image": rng.normal(size=(labeled, 16, 16, 3)).astype(np.float32),
         "target": rng.uniform(size=(labeled, 16, 16)).astype(np.float32)}
    if unlabeled:
        b["unlabeled"] = rng.normal(size=(unlabeled, 16, 16, 3)).astype(np.float32)
    return b


def one_step(config, batch, lr=1e-2):
    model, tx, lr_fn, state = setup(config, lr)
    par = train.Parallel(train.make_train_step(config, model, tx, lr_fn), "pmap",
                         jax.devices()[:1])
    new, metrics = par(par.put_state(state), batch, jax.random.key(7))
    return model, state, par.get_state(new), metrics


def test_teacher_is_a_stop_gradient_snapshot():
    c = tiny_config()
    c.model.dropout = 0.0
    c.ssl.ramp_shape = "constant"
    batch = random_batch(0)
    model, state, new, _ = one_step(c, batch)
    params = state["params"]
    # The step's rng derivation: fold_in(rng, step), then split into (noise, dropout).
    noise_rng, _ = jax.random.split(jax.random.fold_in(jax.random.key(7), 0))
    x = jnp.concatenate([batch["image"], batch["unlabeled"]])

    def loss(p, teacher_fn):
        feats = model.apply({"params": p}, x, method=models.SAUNet.encode)
        feats = perturb.feature_noise(noise_rng, feats, 2, c.ssl.noise_rate, c.ssl.noise_at)
        out = model.apply({"params": p}, feats, method=models.SAUNet.decode)
        return (losses.mse(out[:2], batch["target"])
                + losses.focal_consistency(out[2:], teacher_fn(p)))

    fixed = model.apply({"params": params}, batch["unlabeled"])
    g_stop = jax.jit(jax.grad(lambda p: loss(p, lambda _: fixed)))(params)
    g_live = jax.jit(jax.grad(lambda p: loss(p, lambda q: model.apply({"params": q}, batch["unlabeled"]))))(params)
    expected = jax.tree.map(lambda p, g: p - 1e-2 * g, params, g_stop)
    diff = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), expected, new["params"])
    assert max(jax.tree.leaves(diff)) < 1e-5
    # A teacher that passed gradients would give a visibly different update.
    live = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), g_stop, g_live)
    assert max(jax.tree.leaves(live)) > 1e-3


def test_supervised_only_step_has_no_consistency_term():
    c = tiny_config()
    _, _, new, m = one_step(c, random_batch(1, unlabeled=0))
    assert "consistency" not in m and float(m["w"]) == 0.0
    assert float(m["loss"]) == pytest.approx(float(m["supervised"]))
    assert int(new["step"]) == 1


def test_consistency_weight_scales_the_term():
    c = tiny_config()
    c.ssl.ramp_shape = "constant"
    c.ssl.weight = 30.0
    _, _, _, m = one_step(c, random_batch(3))
    assert float(m["w"]) == 30.0 and float(m["consistency"]) > 0
    assert float(m["loss"]) == pytest.approx(float(m["supervised"]) + 30.0 * float(m["consistency"]),
                                             rel=1e-5)


def test_ema_teacher_tracks_parameters():
    c = tiny_config()
    c.ssl.ema_decay = 0.9
    _, state, new, _ = one_step(c, random_batch(2))
    expected = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, state["teacher"], new["params"])
    diff = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), expected, new["teacher"])
    assert max(jax.tree.leaves(diff)) < 1e-7


def test_two_devices_give_the_same_update_as_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_step.py")],
                         env=env, capture_output=True, text=True, cwd=os.path.join(ROOT, "tests"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("pmap2", "shard_map2"):
        for step in r[name]:
            assert step["max_abs_diff"] <= 1e-5, r
            assert step["consistency"] > 0
    assert min(r["update_size"]) > 1e-3  # the steps really moved the parameters


def fit_square(config, steps=30, seed=3):
    """Trains on one batch whose target is a bright square: (supervised losses, model, state)."""
    model = train.create_model(config)
    tx, lr_fn = optim.create_optimizer(config.optim, steps)
    state = train.create_train_state(config, model, tx, jax.random.key(0), (1, 16, 16, 3))
    par = train.Parallel(train.make_train_step(config, model, tx, lr_fn), "pmap",
                         jax.devices()[:1])
    s = par.put_state(state)
    batch = random_batch(seed)
    batch["target"] = np.zeros_like(batch["target"])
    batch["target"][:, 4:8, 4:8] = 1.0
    seen = []
    for _ in range(steps):
        s, m = par(s, batch, jax.random.key(0))
        seen.append(float(m["supervised"]))
    return seen, model, par.get_state(s)


def test_training_reduces_the_loss():
    seen, _, _ = fit_square(tiny_config())
    assert seen[-1] < 0.5 * seen[0]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    c = tiny_config()
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train.train_and_evaluate(c, full)
    # A run that stopped after step 2: keep only that checkpoint, then rerun.
    shutil.copytree(os.path.join(full, "checkpoints", "2"),
                    os.path.join(resumed, "checkpoints", "2"))
    train.train_and_evaluate(c, resumed)
    a = checkpoints.restore_latest(checkpoints.manager(full, 2), jax.device_get(
        train.create_train_state(c, train.create_model(c), optim.create_optimizer(c.optim, 4)[0],
                                 jax.random.key(0), (1, 16, 16, 3))))
    b = checkpoints.restore_latest(checkpoints.manager(resumed, 2), a)
    assert int(a["step"]) == int(b["step"]) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert os.path.exists(os.path.join(resumed, "eval.json"))


def test_bfloat16_compute_trains_with_float32_parameters():
    c = tiny_config()
    c.model.dtype = "bfloat16"
    seen, model, out = fit_square(c, seed=4)
    assert np.isfinite(seen).all() and seen[-1] < 0.5 * seen[0]
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(out["params"]))
    feats = model.apply({"params": out["params"]}, jnp.zeros((1, 16, 16, 3)),
                        method=models.SAUNet.encode)
    # On the CPU formulation only the 3x3 convolutions compute in bf16 (float32 results).
    cpu = model.impl == "cpu"
    assert feats[0].dtype == (jnp.float32 if cpu else jnp.bfloat16)
    if cpu and native.bf16_available():
        lowered = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(
            out["params"], jnp.zeros((1, 16, 16, 3)))
        assert "cellcount_dnnl" in lowered.as_text()
    assert model.apply({"params": out["params"]}, jnp.zeros((1, 16, 16, 3))).dtype == jnp.float32


def test_minutes_fit_the_steps_to_the_measured_rate_and_resume_keeps_them(tmp_path,
                                                                         monkeypatch):
    c = tiny_config()
    c.train.minutes, c.train.steps, c.train.log_every = 10.0, 100, 1
    probes = []

    def probe(par, state, sample, key):
        probes.append(sample(0)["image"].shape)
        return 0.01, 0.0  # 0.01 steps/s: about 5 steps in what is left of 10 minutes

    monkeypatch.setattr(train, "_probe", probe)
    wd = str(tmp_path / "run")
    predictor, _ = train.train(c, wd)
    saved = json.load(open(os.path.join(wd, "config.json")))["train"]
    lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert 3 <= saved["steps"] <= 6 and saved["minutes"] == 10.0
    assert predictor.step == saved["steps"] == lines[-1]["step"] == len(lines)
    assert lines[-1]["lr"] < 0.3 * c.optim.lr  # the cosine schedule of the fitted steps ended
    assert probes == [(2, 16, 16, 3)]
    # the same command resumes the fitted run: no new probe, the same steps
    c = tiny_config()
    c.train.minutes, c.train.steps = 10.0, 100
    predictor, _ = train.train(c, wd)
    assert predictor.step == saved["steps"] and len(probes) == 1


def test_student_perturbations_change_the_student_only():
    # Intensity changes and channel dropout act on the student's unlabeled rows: the
    # supervised term (labeled rows) is unchanged, the consistency term moves.
    c = tiny_config()
    c.model.dropout = 0.0
    c.ssl.ramp_shape = "constant"
    c.ssl.noise_rate = 0.0
    batch = random_batch(4)
    _, _, _, plain = one_step(c, batch)
    for field, value in (("student_intensity", 0.5), ("feature_dropout", 0.5)):
        p = tiny_config()
        p.model.dropout = 0.0
        p.ssl.ramp_shape = "constant"
        p.ssl.noise_rate = 0.0
        p.ssl[field] = value
        _, _, _, m = one_step(p, batch)
        assert float(m["supervised"]) == pytest.approx(float(plain["supervised"]), rel=1e-6)
        assert abs(float(m["consistency"]) - float(plain["consistency"])) > \
            1e-3 * float(plain["consistency"]), field
