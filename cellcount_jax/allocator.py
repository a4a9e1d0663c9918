"""The memory allocator of the `cellcount` command's process: tcmalloc where it is installed.

XLA:CPU allocates the temporaries of each run of a compiled program as one large block (513 MB
for the 2D bfloat16 train step at 128x128, batch 8) and frees it when the run ends. glibc's
malloc maps any block above 32 MB afresh and the kernel faults in and zeroes its pages at every
run: about 90,000-155,000 page faults per train step, 8-33 % of a 2-core CPU step. tcmalloc
keeps such blocks and hands them out again (docs/performance.md: the same speed as a block
cache inside the process, with less memory), so the command runs under it:

    `ensure()`, at the start of `cellcount` and `launch.py`, re-executes the process once with
    tcmalloc in LD_PRELOAD (`find`: gperftools' libtcmalloc_minimal, Debian/Ubuntu package
    libtcmalloc-minimal4, or libtcmalloc) when it is installed, the platform is Linux, and
    CELLCOUNT_ALLOCATOR is not 'system'; it also raises tcmalloc's threshold for reporting
    large allocations (the density maps of large volumes are GBs), so that nothing is printed.

Nothing happens on import, and the library (`load_model`, `train.train`) never changes the
allocator: a notebook or a script gets the same speed by starting Python with
`LD_PRELOAD=libtcmalloc_minimal.so.4`.
"""
import ctypes.util
import os
import sys

ENV = "CELLCOUNT_ALLOCATOR"        # 'system': keep the process's own allocator
DONE_ENV = "CELLCOUNT_ALLOCATOR_EXEC"  # set in the re-executed process: never twice
NAMES = ("tcmalloc_minimal", "tcmalloc")
REPORT_ENV = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


def find():
    """The file name of an installed tcmalloc library (as LD_PRELOAD takes it), or None."""
    for name in NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def loaded() -> bool:
    """Whether tcmalloc is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return "libtcmalloc" in f.read()
    except OSError:
        return False


def ensure(argv=None):
    """Re-executes this process with tcmalloc preloaded, where the module docstring says so;
    returns (without re-executing) otherwise. argv: the interpreter's command line to run
    again (default `sys.orig_argv`)."""
    if (sys.platform != "linux" or os.environ.get(ENV, "") == "system"
            or os.environ.get(DONE_ENV) or loaded()):
        return
    library = find()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    env.setdefault(REPORT_ENV, str(1 << 62))
    env[DONE_ENV] = library
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
