"""What made an output: the settings that determine it, kept beside it and compared on a rerun.

Every output the project reuses when a command is run again (a training run's checkpoints, the
evaluation classifier, a sample or claim set of ``reproduce.py``, its agreement tables, a solver
study's cells) is written with a record of its *inputs*: a flat ``{"section.field": value}`` dict
of everything that determines it, and their ``digest``. A rerun builds the inputs it would use
and compares (``check_reuse``): the same inputs reuse the output; other inputs stop the run
before any work with one ``error:`` line that names the stage, each changed field (old -> new)
and the two ways on (a fresh output folder, or ``--recompute``, which recomputes exactly the
outputs whose inputs changed and replaces each only once its new version is complete).

The keys of each output are listed in docs/usage.md ("What a rerun reuses").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from fedinf_jax.core.errors import UserError

RECORD_KEY = "made_by"
"""The field of an output's JSON record that holds its inputs and their digest."""


class StaleOutputError(UserError):
    """An output on disk was made with other settings than the rerun asks for."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2, 3]}`` -> ``{"a.b": 1, "c": [2, 3]}``: nested mappings joined
    with dots; sequences become lists (JSON's form, so that a tuple and its JSON copy agree)."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = json.loads(json.dumps(value, default=list))
    return flat


def config_fields(config, fields: Iterable[str]) -> dict[str, Any]:
    """The flat values (``flatten``) of a config's (or a JSON dict's) ``fields``: top-level
    names or sections, e.g. ``("seed", "sampler")``; absent ones are left out."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    return flatten({f: tree[f] for f in fields if f in tree})


def digest(inputs: Mapping[str, Any]) -> str:
    """A short sha256 of ``inputs`` as canonical JSON (sorted keys)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record(inputs: Mapping[str, Any]) -> dict:
    """What an output's JSON stores under ``RECORD_KEY``."""
    return {"digest": digest(inputs), "inputs": dict(inputs)}


def stored_inputs(output_record: Mapping | None) -> dict | None:
    """The inputs an output's JSON record holds (None: no record, or one written before inputs
    were recorded)."""
    if not output_record or RECORD_KEY not in output_record:
        return None
    return output_record[RECORD_KEY]["inputs"]


_ABSENT = "(absent)"


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: old -> new"`` for each field whose value differs (or that only one side has),
    sorted by field."""
    lines = []
    for field in sorted(set(stored) | set(current)):
        old, new = stored.get(field, _ABSENT), current.get(field, _ABSENT)
        if old != new:
            lines.append(f"{field}: {old!r} -> {new!r}")
    return lines


def check_reuse(
    stage: str,
    path: str,
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    recompute: bool,
    fresh: str = "a fresh --outdir",
) -> bool:
    """Whether the output at ``path``, made from the ``stored`` inputs (``stored_inputs`` of its
    record; None: no record), can be reused for the ``current`` inputs: True when they are
    equal; False (compute it again) when they differ and ``recompute`` is set.

    Raises:
      StaleOutputError: the inputs differ (or none were recorded) and ``recompute`` is not set;
        the message names ``stage``, ``path``, each changed field (old -> new) and the ways on.
    """
    if stored is not None and dict(stored) == dict(current):
        return True
    if recompute:
        return False
    if stored is None:
        changed = "it has no record of the settings that made it"
    else:
        shown = differences(stored, current)
        more = f"; and {len(shown) - 6} more" if len(shown) > 6 else ""
        changed = f"changed: {'; '.join(shown[:6])}{more}"
    raise StaleOutputError(
        f"{stage}: {path} was made with other settings ({changed}). Use {fresh}, or rerun "
        "with --recompute to recompute what changed (each old output is replaced once its new "
        "one is complete)"
    )
