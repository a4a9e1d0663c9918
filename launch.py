"""Trains or evaluates a cell counter from an ml_collections config.

    python launch.py --config=configs/quickstart.py --workdir=/tmp/cellcount_quickstart
    python launch.py --config=configs/quickstart.py --config.train.steps=50 --workdir=...
    python launch.py --mode=evaluate --config=configs/quickstart.py --workdir=...

A rerun with the same --workdir resumes from its latest checkpoint.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from cellcount_jax import train

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.py")
config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", "workdir/quickstart", "Checkpoints and results go here.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "train (then evaluate) or evaluate.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # progress is printed by the library
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
