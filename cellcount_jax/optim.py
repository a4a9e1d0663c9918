"""Learning-rate schedules and the optax optimizer chain."""
import jax.numpy as jnp
import optax

from cellcount_jax.errors import InputError


def sgdr_schedule(base_lr: float, total_steps: int, first_period: int = 50, mult: int = 2,
                  alpha: float = 0.0):
    """Cosine annealing with warm restarts (SGDR): periods first_period, x mult, ... ."""
    schedules, boundaries, period, start = [], [], first_period, 0
    while start < total_steps:
        schedules.append(optax.cosine_decay_schedule(base_lr, period, alpha))
        start += period
        boundaries.append(start)
        period *= mult
    return optax.join_schedules(schedules, boundaries[:-1])


def create_learning_rate_fn(config, total_steps: int):
    """config.schedule: 'cosine' (paper: cosine decay from lr) or 'sgdr' (reference code)."""
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, max(total_steps, 1), config.alpha)
    if config.schedule == "sgdr":
        return sgdr_schedule(config.lr, total_steps, config.sgdr_period, config.sgdr_mult,
                             config.alpha)
    if config.schedule == "constant":
        return optax.constant_schedule(config.lr)
    raise InputError(f"config.optim.schedule must be 'cosine', 'sgdr' or 'constant', "
                     f"got {config.schedule!r}")


def create_optimizer(config, total_steps: int):
    """Adam, or AdamW with decoupled weight decay lr_t * weight_decay * param (reference: 1.0).

    config: the `optim` block of an experiment config (name, lr, schedule, weight_decay, ...).
    """
    lr = create_learning_rate_fn(config, total_steps)
    if config.name == "adam":
        return optax.adam(lr), lr
    if config.name == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay), lr
    raise InputError(f"config.optim.name must be 'adam' or 'adamw', got {config.name!r}")


def consistency_weight(step, length: int = 150, shape: str = "exp"):
    """Weight w(step) of the consistency loss, ramped up from ~0 to 1 over `length` steps.

    'exp': the reference code's exp(5 (min(step / length, 1) - 1)); 'sigmoid': the usual
    exp(-5 (1 - t)^2); 'linear'; 'constant' (1 from the start).
    """
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(length, 1), 0.0, 1.0)
    if shape == "exp":
        return jnp.exp(5.0 * (t - 1.0))
    if shape == "sigmoid":
        return jnp.exp(-5.0 * (1.0 - t) ** 2)
    if shape == "linear":
        return t
    if shape == "constant":
        return jnp.ones_like(t)
    raise InputError(f"config.ssl.ramp_shape must be 'exp', 'sigmoid', 'linear' or 'constant', "
                     f"got {shape!r}")
