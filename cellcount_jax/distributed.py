"""Jobs of several processes: TPU pod slices, multi-GPU clusters, several local processes.

One process runs per host and feeds its own devices. `initialize` starts `jax.distributed`;
`part` names this process's share of each global batch (`Dataset.sample(part=...)`);
`gather_maps` splits per-image work (evaluation) across processes and gives every process
all the results (`gather_exact`: any array of every process, bit for bit); `Preemption` tells every process at the same step that the job is being
stopped (SIGTERM, or a TPU maintenance event). Process 0 prints and writes the model folder and
the run records; every process takes part in the collectives and in checkpointing.
"""
import os
import signal
import threading

import jax
import numpy as np

from cellcount_jax.errors import InputError

ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str):
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError as e:
        raise InputError(f"environment variable {name}={text!r}: expected an integer") from e


def initialize(enabled: bool = False, coordinator: str = "", num_processes=None,
               process_id=None) -> bool:
    """Starts `jax.distributed` when `enabled` or when any explicit setting is given, as an
    argument or in the environment (JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID). With no explicit setting JAX finds them itself on TPU pods, SLURM, Open MPI
    and Kubernetes. Call it before anything else touches JAX's devices. Returns whether a
    multi-process job runs."""
    coordinator = coordinator or os.environ.get(ENVIRONMENT[0], "")
    num_processes = num_processes if num_processes is not None else _env_int(ENVIRONMENT[1])
    process_id = process_id if process_id is not None else _env_int(ENVIRONMENT[2])
    if not (enabled or coordinator or num_processes is not None or process_id is not None):
        return False
    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize(coordinator or None, num_processes, process_id)
    except (ValueError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines()[0].rstrip(".") if str(e).strip()
                 else type(e).__name__)
        raise InputError(f"jax.distributed did not start: {first}. Outside a TPU pod, SLURM or "
                         f"Open MPI give --coordinator=HOST:PORT (process 0's address), "
                         f"--num_processes and --process_id") from e
    return True


def is_lead() -> bool:
    """Whether this process prints and writes files (process 0)."""
    return jax.process_index() == 0


def part():
    """(index, count) of this process among the job's processes."""
    return jax.process_index(), jax.process_count()


def gather_exact(x: np.ndarray) -> np.ndarray:
    """(process_count, *x.shape): `x` of every process, bit for bit in any dtype (float64
    included, which JAX would otherwise narrow)."""
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils
    raw = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint8)))
    return raw.reshape(len(raw), -1).view(x.dtype).reshape((len(raw),) + x.shape)


def gather_maps(fn, images, shapes):
    """[fn(im) for im in images] as float32 arrays of the given `shapes`, image i computed by
    process i % process_count and the results exchanged (`process_allgather`), so that every
    process returns the whole list. One process: a plain loop."""
    n, p = jax.process_count(), jax.process_index()
    if n == 1:
        return [np.asarray(fn(im), np.float32) for im in images]
    from jax.experimental import multihost_utils
    shapes = [tuple(s) for s in shapes]
    rows = -(-len(images) // n)
    biggest = tuple(int(max(s[a] for s in shapes)) for a in range(len(shapes[0])))
    mine = np.zeros((rows,) + biggest, np.float32)
    for r, i in enumerate(range(p, len(images), n)):
        out = np.asarray(fn(images[i]), np.float32)
        if out.shape != shapes[i]:
            raise ValueError(f"image {i}: expected a map of shape {shapes[i]}, got {out.shape}")
        mine[(r,) + tuple(slice(0, s) for s in out.shape)] = out
    every = np.asarray(multihost_utils.process_allgather(mine))  # (n, rows, *biggest)
    return [every[i % n, i // n][tuple(slice(0, s) for s in shapes[i])]
            for i in range(len(images))]


class Preemption:
    """`reached(step)` turns true at the same step on every process once any of them was asked
    to stop: through JAX's preemption service under `jax.distributed` (SIGTERM to any process,
    TPU maintenance events), through a SIGTERM handler otherwise. A second SIGTERM to a single
    process stops it at once. `close()` puts the previous handler back."""

    def __init__(self):
        self.signalled = False
        self.previous = None
        self.service = jax.distributed.is_initialized()
        if not self.service and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.signalled = True
        signal.signal(signal.SIGTERM, self.previous or signal.SIG_DFL)

    def reached(self, step: int) -> bool:
        if self.service:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(int(step))
        return self.signalled

    def close(self):
        if self.previous is not None and not self.signalled:
            signal.signal(signal.SIGTERM, self.previous)
        self.previous = None
