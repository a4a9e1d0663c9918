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


def intensity(rng, x, first_row: int, strength: float):
    """The images of rows `first_row:` with their intensities perturbed, each row its own draw:
    contrast (1 + c), shift b times the row's standard deviation and Gaussian noise of
    strength / 2 standard deviations, with c, b ~ U(-strength, strength). The student sees
    these where the teacher sees the images as they are. x: (batch, *spatial, C)."""
    if strength <= 0:
        return x
    rows = x[first_row:]
    shape = (rows.shape[0],) + (1,) * (rows.ndim - 1)
    k_c, k_b, k_n = jax.random.split(rng, 3)
    c = jax.random.uniform(k_c, shape, rows.dtype, -strength, strength)
    b = jax.random.uniform(k_b, shape, rows.dtype, -strength, strength)
    sd = jnp.std(rows, axis=tuple(range(1, rows.ndim)), keepdims=True)
    noise = jax.random.normal(k_n, rows.shape, rows.dtype) * (0.5 * strength)
    return jnp.concatenate([x[:first_row], rows * (1 + c) + (b + noise) * sd], axis=0)


def feature_dropout(rng, feats, first_row: int, rate: float, where: str = "all"):
    """Channel dropout of the encoder features of rows `first_row:`: each row's channels are
    zeroed with probability `rate` and the rest scaled by 1 / (1 - rate); `where` as in
    `feature_noise`."""
    if rate <= 0:
        return feats
    if where not in ("all", "bottleneck"):
        raise InputError(f"config.ssl.noise_at must be 'all' or 'bottleneck', got {where!r}")
    out = []
    for i, f in enumerate(feats):
        if where == "all" or i == len(feats) - 1:
            rows = f[first_row:]
            shape = (rows.shape[0],) + (1,) * (rows.ndim - 2) + (rows.shape[-1],)
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, shape)
            f = jnp.concatenate([f[:first_row], rows * keep.astype(f.dtype) / (1.0 - rate)], 0)
        out.append(f)
    return tuple(out)
