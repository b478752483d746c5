"""Figures written next to a run's other outputs."""

from __future__ import annotations

import collections
import glob
import os

import numpy as np


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All scalar summaries in ``workdir``'s TensorBoard event files: name -> (steps, values).

    Later events win where a resumed run rewrote a step.
    """
    import tensorflow as tf

    series: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    series[value.tag][event.step] = float(tf.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    series[value.tag][event.step] = value.simple_value
    return {
        tag: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
        for tag, points in series.items()
    }


def plot_training_loss(workdir: str, path: str | None = None) -> str:
    """Per-agent and mean training loss against step (log scale), saved as a PNG.

    Returns:
      The PNG's path (default ``workdir/training_loss.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(workdir)
    path = path or os.path.join(workdir, "training_loss.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    agent_tags = sorted(
        (t for t in scalars if t.startswith("loss/agent_")), key=lambda t: int(t.rsplit("_", 1)[1])
    )
    for tag in agent_tags:
        ax.plot(*scalars[tag], lw=0.8, alpha=0.6, label=tag.split("/")[1])
    if "loss" in scalars:
        ax.plot(*scalars["loss"], color="black", lw=2, label="mean")
    ax.set(xlabel="step", ylabel="DSM loss", yscale="log", title=os.path.basename(workdir))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # never leave a half-written figure
    return path
