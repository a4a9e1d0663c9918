"""Trains, evaluates or applies a cell counter: the `cellcount` command, with the command
chosen by `--mode`.

    python launch.py --config=configs/quickstart.py --workdir=workdir/quickstart
    python launch.py --config=configs/quickstart.py --config.train.steps=50 --workdir=...
    python launch.py --mode=evaluate --workdir=...
    python launch.py --mode=predict --model=WORKDIR --input=images/ --output=out/

A rerun with the same --workdir resumes from its latest checkpoint.
"""
from cellcount_jax import cli

if __name__ == "__main__":
    cli.launch_main()
