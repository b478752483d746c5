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
from typing import Any

import jax
import numpy as np

from fedinf_jax.core import files
from fedinf_jax.core.errors import UserError

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


def cache_root(run_dir: str | os.PathLike) -> str:
    """The folder that caches derived from a run go under (a classifier's features of the test
    digits): the run itself, or for a shipped run, which is never written into,
    ``pretrained/<preset>/<name>`` in the user's cache folder (``files.cache_dir``)."""
    if not is_shipped(run_dir):
        return os.fspath(run_dir)
    manifest = read_manifest(run_dir)
    return files.cache_dir("pretrained", manifest["preset"], manifest["name"])


def output_root(run_dir: str | os.PathLike) -> str:
    """The folder that outputs derived from a run go under by default (sample sets, studies):
    the run itself, or for a shipped run ``runs/pretrained/<preset>/<name>``
    (relative to the current folder), never inside it."""
    if not is_shipped(run_dir):
        return os.fspath(run_dir)
    manifest = read_manifest(run_dir)
    return os.path.join("runs", "pretrained", manifest["preset"], manifest["name"])
