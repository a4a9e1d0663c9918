"""Checkpoints of the train state with orbax: periodic saves, resume from the latest."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(workdir: str, save_every: int, max_to_keep: int = 3):
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             save_interval_steps=save_every, create=True))


def save(mngr, step: int, state):
    """Saves a host (numpy) state; the final step is saved whatever the interval."""
    mngr.save(step, args=ocp.args.StandardSave(jax.device_get(state)), force=True)


def restore_latest(mngr, state):
    """The latest checkpoint restored into the structure of `state`, or `state` if none."""
    step = mngr.latest_step()
    if step is None:
        return state
    target = jax.tree.map(np.asarray, jax.device_get(state))
    restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return jax.tree.map(np.asarray, restored)
