"""Checkpoints of the train state with orbax: periodic saves, resume from the newest readable.

Every process of a multi-process job calls `save` and `restore_latest` on the same directory
(a file system they share); orbax writes each array once and in the background, and a step
becomes visible only once complete, so a job killed while saving resumes from the one before.

A checkpoint that cannot be read (a truncated file, as a full disk leaves it) is moved to
`<workdir>/checkpoints_damaged/<step>` with a warning that names it, and the one before is
used: a damaged latest checkpoint costs the steps since the previous one, not the run.
"""
import contextlib
import io
import logging
import os
import shutil
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp


CHECKPOINTS = "checkpoints"
# The parameters of the step that calibrated best during training (`train`, `eval.every`).
BEST = "best_checkpoint"


def directory(workdir: str, name: str = CHECKPOINTS) -> str:
    return os.path.join(os.path.abspath(workdir), name)


def manager(workdir: str, save_every: int = 1, max_to_keep: int = 3, name: str = CHECKPOINTS):
    return ocp.CheckpointManager(
        directory(workdir, name),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             save_interval_steps=save_every, create=True))


def save(mngr, step: int, state):
    """Saves a host (numpy) state; the final step is saved whatever the interval."""
    mngr.save(step, args=ocp.args.StandardSave(jax.device_get(state)), force=True)


def _quiet_restore(fn):
    # On a damaged checkpoint, orbax logs the failure at length and its pending reads print
    # asyncio "Event loop is closed" tracebacks from their threads as they finish; the caller
    # reports the damage in one line instead.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                return fn()
            except Exception:
                time.sleep(1.0)  # let the pending reads end while stderr is redirected
                raise
    finally:
        logger.setLevel(level)


def _restore_newest(mngr, workdir, restore_fn):
    """restore_fn(step) on the newest readable step; damaged ones are moved aside."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, _quiet_restore(lambda: restore_fn(step))
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
            src = os.path.join(str(mngr.directory), str(step))
            dst = os.path.join(os.path.abspath(workdir),
                               os.path.basename(str(mngr.directory)) + "_damaged", str(step))
            if jax.process_index() == 0:  # one process moves it; every one goes on to the next
                if os.path.exists(dst):
                    shutil.rmtree(dst)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.move(src, dst)
                first = (str(e).strip().splitlines()[0][:200] if str(e).strip()
                         else type(e).__name__)
                warnings.warn(f"checkpoint {src} is damaged ({first}); moved to {dst}, using "
                              f"the one before", stacklevel=3)
            mngr.reload()
    return None, None


def restore_latest(mngr, state, workdir: str = None):
    """The newest readable checkpoint restored into the structure of `state`, or `state` if
    there is none. `workdir` (where `mngr` keeps its checkpoints) enables moving damaged ones
    aside."""
    target = jax.tree.map(np.asarray, jax.device_get(state))
    if workdir is None:
        step = mngr.latest_step()
        if step is None:
            return state
        return jax.tree.map(np.asarray, mngr.restore(step, args=ocp.args.StandardRestore(target)))
    step, restored = _restore_newest(
        mngr, workdir, lambda s: mngr.restore(s, args=ocp.args.StandardRestore(target)))
    return state if step is None else jax.tree.map(np.asarray, restored)


def restore_tree(workdir: str, name: str = CHECKPOINTS):
    """(step, the saved tree as it is) of the newest readable checkpoint in `workdir`'s folder
    `name`, or (None, None)."""
    if not os.path.isdir(directory(workdir, name)):
        return None, None
    mngr = manager(workdir, name=name)
    try:
        step, restored = _restore_newest(
            mngr, workdir, lambda s: mngr.restore(s, args=ocp.args.StandardRestore()))
    finally:
        mngr.close()
    return step, restored


def restore_params(workdir: str, name: str = CHECKPOINTS):
    """(step, params) of the newest readable checkpoint in `workdir` (in its folder `name`),
    without building an optimizer: the saved tree as it is, of which only the parameters are
    kept."""
    step, restored = restore_tree(workdir, name)
    if step is None:
        return None, None
    return step, jax.tree.map(np.asarray, restored["params"])
