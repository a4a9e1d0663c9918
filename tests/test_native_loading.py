"""Loading the native CPU kernels: a library that cannot be used (not a library, another
library's symbols, built under another jaxlib) gives one warning that names the cause and the
XLA formulation, never a crash, and the network still runs; oneDNN stays out of the process's
global symbol scope. Each case in its own interpreter (the loaders cache what they found and
FFI targets are registered once per process)."""
import subprocess
import sys
import textwrap

import pytest

CASE = """
    import ctypes, ctypes.util, warnings
    import jax, jax.numpy as jnp, numpy as np
    from cellcount_jax import models, native
    {setup}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = [native._library(), native._dnnl_library(), native._library()]
    print("LOADED", [f is not None for f in found])
    for w in caught:
        print("WARNING", w.category.__name__, str(w.message).replace(chr(10), " "))
    # The network still runs, in its XLA formulation where the kernels are not used.
    model = models.SAUNet(features=16, impl="cpu")
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 1))
    params = model.init(jax.random.key(0), x)
    y = model.apply(params, x)
    ref = models.SAUNet(features=16, impl="xla").apply(params, x)
    print("RUNS", bool(np.isfinite(np.asarray(y)).all()),
          float(np.abs(np.asarray(y) - np.asarray(ref)).max()))
"""


def _run(setup, tmp_path):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CASE).format(setup=setup)],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    loaded = next(line for line in lines if line.startswith("LOADED"))
    warned = [line for line in lines if line.startswith("WARNING")]
    runs = next(line for line in lines if line.startswith("RUNS")).split()
    assert runs[1] == "True" and float(runs[2]) < 1e-3, runs
    return loaded, warned


@pytest.mark.parametrize("case, setup, cause", [
    ("not a library", "open('broken.so', 'w').write('not an ELF file')\n"
     "native._origin = lambda module: 'broken.so'", "OSError"),
    ("another library", "native._origin = lambda module: ctypes.util.find_library('m')",
     "undefined symbol: cc_jaxlib_version"),
    ("another jaxlib", "import jaxlib; jaxlib.__version__ = '0.0.1'",
     "running under jaxlib 0.0.1"),
])
def test_an_unusable_library_warns_once_and_the_network_runs(case, setup, cause, tmp_path):
    from cellcount_jax import native
    if case == "another jaxlib" and native._origin("cellcount_jax._native") is None:
        pytest.skip("the native library is not built here")
    loaded, warned = _run(setup, tmp_path)
    assert "True" not in loaded, loaded
    assert warned and all("RuntimeWarning" in w and cause in w and "XLA formulation" in w
                          for w in warned), warned
    # One warning per library (_native, _dnnl), however often the loaders are asked.
    assert 1 <= len(warned) <= 2


def test_a_usable_library_loads_silently_and_keeps_onednn_local(tmp_path):
    from cellcount_jax import native
    if native._origin("cellcount_jax._dnnl") is None or native._libdnnl() is None:
        pytest.skip("the oneDNN library is not built or installed here")
    loaded, warned = _run("", tmp_path)
    assert not warned, warned
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import ctypes
        from cellcount_jax import native
        assert native._dnnl_library() is not None or native.bf16_units() is None
        print(hasattr(ctypes.CDLL(None), "dnnl_engine_create"),
              "libdnnl" in open("/proc/self/maps").read())
    """)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]  # loaded, its symbols not global
