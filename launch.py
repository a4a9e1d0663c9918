"""Trains, evaluates or applies a cell counter from an ml_collections config.

    python launch.py --config=configs/quickstart.py --workdir=workdir/quickstart
    python launch.py --config=configs/quickstart.py --config.train.steps=50 --workdir=...
    python launch.py --mode=evaluate --config=configs/quickstart.py --workdir=...
    python launch.py --mode=predict --config=... --workdir=... --input=images/ --output=out/

A rerun with the same --workdir resumes from its latest checkpoint.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from cellcount_jax import predict, train

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.py")
config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", "workdir/quickstart", "Checkpoints and results go here.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"],
                  "train (then evaluate), evaluate, or predict on --input.")
flags.DEFINE_string("input", None, "predict: a folder of images or one PNG/TIFF file.")
flags.DEFINE_string("output", None, "predict: where results go (default <workdir>/predictions).")
flags.DEFINE_string("annotations", "", "predict: optional ground truth: a folder of dot CSVs "
                    "or masks, or one such file for a single --input file.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # progress is printed by the library
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
        train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
        if not FLAGS.input:
            raise app.UsageError("--mode=predict needs --input (a folder or an image file)")
        predict.predict_cli(FLAGS.config, FLAGS.workdir, FLAGS.input,
                            FLAGS.output or os.path.join(FLAGS.workdir, "predictions"),
                            FLAGS.annotations)


if __name__ == "__main__":
    app.run(main)
