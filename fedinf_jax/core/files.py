"""Writing outputs atomically: a file or a folder appears whole or not at all.

Every writer of the project's outputs (sample sets, JSON records, reports, figures) goes through
``atomic_path``: the content is written under a temporary name beside the target and renamed
over it when complete, so a failure or an interrupt leaves the previous version (or nothing)
in place, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

CACHE_DIR_ENV = "FEDINF_CACHE_DIR"


def cache_dir(*parts: str) -> str:
    """A folder under the user's cache for fedinf_jax (``$FEDINF_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fedinf_jax``, else ``~/.cache/fedinf_jax``): what is kept only to be read
    again (compiled programs, a classifier's features of the test digits) and is never written
    into the current folder or a read-only run."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedinf_jax"
    )
    return os.path.join(root, *parts)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[str]:
    """Yields a fresh temporary path beside ``path`` to write to; when the block completes, the
    temporary file (or, with ``folder``, the temporary folder, created empty) replaces ``path``
    by a rename. On an exception the temporary path is removed and ``path`` is unchanged.

    A folder that exists is moved aside before the rename and removed after it (a folder
    cannot be renamed over a non-empty one); if the rename fails the old folder is put back.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".tmp-{os.path.basename(path)}-"
    if folder:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=parent)
        os.close(fd)
    try:
        yield tmp
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    if not folder:
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would make outputs private
        os.replace(tmp, path)
        return
    backup = None
    if os.path.exists(path):
        backup = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=parent)
        os.replace(path, os.path.join(backup, "previous"))
    try:
        os.replace(tmp, path)
    except BaseException:
        if backup:
            os.replace(os.path.join(backup, "previous"), path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if backup:
            shutil.rmtree(backup, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2))


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``."""
    with open(path) as fh:
        return json.load(fh)
