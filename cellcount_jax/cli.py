"""The `cellcount` command (and `launch.py`): train, evaluate, predict.

    cellcount train [--config=NAME|FILE] [--workdir=DIR] [--images=DIR --dots=DIR [--roi=DIR]
                    [--test-images=DIR --test-dots=DIR [--test-roi=DIR]]] [--minutes=N]
                    [--config.<block>.<field>=VALUE ...] [--distributed | --coordinator=HOST:PORT
                    --num_processes=N --process_id=I]
    cellcount evaluate --workdir=DIR [--tta | --notta] [--zooms=Z,Z,...]
    cellcount predict --model=DIR --input=FILE|DIR|ZARR [--output=DIR] [--annotations=FILE|DIR
                      [--roi=FILE|DIR]] [--tile=N[,N,N]] [--context=N[,N,N]] [--spacing=Z,Y,X]
                      [--diameter=D|auto] [--density=tif|zarr|none]
                      [--workers=N | --scheduler=tcp://HOST:PORT]
    cellcount annotate IMAGE [--points=FILE.csv] [--model=DIR [--spacing=Z,Y,X]] [--port=N]
                       [--host=ADDRESS] [--ndim=2|3] [--grid=[Z,]Y,X]

A config is a shipped one by name (`quickstart`, `vgg2d_cpu`, ...: the files of `configs/`)
or a path to a Python file with `get_config()`. A model is a model folder (a training
workdir) or a shipped one by name (`pretrained/vgg2d_cpu`). An input problem prints one line
`error: ...` on stderr and exits with status 2 (`--verbose`: with its traceback).
"""
import glob
import os
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from cellcount_jax import allocator
from cellcount_jax import configs as shipped_configs
from cellcount_jax import pretrained as shipped_models
from cellcount_jax.errors import InputError

COMMANDS = ("train", "evaluate", "predict", "annotate")
FLAGS = flags.FLAGS


def config_names():
    folder = os.path.dirname(shipped_configs.__file__)
    return sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(folder, "*.py")) if "__" not in p)


def config_path(name: str) -> str:
    """A config file path: `name` itself if it is a file, else the shipped config of that name
    (`vgg2d_cpu`, `configs/vgg2d_cpu.py`)."""
    base = name.split(":")[0]
    if os.path.isfile(base):
        return name
    stem = os.path.splitext(os.path.basename(base))[0]
    path = os.path.join(os.path.dirname(shipped_configs.__file__), f"{stem}.py")
    if os.path.isfile(path):
        return path + name[len(base):]
    raise InputError(f"--config={name}: no such file and no shipped config of that name "
                     f"(shipped: {', '.join(config_names())})")


def model_path(name: str) -> str:
    """A model folder: `name` itself if it is a folder, else the shipped model of that name
    (`pretrained/vgg2d_cpu` or `vgg2d_cpu`)."""
    if os.path.isdir(name):
        return name
    stem = os.path.basename(os.path.normpath(name))
    path = os.path.join(os.path.dirname(shipped_models.__file__), stem)
    if os.path.isdir(path):
        return path
    raise InputError(f"--model={name}: no such model folder")


def _resolve_config_flag(argv):
    """Rewrites `--config=NAME` / `--config NAME` to the file of a shipped config; with
    `--images` and no `--config`, the config is `folder2d`."""
    out = list(argv)
    if (any(a.startswith("--images") for a in out)
            and not any(a == "--config" or a.startswith("--config=") for a in out)):
        out.insert(1, "--config=folder2d")
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + config_path(a[len("--config="):])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
    return out


