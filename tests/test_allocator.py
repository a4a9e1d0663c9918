"""The `cellcount` command's allocator (`allocator`): tcmalloc preloaded by one re-execution
where it is installed, never by the library; XLA's large temporary block then reused between
runs (page faults per run against glibc's), and nothing printed for large allocations."""
import os
import subprocess
import sys
import textwrap

import pytest

from cellcount_jax import allocator

needs_tcmalloc = pytest.mark.skipif(
    sys.platform != "linux" or allocator.find() is None,
    reason="tcmalloc is not installed (Debian/Ubuntu: libtcmalloc-minimal4)")


def _python(code, **env):
    """Runs `code` in a new interpreter (its own environment: no preload inherited from this
    one) and returns its stdout lines; fails on a non-zero exit or anything on stderr."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", allocator.DONE_ENV, allocator.ENV)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300, env={**base, **env})
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr[-2000:]
    return out.stdout.split("\n")


ENSURED = """
    import os, sys
    from cellcount_jax import allocator
    print("before", allocator.loaded(), os.getpid(), flush=True)
    allocator.ensure()
    print("after", allocator.loaded(), os.getpid(), os.environ.get(allocator.DONE_ENV), flush=True)
"""


@needs_tcmalloc
def test_ensure_re_executes_once_under_tcmalloc():
    lines = _python(ENSURED)
    # The first process prints "before", is replaced (same pid) and the new one prints both.
    before = [line for line in lines if line.startswith("before")]
    after = [line for line in lines if line.startswith("after")]
    assert before[0].split()[1] == "False" and before[1].split()[1] == "True"
    assert len(after) == 1 and after[0].split()[1] == "True"
    assert before[0].split()[2] == after[0].split()[2]  # exec keeps the process
    assert after[0].split()[3] == allocator.find()


def test_ensure_leaves_the_process_alone_when_asked_or_without_tcmalloc(monkeypatch):
    lines = _python(ENSURED, CELLCOUNT_ALLOCATOR="system")
    assert lines[0].split()[1] == "False" and lines[1].split()[1] == "False"
    assert lines[1].split()[3] == "None"

    def no_exec(*args):
        raise AssertionError("re-executed")

    monkeypatch.setattr(os, "execve", no_exec)
    monkeypatch.setattr(allocator, "find", lambda: None)
    monkeypatch.delenv(allocator.DONE_ENV, raising=False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    allocator.ensure()  # nothing to preload: returns
    monkeypatch.setattr(allocator, "find", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setenv(allocator.DONE_ENV, "libtcmalloc_minimal.so.4")
    allocator.ensure()  # re-executed already (even if the preload failed): never twice


def test_importing_and_using_the_library_changes_no_allocator():
    lines = _python("""
        import numpy as np
        import cellcount_jax
        from cellcount_jax import allocator, cli, model_folder
        model = cellcount_jax.load_model("pretrained/vgg2d_cpu")
        model.density(np.zeros((64, 64, 3), np.float32))
        print(allocator.loaded())
    """)
    assert lines[0] == "False"


REUSE = """
    import resource
    import jax, jax.numpy as jnp, numpy as np
    from cellcount_jax import allocator
    {ensure}
    x = np.arange(1 << 23, dtype=np.int32) % 7
    fn = jax.jit(lambda x: jnp.cumsum(x)[::-1] + jnp.cumsum(x[::-1])).lower(x).compile()
    temp = fn.memory_analysis().temp_size_in_bytes
    x = jax.device_put(x)
    for _ in range(5):
        out = fn(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        out = fn(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 5
    expect = np.cumsum(np.asarray(x))[::-1] + np.cumsum(np.asarray(x)[::-1])
    assert (np.asarray(out) == expect).all()
    big = np.empty(3 << 30, np.uint8)  # tcmalloc would report a 3 GB allocation on stderr
    print(allocator.loaded(), temp, faults)
"""


@needs_tcmalloc
def test_xla_s_temporary_block_is_reused_under_the_command_s_allocator():
    loaded, temp, faults = _python(REUSE.format(ensure="allocator.ensure()"))[-2].split()
    assert loaded == "True" and int(temp) >= 64 << 20
    # Mapped afresh at every run (glibc: the block is above its 32 MB mmap threshold), the
    # block would fault in temp / 4096 pages per run (besides the 32 MB output's).
    assert float(faults) < int(temp) / 4096 / 2, (faults, temp)
    system, _, glibc_faults = _python(REUSE.format(ensure=""))[-2].split()
    if system == "False" and "glibc" in os.confstr("CS_GNU_LIBC_VERSION"):
        assert float(glibc_faults) > int(temp) / 4096, (glibc_faults, temp)
        assert float(glibc_faults) > 3 * float(faults), (glibc_faults, faults)


@needs_tcmalloc
def test_the_command_runs_under_tcmalloc():
    out = subprocess.run(
        [sys.executable, "-c", "import atexit; from cellcount_jax import allocator; "
         "atexit.register(lambda: print('tcmalloc', allocator.loaded(), flush=True)); "
         "from cellcount_jax.cli import main; main()", "annotate", "missing.tif"],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", allocator.DONE_ENV, allocator.ENV)})
    assert out.returncode == 2 and "no such image" in out.stderr
    assert out.stderr.count("\n") == 1 and out.stdout.strip() == "tcmalloc True"
