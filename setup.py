"""Builds the optional native CPU kernel (`cellcount_jax/csrc`); metadata is in pyproject.toml.

The kernel is compiled against the XLA FFI headers that jaxlib ships. If it does not build
(no C++ compiler, another platform), the install goes on and the model uses its XLA
formulation.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        import os
        import jaxlib  # build requirement: jaxlib/include holds xla/ffi/api/ffi.h

        for ext in self.extensions:
            ext.include_dirs.append(os.path.join(os.path.dirname(jaxlib.__file__), "include"))
        super().build_extensions()


setup(
    ext_modules=[Extension(
        "cellcount_jax._native", ["cellcount_jax/csrc/conv.cc"],
        language="c++", optional=True,
        extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=fast", "-Wno-return-type",
                            "-Wno-attributes"])],
    cmdclass={"build_ext": BuildExt},
)