def define_flags():
    default = os.path.join(os.path.dirname(shipped_configs.__file__), "quickstart.py")
    config_flags.DEFINE_config_file(
        "config", default, "train: a shipped config by name (" + ", ".join(config_names())
        + ") or a config file; fields can be overridden with --config.<block>.<field>=VALUE.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "train: the model folder to write (default "
                        "workdir/<config name>); evaluate: the model folder.")
    flags.DEFINE_string("images", None, "train: a folder of your images (shortcut for "
                        "--config.data.source=folder --config.data.images=...; without "
                        "--config, the folder2d config).")
    flags.DEFINE_string("dots", None, "train: a folder of <image stem>.csv dot files or masks.")
    flags.DEFINE_string("roi", None, "train: a folder of regions of interest of partly dotted "
                        "images (<stem>.csv boxes y0,x0,y1,x1 or <stem>.tif masks); the "
                        "supervised loss sees only those regions. predict: regions of the "
                        "--annotations (a folder, or one file for one --input file); the "
                        "scores count only inside them.")
    flags.DEFINE_string("test-images", None, "train: a folder of held-out images.")
    flags.DEFINE_string("test-dots", None, "train: annotations of the held-out images.")
    flags.DEFINE_string("test-roi", None, "train: regions of interest of the held-out images.")
    flags.DEFINE_float("minutes", None, "train: fit the schedule (steps, SGDR periods, ramp) to "
                       "this many minutes of training from the step rate measured after "
                       "compilation (config.train.minutes; 0: config.train.steps as given).")
    flags.DEFINE_bool("allow_config_change", False, "train: resume a workdir whose model, data "
                      "or target config differs from its config.json.")
    flags.DEFINE_string("model", None, "predict, annotate: a model folder (a training workdir) "
                        "or a shipped model (pretrained/vgg2d_cpu); annotate offers its "
                        "detections as proposals.")
    flags.DEFINE_string("input", None, "predict: a folder of images, one PNG/TIFF/BigTIFF file, a "
                        "zarr / OME-Zarr, or (3D models) a folder of 2D planes as one z-stack.")
    flags.DEFINE_string("output", "predictions", "predict: where results go.")
    flags.DEFINE_string("annotations", "", "predict: optional ground truth: a folder of dot "
                        "CSVs or masks, or one such file for a single --input file.")
    flags.DEFINE_string("tile", None, "predict: voxels per axis that each tile owns (one "
                        "number or one per axis, e.g. 64,256,256; default: the model's).")
    flags.DEFINE_string("context", None, "predict: voxels of context the network sees around "
                        "a tile on each side (default: the model's).")
    flags.DEFINE_string("spacing", None, "predict, annotate: the input's voxel spacing (z,y,x) when it "
                        "differs from the model's: resampled to the model's for the network.")
    flags.DEFINE_string("diameter", None, "predict: the cells' typical diameter where they are "
                        "larger or smaller than the model's training cells (in the units of "
                        "--spacing; without it, in pixels), or 'auto' to estimate it on each "
                        "image: the input is resampled so that its cells have the training "
                        "cells' size, and detections come back in its pixels.")
    flags.DEFINE_enum("density", "tif", ["tif", "zarr", "none"], "predict: the density map as "
                      "a (Big)TIFF, an OME-Zarr (needs '.[big]') or not at all.")
    flags.DEFINE_integer("workers", 0, "predict: run the tiles on a local Dask cluster of this "
                         "many worker processes (needs '.[big]').")
    flags.DEFINE_string("scheduler", "", "predict: run the tiles on the Dask cluster of this "
                        "scheduler address (tcp://host:port), e.g. one started by dask-jobqueue.")
    flags.DEFINE_bool("progress", True, "predict: a progress bar (tiles, voxels/s, ETA).")
    flags.DEFINE_bool("tta", None, "evaluate: recalibrate and score with (--tta) or without "
                      "(--notta) test-time augmentation (the mean over the image's flips), and "
                      "keep it in the model folder for predict (default: the folder's setting).")
    flags.DEFINE_string("zooms", None, "evaluate: recalibrate choosing the input zoom among "
                        "these (e.g. 1,1.03,1.06,1.09: the network sees each image resampled "
                        "by the zoom) and keep them in the folder's config (default: its "
                        "predict.zooms).")
    flags.DEFINE_bool("distributed", False, "train, evaluate: one process of a multi-process "
                      "job (jax.distributed): on TPU pods, SLURM and Open MPI nothing else is "
                      "needed; elsewhere give --coordinator, --num_processes and --process_id "
                      "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).")
    flags.DEFINE_string("coordinator", "", "train, evaluate: HOST:PORT of process 0 of a "
                        "multi-process job (implies --distributed).")
    flags.DEFINE_integer("num_processes", None, "train, evaluate: processes in the job.")
    flags.DEFINE_integer("process_id", None, "train, evaluate: this process's index, 0 to "
                         "num_processes - 1; process 0 prints and writes the model folder.")
    flags.DEFINE_string("points", "", "annotate: the dots CSV to edit (default: beside the "
                        "image, <image stem>.csv); created on the first edit.")
    flags.DEFINE_integer("port", 8765, "annotate: the port of the page.")
    flags.DEFINE_string("host", "127.0.0.1", "annotate: the address to serve on (default this "
                        "machine only; reach it from elsewhere through an SSH tunnel).")
    flags.DEFINE_string("token", None, "annotate: the token the page and the API need (default "
                        "$CELLCOUNT_TOKEN, else a new random one); printed in the URL.")
    flags.DEFINE_bool("no-token", False, "annotate: serve without a token (only with a "
                      "loopback --host, on a machine whose other users you trust).")
    flags.DEFINE_multi_string("allow-host", [], "annotate: a further name the page may be "
                              "opened under (the Host header), e.g. the node's name; repeat "
                              "for several; '*' for any (then only the token protects it).")
    flags.DEFINE_integer("ndim", 0, "annotate: 2 (an image) or 3 (a stack); 0 guesses from the "
                         "file.")
    flags.DEFINE_string("grid", None, "annotate: regions per axis ([z,]y,x) that are ticked "
                        "off as reviewed (default: regions of about 256 pixels, 32 slices); a "
                        "reopened file keeps its grid.")
    flags.DEFINE_bool("verbose", False, "Show tracebacks of input errors.")


def _train_config():
    config = FLAGS.config
    if FLAGS.images:
        config.data.source = "folder"
        config.data.images = FLAGS.images
        config.data.annotations = FLAGS.dots or ""
        config.data.test_images = FLAGS["test-images"].value or ""
        config.data.test_annotations = FLAGS["test-dots"].value or ""
        # Set only when given: a config file of the user's may predate these fields.
        if FLAGS.roi:
            config.data.roi = FLAGS.roi
        if FLAGS["test-roi"].value:
            config.data.test_roi = FLAGS["test-roi"].value
    elif any(FLAGS[k].value for k in ("dots", "roi", "test-images", "test-dots", "test-roi")):
        raise InputError("--dots, --roi, --test-images, --test-dots and --test-roi go with "
                         "--images")
    if FLAGS.minutes is not None:
        if FLAGS.minutes < 0:
            raise InputError(f"--minutes must be >= 0, got {FLAGS.minutes}")
        config.train.minutes = FLAGS.minutes
    if FLAGS["test-images"].value and not FLAGS["test-dots"].value:
        raise InputError("--test-images needs --test-dots (the held-out images' annotations)")
    if FLAGS["test-roi"].value and not FLAGS["test-images"].value:
        raise InputError("--test-roi goes with --test-images")
    return config


def run(command: str):
    """Runs one command with the parsed flags."""
    from cellcount_jax import distributed, predict, train  # after flag parsing: fast --help

    asked = [f"--{k}" for k in ("distributed", "coordinator", "num_processes", "process_id")
             if FLAGS[k].present]
    if command in ("predict", "annotate") and asked:
        raise InputError(f"{', '.join(asked)}: go with train and evaluate (predict spreads its "
                         f"tiles with --workers or --scheduler, on Dask)")
    if command in ("train", "evaluate") and distributed.initialize(
            FLAGS.distributed, FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id):
        if not distributed.is_lead():  # process 0 speaks for the job
            warnings.simplefilter("ignore")
            logging.set_verbosity(logging.ERROR)
    if command == "annotate":
        return _annotate()
    if command == "train":
        config = _train_config()
        workdir = FLAGS.workdir or os.path.join(
            "workdir", os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0])
        return train.train_and_evaluate(config, workdir, FLAGS.allow_config_change)
    if command == "evaluate":
        if not FLAGS.workdir:
            raise InputError("evaluate needs --workdir (a model folder)")
        try:
            zooms = [float(z) for z in FLAGS.zooms.split(",")] if FLAGS.zooms else None
        except ValueError:
            raise InputError(f"--zooms must be numbers separated by commas, got {FLAGS.zooms!r}")
        return train.evaluate_workdir(FLAGS.workdir, FLAGS.tta, zooms)
    model = FLAGS.model or FLAGS.workdir
    if not model:
        raise InputError("predict needs --model (a model folder)")
    if not FLAGS.input:
        raise InputError("predict needs --input (a folder or an image file)")
    return predict.predict_folder(
        model_path(model), FLAGS.input, FLAGS.output, FLAGS.annotations, FLAGS.roi or "",
        workers=FLAGS.workers, scheduler=FLAGS.scheduler, tile=_numbers("tile", int),
        context=_numbers("context", int), spacing=_numbers("spacing", float),
        diameter=_diameter(), density=FLAGS.density, progress=FLAGS.progress)


