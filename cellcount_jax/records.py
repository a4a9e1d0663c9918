"""Run records in the workdir, written by process 0 only: `metrics.jsonl` (one JSON object per
log step), TensorBoard event files under `tensorboard/` (tensorboardX: no TensorFlow or
PyTorch needed), and `training.png`, the loss terms and the periodic held-out F1 against
the step.
"""
import json
import math
import os

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOT = "training.png"


class Records:
    """`write(step, scalars)` appends a line to metrics.jsonl and the scalars to TensorBoard.

    A resumed run drops the lines of steps after `resume_step` (written by the interrupted run
    after its last checkpoint), so each step appears once. `enabled=False` (processes other
    than 0) writes nothing.
    """

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = os.path.join(workdir, METRICS)
        kept = [line for line in read_metrics(workdir) if line.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in kept)
        self.file = open(self.path, "a", buffering=1)
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it
        self.tb = SummaryWriter(os.path.join(workdir, TENSORBOARD), purge_step=resume_step + 1,
                                flush_secs=30)

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self.file.write(json.dumps({"step": int(step), **{
            k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}) + "\n")
        for k, v in clean.items():
            self.tb.add_scalar(k, v, int(step))

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_metrics(workdir: str):
    """The lines of `<workdir>/metrics.jsonl` as dicts ([] if there is none)."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed run
                    continue
    return out


def plot(workdir: str):
    """`training.png`: loss terms (log scale) and, where evaluated, held-out F1 against the
    step. Returns its path, or None without records."""
    lines = read_metrics(workdir)
    if not lines:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    steps = lambda key: [(l["step"], l[key]) for l in lines
                         if isinstance(l.get(key), (int, float)) and l[key] > 0]
    for key in ("loss", "supervised", "consistency"):
        pts = steps(key)
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    f1 = [(l["step"], 100 * l["eval_f1"]) for l in lines if isinstance(l.get("eval_f1"), float)]
    if f1:
        ax2 = ax.twinx()
        ax2.plot(*zip(*f1), "o-", color="black", label="held-out F1 (%)")
        ax2.set_ylabel("held-out F1 (%)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    path = os.path.join(workdir, PLOT)
    fig.savefig(path)
    plt.close(fig)
    return path
