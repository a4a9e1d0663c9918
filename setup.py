"""Builds the optional native CPU kernels (`cellcount_jax/csrc`); metadata is in pyproject.toml.

- `_native` (`conv.cc`): float32 AVX-512 convolution kernels, against the XLA FFI headers that
  jaxlib ships.
- `_dnnl` (`dnnl_conv.cc`): bfloat16 convolutions through oneDNN, against the headers and
  library of the onednn-devel-cpu-gomp / onednn-cpu-gomp wheels (a build requirement on
  x86-64 Linux); it runs where the `cpu-bf16` extra (the onednn-cpu-gomp wheel, whose
  libdnnl.so.3 is loaded first) is installed.

If one does not build (no C++ compiler, no oneDNN, another platform), the install goes on and
the model uses its XLA formulation there.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = ["-std=c++17", "-O3", "-Wno-return-type", "-Wno-attributes"]


def onednn_dirs():
    """(include, lib) folders of the oneDNN wheels installed for the build, or None."""
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        dists = [distribution(name) for name in ("onednn-devel-cpu-gomp", "onednn-cpu-gomp")]
    except PackageNotFoundError:
        return None
    found = {}
    for dist in dists:
        for f in dist.files or ():
            if str(f).endswith("oneapi/dnnl/dnnl.hpp"):
                found["include"] = os.path.dirname(os.path.dirname(os.path.dirname(
                    os.path.abspath(dist.locate_file(f)))))
            if str(f).endswith("libdnnl.so"):
                found["lib"] = os.path.dirname(os.path.abspath(dist.locate_file(f)))
    return (found["include"], found["lib"]) if len(found) == 2 else None


class BuildExt(build_ext):
    def build_extensions(self):
        import jaxlib  # build requirement: jaxlib/include holds xla/ffi/api/ffi.h

        dnnl = onednn_dirs()
        if dnnl is None:
            print("oneDNN not found: the bfloat16 CPU convolutions are not built")
            self.extensions = [e for e in self.extensions if e.name != "cellcount_jax._dnnl"]
        for ext in self.extensions:
            ext.include_dirs.append(os.path.join(os.path.dirname(jaxlib.__file__), "include"))
            # Checked at load against the jaxlib that runs (native.py).
            ext.define_macros.append(("CELLCOUNT_JAXLIB_VERSION", f'"{jaxlib.__version__}"'))
            if ext.name == "cellcount_jax._dnnl":
                ext.include_dirs.append(dnnl[0])
                ext.library_dirs.append(dnnl[1])
        super().build_extensions()


setup(
    ext_modules=[
        Extension("cellcount_jax._native", ["cellcount_jax/csrc/conv.cc", "cellcount_jax/csrc/norm.cc"],
                  depends=["cellcount_jax/csrc/parallel.h"], language="c++",
                  optional=True, extra_compile_args=FLAGS + ["-ffp-contract=fast"]),
        Extension("cellcount_jax._dnnl", ["cellcount_jax/csrc/dnnl_conv.cc"], language="c++",
                  optional=True, extra_compile_args=FLAGS, libraries=["dnnl"]),
    ],
    cmdclass={"build_ext": BuildExt},
)
