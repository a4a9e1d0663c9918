"""A trained model is a folder; everything prediction needs is read from it.

    <workdir>/config.json          the resolved training config, written when training starts
    <workdir>/inference.json       the inference record (below)
    <workdir>/checkpoints/<step>/  orbax checkpoints of the train state
    <workdir>/best_checkpoint/<step>/  with `eval.every`: the parameters of the step that
                                   calibrated best, which prediction uses (record 'selected')
    <workdir>/metrics.jsonl, tensorboard/, training.png    run records (`records`)
    <workdir>/eval.json, eval_per_image.csv, eval_detections.csv    held-out scores

The inference record holds the rank, input channels, voxel spacing, the network's shape, the
fitted normalisation, the target kind and scale (with the mass of one dot's target, for the
integration count), the training crop, the prediction tile and context, whether prediction
averages flips (test-time augmentation), the input zoom, the detector, threshold and crowding
correction once calibrated, the package version, and the training cells' size:

    "cell_size": {"diameter": typical cell diameter, physical units (None without dots),
                  "nearest_dot_distance": median distance between neighbouring dots, physical,
                  "polarity": "bright" or "dark" (cells against their background),
                  "estimator": "log_scale"}     (`cellsize.of_training_set`)

which prediction uses to rescale images whose cells are larger or smaller
(`Predictor.input_zoom`; records written before it have no "cell_size" and predict as
before). `load_model(workdir)` builds a `Predictor` from the folder alone: no config file, no
optimizer.
"""
import json
import os

import jax
import numpy as np
from ml_collections import ConfigDict

from cellcount_jax import cellsize, checkpoints, models
from cellcount_jax.errors import InputError
from cellcount_jax.predictor import Predictor, create_model, tiling_default

CONFIG = "config.json"
RECORD = "inference.json"
FORMAT = 1
# Config blocks that a resumed run must share with the run that wrote the checkpoints.
RESUME_BLOCKS = ("model", "data", "target")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as v
    try:
        return v("cellcount_jax")
    except PackageNotFoundError:
        return "unknown"


def write_json(path: str, obj):
    """Writes atomically: a reader (or a crash) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(old: dict, new: dict, blocks=RESUME_BLOCKS):
    """'key: old -> new' for every field of `blocks` that differs between two configs. A field
    one config lacks equals an off value ('', (), None, 0, False) in the other: fields added
    to the configs later (off by default) keep older runs resumable."""
    a, b = _flatten(old), _flatten(new)
    keys = {k for k in set(a) | set(b) if k.split(".")[0] in blocks}
    missing = object()
    empty = lambda v: v is missing or v in ("", [], None, 0)  # noqa: E731
    diff = [k for k in sorted(keys) if a.get(k, missing) != b.get(k, missing)
            and not (empty(a.get(k, missing)) and empty(b.get(k, missing)))]
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in diff]


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort()) if isinstance(config, ConfigDict) else config


def prepare_workdir(workdir: str, config, allow_config_change: bool = False,
                    write: bool = True):
    """Writes `config.json` when training starts. Where the folder already holds checkpoints
    of a run whose model, data or target fields differ, stops with the list of differences
    (unless `allow_config_change`). `write=False` checks only (processes other than 0 of a
    multi-process job, so that all of them stop together)."""
    if write:
        os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG)
    new = config_to_dict(config)
    has_checkpoints = os.path.isdir(checkpoints.directory(workdir)) and any(
        n.isdigit() for n in os.listdir(checkpoints.directory(workdir)))
    if has_checkpoints and os.path.exists(path) and not allow_config_change:
        diff = config_differences(read_json(path), new)
        if diff:
            raise InputError(
                f"{workdir} holds checkpoints of a run with another config ({path}); differences: "
                + "; ".join(diff) + ". Use another --workdir, or pass --allow_config_change to "
                "resume with the new config on purpose")
    if write:
        write_json(path, new)


def read_config(workdir: str) -> ConfigDict:
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        raise InputError(f"{workdir}: no {CONFIG}; is this a model folder written by training?")
    return ConfigDict(read_json(path))


def new_record(config, splits, mass_per_dot: float) -> dict:
    """The inference record of a run, before calibration (detector None)."""
    train = splits.train
    return {
        "format": FORMAT,
        "package_version": version(),
        "ndim": int(train.ndim),
        "channels": int(train.images[0].shape[-1]),
        "spacing": list(splits.spacing),
        "network": {"name": "SAUNet", "features": int(config.model.features),
                    "levels": models.LEVELS},
        "normalisation": splits.normaliser.to_json(),
        "target": {"kind": config.target.kind, "scale": float(config.target.scale),
                   "sigma": float(config.target.sigma), "mass_per_dot": float(mass_per_dot)},
        "train_crop": [int(c) for c in config.train.crop],
        "tiling": _tiling_of(config),
        "test_time_augmentation": bool((config.get("predict") or {}).get("tta", False)),
        "zoom": 1.0,
        "detector": None,
        "cell_size": cellsize.of_training_set(train.images, train.dots, splits.spacing),
    }


def _tiling_of(config) -> dict:
    """The config's `predict.tile` and `predict.context` in voxels (defaults where empty)."""
    out = tiling_default(config.train.crop, config.model.features)
    block = config.get("predict") or {}
    ndim = len(config.train.crop)
    for key in ("tile", "context"):
        value = tuple(block.get(key) or ())
        if value:
            if len(value) not in (1, ndim) or any(int(v) < (key == "tile") for v in value):
                raise InputError(f"config.predict.{key} must be {ndim} sizes in voxels "
                                 f"(tile >= 1, context >= 0), got {value}")
            out[key] = [int(v) for v in np.broadcast_to(value, (ndim,))]
    return out


def write_record(workdir: str, record: dict):
    write_json(os.path.join(workdir, RECORD), record)


def read_record(workdir: str) -> dict:
    path = os.path.join(workdir, RECORD)
    if not os.path.isdir(workdir):
        raise InputError(f"model folder {workdir} not found")
    if not os.path.exists(path):
        raise InputError(f"{workdir}: no {RECORD}; is this a model folder written by training?")
    record = read_json(path)
    if record.get("format") != FORMAT:
        raise InputError(f"{path}: record format {record.get('format')!r}, this version reads "
                         f"{FORMAT}")
    return record


def load_model(workdir: str) -> Predictor:
    """The model in `workdir` as a `Predictor`: the parameters of the step that calibrated
    best during training where the record names one ('selected', `train.eval.every`), else
    of its newest readable checkpoint."""
    record = read_record(workdir)
    name = checkpoints.BEST if record.get("selected") else checkpoints.CHECKPOINTS
    step, params = checkpoints.restore_params(workdir, name)
    if params is None:
        raise InputError(f"{workdir}: no readable checkpoint in "
                         f"{checkpoints.directory(workdir, name)}")
    return Predictor(create_model(record), jax.device_put(params), record, step)
