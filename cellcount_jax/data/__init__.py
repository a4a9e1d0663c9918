"""Data: images, dots and regions read from files (`io`), the embedded synthetic generator
(`synthetic`), the training pipeline (`pipeline`: `load(config)` -> `Splits`; `dataset`:
crops, targets and augmentation).

Importing the package, `io` or `synthetic` needs no JAX (Dask workers and the annotation
server read files through `io` alone); the pipeline's names (`load`, `Split`, `Dataset`,
`read_folder`, `synthetic_image`, ...) are taken from `pipeline` on first use.
"""
import importlib

from cellcount_jax.data import io  # noqa: F401

_SUBMODULES = ("io", "synthetic", "dataset", "pipeline")


def __getattr__(name):
    if name.startswith("__") or name in _SUBMODULES:  # submodules: the import system's
        raise AttributeError(f"module 'cellcount_jax.data' has no attribute {name!r}")
    pipeline = importlib.import_module("cellcount_jax.data.pipeline")
    try:
        return getattr(pipeline, name)
    except AttributeError:
        raise AttributeError(f"module 'cellcount_jax.data' has no attribute {name!r}") from None