def _diameter():
    """--diameter as a number, 'auto', or None when not given."""
    text = FLAGS.diameter
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--diameter={text}: expected the cells' diameter (a number) or "
                         f"'auto'") from None


def _annotate():
    from cellcount_jax import annotate

    if not FLAGS.input:
        raise InputError("annotate needs an image: cellcount annotate IMAGE")
    path = FLAGS.input.rstrip("/")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such image, stack or folder")
    if FLAGS.ndim not in (0, 2, 3):
        raise InputError(f"--ndim={FLAGS.ndim}: 2 or 3 (or 0 to guess)")
    ndim = FLAGS.ndim or annotate.guess_ndim(path)
    stem = path[:-len(".ome.tif")] if path.lower().endswith(".ome.tif") else (
        os.path.splitext(path)[0])
    if FLAGS.spacing and not FLAGS.model:
        raise InputError("--spacing goes with --model (the image's spacing, for the model)")
    grid = _numbers("grid", int)
    return annotate.serve(path, FLAGS.points or stem + ".csv", ndim, FLAGS.host, FLAGS.port,
                          model_path(FLAGS.model) if FLAGS.model else None,
                          _numbers("spacing", float), (grid,) if isinstance(grid, int) else grid,
                          token=FLAGS.token, require_token=not FLAGS["no-token"].value,
                          allow_hosts=FLAGS["allow-host"].value)


