"""Schedules, the optimizer chain and the consistency ramp, by hand."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cellcount_jax import optim


def optim_config(**kw):
    c = ml_collections.ConfigDict(dict(name="adam", lr=1e-3, schedule="cosine", alpha=0.0,
                                       weight_decay=1.0, sgdr_period=50, sgdr_mult=2))
    c.update(kw)
    return c


def test_cosine_schedule():
    _, lr = optim.create_optimizer(optim_config(), 100)
    assert float(lr(0)) == pytest.approx(1e-3)
    assert float(lr(50)) == pytest.approx(0.5e-3)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)


def test_sgdr_restarts_and_doubles():
    _, lr = optim.create_optimizer(optim_config(schedule="sgdr"), 400)
    # Periods [0, 50), [50, 150), [150, 350), [350, ...).
    for start, period in [(0, 50), (50, 100), (150, 200), (350, 400)]:
        assert float(lr(start)) == pytest.approx(1e-3)
        half = 1e-3 * 0.5 * (1 + np.cos(np.pi * 0.5))
        assert float(lr(start + period // 2)) == pytest.approx(half, rel=1e-5)
    assert float(lr(149)) < 1e-6


def test_adamw_decay_equals_lr_times_param():
    tx, _ = optim.create_optimizer(optim_config(name="adamw", schedule="constant"), 10)
    params = {"w": jnp.array([2.0, -4.0])}
    updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -1e-3 * params["w"], rtol=1e-6)


def test_bad_names():
    with pytest.raises(ValueError, match="optim.name"):
        optim.create_optimizer(optim_config(name="sgd"), 10)
    with pytest.raises(ValueError, match="schedule"):
        optim.create_optimizer(optim_config(schedule="step"), 10)


def test_consistency_ramp():
    assert float(optim.consistency_weight(0)) == pytest.approx(np.exp(-5))
    assert float(optim.consistency_weight(75)) == pytest.approx(np.exp(-2.5))
    assert float(optim.consistency_weight(150)) == 1.0
    assert float(optim.consistency_weight(10_000)) == 1.0
    assert float(optim.consistency_weight(50, 100, "sigmoid")) == pytest.approx(np.exp(-1.25))
    assert float(optim.consistency_weight(25, 100, "linear")) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ramp_shape"):
        optim.consistency_weight(0, 10, "step")


def test_fit_schedule_scales_the_sgdr_periods_and_the_ramp():
    from conftest import tiny_config
    from cellcount_jax.train import fit_schedule

    c = tiny_config()
    c.optim.schedule, c.optim.sgdr_period, c.optim.sgdr_mult = "sgdr", 50, 2
    c.train.steps, c.ssl.ramp_steps = 1000, 100
    fit_schedule(c, 1000)
    # periods 50, 100, ..., 400 end at 750; a fifth (800) does not fit: four periods
    # stretched to end at the last step, 66 + 132 + 264 + 528 = 990
    assert (c.optim.sgdr_period, c.train.steps) == (66, 990)
    assert c.ssl.ramp_steps == 99
    lr = optim.create_learning_rate_fn(c.optim, c.train.steps)
    ends = np.cumsum([66, 132, 264, 528])
    assert all(float(lr(e - 1)) < 1e-3 * c.optim.lr for e in ends)  # each period finishes
    assert float(lr(ends[0])) == pytest.approx(c.optim.lr)  # and the next restarts
    c = tiny_config()
    c.train.steps, c.ssl.ramp_steps = 100, 10
    fit_schedule(c, 40)  # cosine: exactly the steps
    assert (c.train.steps, c.ssl.ramp_steps) == (40, 4)
