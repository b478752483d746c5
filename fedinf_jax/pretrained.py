"""Trained runs shipped with the project (``pretrained/<preset>/<name>``): read-only workdirs.

A shipped run is a workdir like any other, read through the same restore path, holding only
what sampling or evaluation needs: a federation's EMA parameters (``{"ema_params": ...}`` as the
Orbax ``state`` item of its last step, with the run's ``meta`` record), or the evaluation
classifier's checkpoint. Beside it, ``pretrained.json`` records how it was made (the command, the
resolved config, the partition's count matrix, the step, the code's commit, a digest of the
arrays) and a sha256 per file; every reader verifies those first (``verify``), so that a
truncated, corrupted or missing file is named before anything is read, with the command that
regenerates it. Nothing is written inside a shipped run (``check_writable``).

Orbax names its data files at random and stamps each save's time, so a regenerated run's files
are not bitwise the shipped ones; its arrays are, on the same machine, when training is
deterministic: ``params_sha256`` compares them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fedinf_jax import checkpoint, files
from fedinf_jax.errors import UserError

MANIFEST = "pretrained.json"
REGENERATE = "make pretrained"


class ShippedFileError(UserError, OSError):
    """A shipped run's file is missing or differs from its recorded sha256."""


class ShippedRunError(UserError, ValueError):
    """Something asked of a shipped run that it cannot do (train it, write into it, restore
    what it does not keep)."""


def is_shipped(run_dir: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(run_dir), MANIFEST))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def params_sha256(tree) -> str:
    """A digest of a parameter tree's arrays (paths, shapes, dtypes and bytes, in tree order)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    with open(os.path.join(os.fspath(run_dir), MANIFEST)) as f:
        return json.load(f)


def verify(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A shipped run's manifest once every file it lists has its recorded sha256; None for a run
    that is not shipped (no ``pretrained.json``).

    Raises:
      ShippedFileError: a listed file is missing, or its content differs (truncated, corrupted);
        the message names the file and the command that regenerates it.
    """
    run_dir = os.fspath(run_dir)
    if not is_shipped(run_dir):
        return None
    try:
        manifest = read_manifest(run_dir)
        listed = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShippedFileError(
            f"{os.path.join(run_dir, MANIFEST)} cannot be read ({err}); {_restore_hint(run_dir)}"
        ) from None
    for rel, want in sorted(listed.items()):
        path = os.path.join(run_dir, rel)
        if not os.path.isfile(path):
            raise ShippedFileError(f"shipped file {path} is missing; {_restore_hint(run_dir)}")
        if sha256_file(path) != want:
            raise ShippedFileError(
                f"shipped file {path} is damaged ({os.path.getsize(path)} bytes, its sha256 "
                f"differs from the one in {MANIFEST}); {_restore_hint(run_dir)}"
            )
    return manifest


def _restore_hint(run_dir: str) -> str:
    return f"restore it with `git checkout -- {run_dir}` or regenerate it with `{REGENERATE}`"


def check_writable(run_dir: str | os.PathLike, what: str) -> None:
    """Refuses ``what`` (e.g. "training") inside a shipped run.

    Raises:
      ShippedRunError: ``run_dir`` is shipped.
    """
    if is_shipped(run_dir):
        raise ShippedRunError(
            f"{os.fspath(run_dir)} is a shipped run (read-only): {what} writes into it. Give "
            "another folder (--workdir / --outdir), or copy the shipped run first"
        )


def output_root(run_dir: str | os.PathLike) -> str:
    """The folder that outputs derived from a run go under by default (sample sets, studies,
    cached features): the run itself, or for a shipped run ``runs/pretrained/<preset>/<name>``
    (relative to the current folder), never inside it."""
    if not is_shipped(run_dir):
        return os.fspath(run_dir)
    manifest = read_manifest(run_dir)
    return os.path.join("runs", "pretrained", manifest["preset"], manifest["name"])


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
            if rel != MANIFEST:
                found[rel] = sha256_file(path)
    return dict(sorted(found.items()))


def _write(dest: str, fill, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes a shipped run to ``dest`` whole or not at all: ``fill(folder)`` writes its files,
    then the manifest with their digests. A run shipped there before is replaced; the log says
    whether its arrays were bitwise the new ones."""
    if is_shipped(dest):
        before = read_manifest(dest).get("params_sha256")
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
        files.write_json(os.path.join(tmp, MANIFEST), manifest)
    return manifest


def export_federation(
    workdir: str, dest: str, preset: str, name: str, record: dict[str, str]
) -> dict[str, Any]:
    """Writes the latest checkpoint's EMA parameters of the run in ``workdir`` as a shipped run
    at ``dest`` (replacing one there once complete), ``record`` (the commands that made it) in
    its manifest. Returns the manifest."""
    from fedinf_jax import train_lib

    step = checkpoint.latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint.checkpoint_dir(workdir)}")
    meta = checkpoint.read_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    num_agents = int(meta["num_agents"])
    abstract = train_lib.abstract_agent_params(train_lib.resolve_score(config).model, num_agents)
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
        "params_per_agent": train_lib.count_params(params) // num_agents,
        "params_sha256": params_sha256(params),
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
    from fedinf_jax import plots

    steps, values = plots.read_scalars(workdir).get("loss", ((), ()))
    return [[int(step), float(value)] for step, value in zip(steps, values, strict=True)]


def check_first_steps(run_dir: str, steps: int) -> bool:
    """Trains the first ``steps`` steps of the shipped federation's recorded config in a
    temporary folder and compares the loss logged at ``steps`` with its record (logs both):
    whether regenerating it would start on the same path.

    Raises:
      ShippedFileError: a shipped file is missing or damaged.
      ShippedRunError: the record has no loss logged at ``steps``.
    """
    import tempfile

    from fedinf_jax import plots, train_lib

    manifest = verify(run_dir)
    if manifest is None:
        raise ShippedRunError(f"{run_dir} is not a shipped run (no {MANIFEST})")
    recorded = {int(step): value for step, value in manifest.get("loss", [])}
    if steps not in recorded:
        raise ShippedRunError(
            f"{run_dir} records its loss at steps {sorted(recorded)[:4]}... (every "
            f"train.log_every); {steps} is not one of them"
        )
    config = ml_collections.ConfigDict(manifest["config"])
    with tempfile.TemporaryDirectory() as tmp:
        train_lib.train_and_evaluate(config, tmp, stop_at=steps)
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
    from fedinf_jax import train_lib
    from fedinf_jax.evaluation import classifier

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
        "params": train_lib.count_params(clf.params),
        "params_sha256": params_sha256(clf.params),
        "config": meta["config"],
    }

    def fill(folder: str) -> None:
        src = os.path.join(checkpoint.checkpoint_dir(clf_dir), str(step))
        shutil.copytree(src, os.path.join(folder, checkpoint.CHECKPOINT_DIR, str(step)))

    return _write(dest, fill, manifest)