def _numbers(name, kind):
    """A comma-separated flag as a tuple of numbers (None when not given)."""
    text = FLAGS[name].value
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.strip("()[] ").split(",") if v.strip())
    except ValueError as e:
        raise InputError(f"--{name}={text}: expected comma-separated numbers") from e
    if not values:
        raise InputError(f"--{name}={text}: expected comma-separated numbers")
    return values[0] if len(values) == 1 else values


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _flag_errors(fn, argv):
    """fn(), where any failure is the user's (a flag, a config file, an override): reported
    in one line."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        if "--verbose" in argv:
            raise
        text = str(e).strip().strip("'\"") or type(e).__name__
        if isinstance(e, (AttributeError, KeyError)):
            text = f"the config has no field {text!r}"
        _fail(text.splitlines()[0])


def _parse(argv):
    return _flag_errors(lambda: FLAGS(argv), argv)


def _guarded(command_fn):
    def main(argv):
        if len(argv) > 1:
            _fail(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)  # progress is printed by the library
        warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
        try:
            command_fn()
        except InputError as e:
            if FLAGS.verbose:
                raise
            _fail(str(e))
    return main


USAGE = __doc__.split("\n\n")[1]


def main(argv=None):
    """Entry point of the installed `cellcount` command (argv None: the process's own command
    line, run under tcmalloc where it is installed: `allocator.ensure`)."""
    if argv is None:
        allocator.ensure()
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print("usage:\n" + USAGE + "\n\n`cellcount COMMAND --help` lists every flag.")
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv.pop(1)
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    if command == "annotate" and len(argv) > 1 and not argv[1].startswith("-"):
        argv[1] = "--input=" + argv[1]  # cellcount annotate IMAGE
    # config_flags reads sys.argv when its flag is defined: it gets the resolved arguments.
    sys.argv = _flag_errors(lambda: _resolve_config_flag(argv), argv)
    _flag_errors(define_flags, sys.argv)
    app.run(_guarded(lambda: run(command)), argv=sys.argv, flags_parser=_parse)


def launch_main():
    """Entry point of `launch.py`: the same flags, the command chosen by `--mode`."""
    allocator.ensure()
    sys.argv = _flag_errors(lambda: _resolve_config_flag(sys.argv), sys.argv)
    _flag_errors(define_flags, sys.argv)
    flags.DEFINE_enum("mode", "train", list(COMMANDS), "train (then evaluate), evaluate, or "
                      "predict on --input.")
    app.run(_guarded(lambda: run(FLAGS.mode)), flags_parser=_parse)
