"""Figures written next to a run's other outputs."""

from __future__ import annotations

import collections
import glob
import os
import textwrap

import numpy as np

from fedinf_jax.core import files, runtime


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All scalar summaries in ``workdir``'s TensorBoard event files: name -> (steps, values).

    Later events win where a resumed run rewrote a step.
    """

    tf = runtime.tensorflow()
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
    plt = _pyplot()
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
    return _save(fig, path)


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` samples of each class, class by class."""
    return np.concatenate([np.flatnonzero(labels == c)[:n] for c in np.unique(labels)])


def plot_sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    path: str,
    title: str = "",
    row_names: dict[int, str] | None = None,
) -> str:
    """One row per class, its samples side by side (the paper's Figure 2 layout).

    Args:
      images: uint8 (N, H, W).
      labels: (N,) class of each image; rows are the classes in increasing order, each holding
        that class's images in their order.
      row_names: a row's label by class (default: the class).

    Returns:
      ``path``.
    """
    plt = _pyplot()
    classes = np.unique(labels)
    cols = max(int(np.sum(labels == c)) for c in classes)
    h, w = images.shape[1:3]
    grid = np.full((len(classes) * (h + 2), cols * (w + 2)), 255, np.uint8)
    for r, c in enumerate(classes):
        for j, image in enumerate(images[labels == c]):
            grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, j * (w + 2) + 1 : j * (w + 2) + 1 + w] = (
                image
            )
    names = [(row_names or {}).get(int(c), str(c)) for c in classes]
    margin = 0.07 * max(len(n) for n in names) if row_names else 0.0
    fig, ax = plt.subplots(figsize=(1.0 + margin + 0.45 * cols, 0.3 + 0.45 * len(classes)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([r * (h + 2) + 1 + h / 2 for r in range(len(classes))], names)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, width=max(24, 7 * cols))), fontsize=8)
    return _save(fig, path)


def plot_trajectory(
    trajectory: np.ndarray,
    times: np.ndarray,
    labels: np.ndarray,
    path: str,
    title: str = "",
    per_class: int = 1,
) -> str:
    """The reverse process of the first ``per_class`` samples of each class: one row per sample,
    one column per saved time (from t = T on the left to t_end on the right), under ``title``.

    Args:
      trajectory: uint8 (S, N, H, W); times: (S,) diffusion times; labels: (N,).
    """
    plt = _pyplot()
    rows = first_per_class(labels, per_class)
    s, (h, w) = len(times), trajectory.shape[2:4]
    fig, axes = plt.subplots(
        len(rows), s, figsize=(0.6 * s + 0.6, 0.6 * len(rows) + 0.4), squeeze=False
    )
    for r, i in enumerate(rows):
        for j in range(s):
            ax = axes[r, j]
            ax.imshow(trajectory[j, i].reshape(h, w), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={times[j]:.2g}", fontsize=6)
            if j == 0:
                ax.set_ylabel(str(labels[i]), rotation=0, labelpad=8)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def plot_weights(
    weights: np.ndarray, times: np.ndarray, labels: np.ndarray, path: str, title: str = ""
) -> str:
    """The aggregator's agent weights w_i(t) along the reverse process of the first sample of
    each class: one panel per sample, one line per agent, t from T (left) to t_end (right).

    Args:
      weights: (S, K, N); times: (S,) diffusion times; labels: (N,).
    """
    plt = _pyplot()
    rows = first_per_class(labels, 1)
    cols = min(5, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(2.2 * cols + 1.2, 1.8 * nrows + 0.6), squeeze=False, sharey=True
    )
    cmap = plt.get_cmap("tab10")
    for ax, i in zip(axes.flat, rows, strict=False):
        for k in range(weights.shape[1]):
            ax.plot(times, weights[:, k, i], color=cmap(k % 10), lw=1.2, label=f"agent {k}")
        ax.set_xlim(times[0], times[-1])
        ax.set_ylim(0, 1)
        ax.set_title(f"digit {labels[i]}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("t", fontsize=7)
    axes[0, 0].set_ylabel("weight", fontsize=7)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path, rect=(0, 0, 0.9, 1))


def plot_study_errors(
    series: dict[str, list[tuple[int, float]]], orders: dict[str, float], path: str
) -> str:
    """A solver study's error to the reference against score evaluations, log-log, one panel
    per method and one line per series (``study.series_points``: "method-solver-schedule or
    adaptive-aggregator"), each labelled with its fitted order; saved as a PNG. Returns
    ``path``."""
    plt = _pyplot()
    methods = sorted({name.split("-", 1)[0] for name in series}) or ["no finished cells"]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.5), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for name, points in sorted(series.items()):
            if name.split("-", 1)[0] != method:
                continue
            x, y = np.array(points, dtype=float).T
            order = f" (order {orders[name]:.2f})" if name in orders else ""
            ax.plot(x, y, "o-", ms=3, lw=1, label=name.split("-", 1)[1] + order)
        ax.set(xscale="log", yscale="log", xlabel="score evaluations", title=method)
        ax.set_ylabel("RMS error to the reference")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return _save(fig, path)


def plot_study_steps(steps: dict[str, tuple[np.ndarray, np.ndarray]], path: str) -> str:
    """A solver study's stiffness map: the step size each adaptive cell's controller took
    against the diffusion time it ended at (``study.adaptive_steps``: {cell: (end times,
    lengths)}), log-log, one line per cell; saved as a PNG. Returns ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (ends, sizes) in sorted(steps.items()):
        ax.plot(ends, sizes, ".-", ms=2, lw=0.8, label=name)
    ax.set(xscale="log", yscale="log", xlabel="diffusion time t (the solve runs from T to t_end)")
    ax.set_ylabel("accepted step size")
    ax.set_title("adaptive steps" if steps else "no finished adaptive cells")
    ax.invert_xaxis()
    if steps:
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_sweep(rows: list[dict], path: str, title: str) -> str:
    """A sweep over partitions (``pipeline.sweep_summary`` rows): accuracy, noise rate and FID
    per partition (in the sweep's order, left to right) with one line per procedure and error
    bars of one standard error over the seeds; saved as a PNG. Returns ``path``."""
    plt = _pyplot()
    partitions = list(dict.fromkeys(r["partition"] for r in rows))
    metrics = [("accuracy", "accuracy"), ("noise_rate", "noise rate"), ("fid", "FID")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(partitions))
    for procedure in dict.fromkeys(r["procedure"] for r in rows):
        mine = {r["partition"]: r for r in rows if r["procedure"] == procedure}
        at = [i for i, p in enumerate(partitions) if p in mine]
        for ax, (key, _) in zip(axes, metrics, strict=True):
            values = [mine[partitions[i]][key] for i in at]
            errors = [mine[partitions[i]][f"{key}_se"] for i in at]
            ax.errorbar(
                x[at], values, yerr=errors, fmt="o-", ms=3, lw=1, capsize=2, label=procedure
            )
    for ax, (_, label) in zip(axes, metrics, strict=True):
        ax.set_xticks(x, partitions, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: mean +- one standard error over seeds", fontsize=9)
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, rect=None) -> str:
    """Writes the figure atomically (``files.atomic_path``): never a half-written figure.
    ``rect``: the part of the figure the panels fill (the rest is left to a legend)."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    try:
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
    finally:
        plt.close(fig)
    return path
