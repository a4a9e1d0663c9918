"""Reuse of XLA:CPU's large host blocks between runs of compiled programs.

XLA:CPU allocates the temporaries of each run as one block (513 MB for the 2D bfloat16 train
step at 128x128, batch 8) and frees it when the run ends. glibc maps any block above 32 MB
afresh, and the kernel faults in and zeroes its pages at every run: 125,000 page faults and
about 0.25 s of system time per step on 2 cores. `install` has XLA's library (jaxlib's, only)
allocate blocks of at least `MIN_BYTES` through a small cache (`csrc/block_cache.c`): a freed
block stays mapped and the next request of the same size gets it back, so a training loop
maps its step's block once. Idle blocks are released to the allocator when they were not
reused within 16 frees of cached blocks, or beyond a quarter of the machine's memory in all.

`convolutions.compiler_options` installs it for the CPU backend. It runs where the library
was built (Linux, x86-64 or arm64) and `CELLCOUNT_JAX_BLOCK_CACHE=0` is not set; elsewhere XLA
allocates as it does by itself.
"""
import ctypes
import functools
import importlib.util
import os

import jax  # noqa: F401  (loads XLA's library, which `install` rewires)

MIN_BYTES = 32 << 20


@functools.cache
def _library():
    if os.environ.get("CELLCOUNT_JAX_BLOCK_CACHE", "1") == "0":
        return None
    spec = importlib.util.find_spec("cellcount_jax._blocks")
    if spec is None or not spec.origin:
        return None
    try:
        return ctypes.CDLL(spec.origin)
    except OSError:
        return None


@functools.cache
def install() -> bool:
    """Puts the cache in front of jaxlib's large allocations (once); whether it is in place."""
    lib = _library()
    if lib is None:
        return False
    max_idle = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    lib.cc_blocks_install.restype = ctypes.c_int
    patched = lib.cc_blocks_install(b"/jaxlib/", ctypes.c_size_t(MIN_BYTES),
                                    ctypes.c_size_t(max_idle))
    return patched > 0


def stats() -> dict:
    """Requests of at least MIN_BYTES served from the cache ('hits') or the allocator
    ('misses'), and the bytes and number of blocks the cache holds (idle or in use)."""
    if not install():
        return {"installed": False}
    out = (ctypes.c_uint64 * 4)()
    _library().cc_blocks_stats(out)
    return {"installed": True, "hits": out[0], "misses": out[1], "idle_bytes": out[2],
            "blocks": out[3]}


def release():
    """Returns the idle blocks to the allocator."""
    if install():
        _library().cc_blocks_release()
