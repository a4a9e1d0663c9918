"""The cache of XLA:CPU's large host blocks (`block_cache`): results unchanged against numpy,
a program's temporary block mapped once and reused (cache hits, page faults per run), idle
blocks released when stale, and the switch that turns it off."""
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellcount_jax import block_cache

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not block_cache.install(),
                                reason="the block cache runs on the CPU backend where built")


def _program(n):
    """A jitted program over n int32 values with temporaries of about 8n bytes, its input and
    its exact result."""
    x = np.arange(n, dtype=np.int32) % 7
    fn = jax.jit(lambda x: jnp.cumsum(x)[::-1] + jnp.cumsum(x[::-1])).lower(x).compile()
    expect = np.cumsum(x)[::-1] + np.cumsum(x[::-1])
    return fn, x, expect, fn.memory_analysis().temp_size_in_bytes


def test_temporaries_reused_with_the_same_results():
    fn, x, expect, temp = _program(1 << 23)
    assert temp >= 2 * block_cache.MIN_BYTES
    x = jax.device_put(x)

    def runs(n):  # XLA's runs alone (numpy's own temporaries fault in as the allocator likes)
        for _ in range(n):
            out = fn(x).block_until_ready()
        return out

    # The blocks are mapped here: the temporaries (a run may start before the previous one's
    # are freed) and the outputs, held in turn.
    np.testing.assert_array_equal(runs(5), expect)
    before, faults = block_cache.stats(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = runs(5)
    after = block_cache.stats()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 5
    np.testing.assert_array_equal(out, expect)
    assert after["hits"] - before["hits"] >= 5
    # Mapped afresh, the block would fault in temp / 4096 pages at every run.
    assert faults < temp / 4096 / 4, (faults, temp / 4096)


def test_stale_blocks_released_and_release():
    f, fx, f_expect, f_temp = _program(1 << 23)
    g, gx, g_expect, g_temp = _program(3 << 21)
    assert g_temp >= block_cache.MIN_BYTES and g_temp != f_temp
    np.testing.assert_array_equal(f(fx), f_expect)
    for _ in range(20):  # f's idle block is not reused within 16 frees: released
        np.testing.assert_array_equal(g(gx), g_expect)
    s = block_cache.stats()
    assert s["blocks"] == 1 and g_temp <= s["idle_bytes"] < g_temp + f_temp, s
    block_cache.release()
    s = block_cache.stats()
    assert s["blocks"] == 0 and s["idle_bytes"] == 0
    np.testing.assert_array_equal(g(gx), g_expect)


def test_switched_off_by_the_environment():
    env = dict(os.environ, CELLCOUNT_JAX_BLOCK_CACHE="0")
    out = subprocess.run([sys.executable, "-c", "from cellcount_jax import block_cache as b;"
                          "print(b.install(), b.stats())"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False {'installed': False}"


def _non_pie_system_python():
    """This Python version's /usr/bin interpreter where it is a non-PIE executable (Debian's and
    Ubuntu's are), else None."""
    exe = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    try:
        with open(exe, "rb") as f:
            head = f.read(18)
    except OSError:
        return None
    return exe if head[:4] == b"\x7fELF" and int.from_bytes(head[16:18], "little") == 2 else None


def _reuse_test_passes(interpreter, env=None):
    """Runs `test_temporaries_reused_with_the_same_results` under another interpreter (with this
    one's packages) or environment; asserts that it passed, not skipped."""
    import site
    test = os.path.abspath(__file__)
    code = ("import site, sys\n"
            f"for d in {site.getsitepackages()!r}: site.addsitedir(d)\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.dirname(test))!r})\n"
            "import pytest\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {test!r}, '-k', "
            "'temporaries_reused']))")
    run = subprocess.run([interpreter, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})))
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.mark.skipif(_non_pie_system_python() is None,
                    reason="no non-PIE system interpreter of this Python version")
def test_in_place_under_a_non_pie_interpreter():
    # Such an interpreter takes free's address: dlsym gives a stub in its PLT, while jaxlib's
    # call slots hold libc's free. The cache must still go in (and serve the blocks).
    _reuse_test_passes(_non_pie_system_python())


def _preloadable(name):
    """The soname of the library `name` (e.g. 'jemalloc') where the dynamic linker finds it, else
    None (not loaded here)."""
    import ctypes.util
    return ctypes.util.find_library(name)


@pytest.mark.parametrize("interpreter", ["this", "non-PIE system"])
@pytest.mark.parametrize("allocator", ["tcmalloc_minimal", "jemalloc"])
def test_in_place_with_a_preloaded_allocator(allocator, interpreter):
    # With tcmalloc or jemalloc preloaded, both functions are the allocator's; under a non-PIE
    # interpreter the process's free is a stub leading to the allocator's, not to libc's.
    exe = sys.executable if interpreter == "this" else _non_pie_system_python()
    if exe is None or _preloadable(allocator) is None:
        pytest.skip(f"no lib{allocator}" if exe else "no non-PIE system interpreter")
    _reuse_test_passes(exe, {"LD_PRELOAD": _preloadable(allocator)})
