"""Writing the runs shipped with the project (``pretrain.py``, ``make pretrained``): a trained
federation's EMA parameters, or the evaluation classifier's checkpoint, exported with its record
(``fedinf_jax.agents.pretrained`` reads and verifies them), and the cheap check that the recorded
training starts on the same path again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fedinf_jax.agents import checkpoint, pretrained, runs
from fedinf_jax.core import files
from fedinf_jax.evaluation import classifier
from fedinf_jax.workflows import plots, train_lib


def git_commit() -> str:
    """HEAD's commit of the project's repository, with ``-dirty`` when the tree has changes;
    "unknown" outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def _file_digests(run_dir: str) -> dict[str, str]:
    found = {}
    for parent, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, run_dir)
            if rel != pretrained.MANIFEST:
                found[rel] = pretrained.sha256_file(path)
    return dict(sorted(found.items()))


def _write(dest: str, fill, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes a shipped run to ``dest`` whole or not at all: ``fill(folder)`` writes its files,
    then the manifest with their digests. A run shipped there before is replaced; the log says
    whether its arrays were bitwise the new ones."""
    if pretrained.is_shipped(dest):
        before = pretrained.read_manifest(dest).get("params_sha256")
        same = before == manifest["params_sha256"]
        logging.info(
            "%s: the arrays are %s the shipped ones (params_sha256 %s, shipped %s); replacing it",
            dest,
            "bitwise" if same else "NOT bitwise",
            manifest["params_sha256"][:12],
            str(before)[:12],
        )
    with files.atomic_path(dest, folder=True) as tmp:
        fill(tmp)
        manifest = dict(manifest, files=_file_digests(tmp))
        files.write_json(os.path.join(tmp, pretrained.MANIFEST), manifest)
    return manifest


def export_federation(
    workdir: str, dest: str, preset: str, name: str, record: dict[str, str]
) -> dict[str, Any]:
    """Writes the latest checkpoint's EMA parameters of the run in ``workdir`` as a shipped run
    at ``dest`` (replacing one there once complete), ``record`` (the commands that made it) in
    its manifest. Returns the manifest."""

    step = checkpoint.latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint.checkpoint_dir(workdir)}")
    meta = checkpoint.read_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    num_agents = int(meta["num_agents"])
    abstract = runs.abstract_agent_params(runs.resolve_score(config).model, num_agents)
    params = checkpoint.restore_params(workdir, abstract, step, "ema_params")
    params = jax.tree.map(np.asarray, params)
    manifest = {
        "kind": "federation",
        "preset": preset,
        "name": name,
        **record,
        "commit": git_commit(),
        "step": int(step),
        "num_agents": num_agents,
        "params_per_agent": runs.count_params(params) // num_agents,
        "params_sha256": pretrained.params_sha256(params),
        "counts": meta.get("counts"),
        # The mean training loss as logged (train.log_every): [[step, loss], ...].
        "loss": _logged_loss(workdir),
        "config": meta["config"],
    }

    def fill(folder: str) -> None:
        manager = checkpoint.make_manager(folder, keep=1)
        try:
            checkpoint.save(manager, step, {"ema_params": params}, meta)
        finally:
            manager.close()

    return _write(dest, fill, manifest)


def _logged_loss(workdir: str) -> list[list[float]]:

    steps, values = plots.read_scalars(workdir).get("loss", ((), ()))
    return [[int(step), float(value)] for step, value in zip(steps, values, strict=True)]


def check_first_steps(run_dir: str, steps: int) -> bool:
    """Trains the first ``steps`` steps of the shipped federation's recorded config in a
    temporary folder and compares the loss logged at ``steps`` with its record (logs both):
    whether regenerating it would start on the same path.

    Raises:
      pretrained.ShippedFileError: a shipped file is missing or damaged.
      pretrained.ShippedRunError: the record has no loss logged at ``steps``.
    """

    manifest = pretrained.verify(run_dir)
    if manifest is None:
        raise pretrained.ShippedRunError(
            f"{run_dir} is not a shipped run (no {pretrained.MANIFEST})"
        )
    recorded = {int(step): value for step, value in manifest.get("loss", [])}
    if steps not in recorded:
        raise pretrained.ShippedRunError(
            f"{run_dir} records its loss at steps {sorted(recorded)[:4]}... (every "
            f"train.log_every); {steps} is not one of them"
        )
    config = ml_collections.ConfigDict(manifest["config"])
    with tempfile.TemporaryDirectory() as tmp:
        train_lib.train(config, tmp, stop_at=steps)
        steps_at, values = plots.read_scalars(tmp)["loss"]
    again = float(values[list(steps_at).index(steps)])
    same = again == recorded[steps]
    logging.info(
        "%s: loss at step %d %r, recorded %r: %s",
        run_dir,
        steps,
        again,
        recorded[steps],
        "bitwise the same" if same else f"differs by {again - recorded[steps]:.3g}",
    )
    return same


def export_classifier(
    clf_dir: str, dest: str, preset: str, record: dict[str, str]
) -> dict[str, Any]:
    """Copies the evaluation classifier's checkpoint in ``clf_dir`` as a shipped run at
    ``dest``, ``record`` in its manifest. Returns the manifest."""

    clf = classifier.load_classifier(clf_dir)
    if clf is None:
        raise FileNotFoundError(f"no classifier under {checkpoint.checkpoint_dir(clf_dir)}")
    step = checkpoint.latest_step(clf_dir)
    meta = checkpoint.read_meta(clf_dir, step)
    manifest = {
        "kind": "classifier",
        "preset": preset,
        "name": "classifier",
        **record,
        "commit": git_commit(),
        "step": int(step),
        "test_accuracy": clf.test_accuracy,
        "params": runs.count_params(clf.params),
        "params_sha256": pretrained.params_sha256(clf.params),
        "config": meta["config"],
    }

    def fill(folder: str) -> None:
        src = os.path.join(checkpoint.checkpoint_dir(clf_dir), str(step))
        shutil.copytree(src, os.path.join(folder, checkpoint.CHECKPOINT_DIR, str(step)))

    return _write(dest, fill, manifest)
