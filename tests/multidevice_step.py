"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=2: prints, for two SSL steps,
the max abs difference between the state updated on 1 device and on 2 devices (pmap and
shard_map) from the same state and global batch, with the plain and the peak-weighted
supervised loss (whose peak is the global batch's, not each device's)."""
import json

import jax
import numpy as np
import optax

from conftest import tiny_config
from cellcount_jax import targets, train


def main():
    assert jax.local_device_count() == 2, jax.devices()
    out = {"pmap2": [], "shard_map2": [], "update_size": []}
    for loss in ("mse", "peak_weighted_mse"):
        compare(loss, out)
    print(json.dumps(out))


def compare(loss, out):
    c = tiny_config()
    c.loss.supervised = loss
    c.model.dropout = 0.0  # dropout masks depend on the device layout; the rest must not
    c.ssl.ramp_shape = "constant"
    model = train.create_model(c)
    # Plain SGD: the update is the averaged gradient itself. (Adam's first step divides by
    # |g|, which turns float noise on parameters with ~zero gradient into +-lr.)
    lr = optax.constant_schedule(1e-2)
    tx = optax.sgd(lr)
    state = train.create_train_state(c, model, tx, jax.random.key(0), (1, 16, 16, 3))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                "target": np.stack([targets.inverse_distance(rng.uniform(0, 16, (5, 2)), 5, (16, 16))
                                      for _ in range(4)])
                * np.array([1.0, 1.0, 2.0, 1.0], np.float32)[:, None, None],  # device 1's peak
                "unlabeled": rng.normal(size=(4, 16, 16, 3)).astype(np.float32)}
               for _ in range(2)]
    step = train.make_train_step(c, model, tx, lr)
    layouts = {name: train.Parallel(step, mode, devices) for name, mode, devices in
               [("pmap1", "pmap", jax.devices()[:1]), ("pmap2", "pmap", jax.devices()),
                ("shard_map2", "shard_map", jax.devices())]}
    # Each step starts every layout from the same state (the one-device result of the
    # previous step) and compares the updates; step 1 has its own noise draw and ramp weight.
    for b in batches:
        new = {}
        for name, par in layouts.items():
            s, m = par(par.put_state(state), b, jax.random.key(1))
            new[name] = (par.get_state(s), m)
        ref = new["pmap1"][0]
        for name in ("pmap2", "shard_map2"):
            diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref, new[name][0])
            out[name].append({"max_abs_diff": max(jax.tree.leaves(diff)),
                              "loss": float(new[name][1]["loss"]),
                              "consistency": float(new[name][1]["consistency"])})
        out["update_size"].append(max(jax.tree.leaves(jax.tree.map(
            lambda a, b: float(np.max(np.abs(a - b))), ref["params"], state["params"]))))
        out.setdefault("pmap1", []).append({"loss": float(new["pmap1"][1]["loss"])})
        state = ref


if __name__ == "__main__":
    main()
