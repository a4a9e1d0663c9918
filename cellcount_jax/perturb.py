"""Perturbations of encoder features for the student branch of self-supervised training."""
import jax
import jax.numpy as jnp

from cellcount_jax.errors import InputError


def feature_noise(rng, feats, first_row: int, rate: float = 1.0, where: str = "all"):
    """Multiplies features of rows `first_row:` by u ~ U(1 - rate, 1 + rate).

    feats: the encoder outputs (skip0, skip1, skip2, bottleneck), each (batch, *spatial, C).
    One u of shape (1, *spatial, C) per feature map and per step is shared by all perturbed
    rows (the reference implementation). where: 'all' perturbs the skips and the bottleneck
    (reference code), 'bottleneck' the bottleneck only (the paper's wording).
    """
    if where not in ("all", "bottleneck"):
        raise InputError(f"config.ssl.noise_at must be 'all' or 'bottleneck', got {where!r}")
    out = []
    for i, f in enumerate(feats):
        if where == "all" or i == len(feats) - 1:
            u = jax.random.uniform(jax.random.fold_in(rng, i), (1,) + f.shape[1:], f.dtype,
                                   1.0 - rate, 1.0 + rate)
            f = jnp.concatenate([f[:first_row], f[first_row:] * u], axis=0)
        out.append(f)
    return tuple(out)
