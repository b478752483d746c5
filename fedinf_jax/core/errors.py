"""Errors in what the user asked for, as distinct from bugs.

An entry point (``train.py``, ``sample.py``, ``study.py``, ``evaluate.py``, ``reproduce.py``,
``pretrain.py``) prints a
``UserError`` as one line, ``error: <message>``, and exits with status 2
(``fedinf_jax.core.runtime.exit_on_user_error``); any other exception is a bug and keeps its
traceback. Each message names what was wrong and what is valid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """A setting, path or input that cannot work as given."""


class ConfigError(UserError, ValueError):
    """A config field out of its valid names or range, or contradicting a trained run."""


class MissingInputError(UserError, FileNotFoundError):
    """A path given as input holds nothing of what it should (no checkpoint, no sample set)."""


@contextlib.contextmanager
def as_config_error(where: str = "") -> Iterator[None]:
    """Re-raises a ``ValueError`` from resolving part of a config as a ``ConfigError``, and a
    ``ConfigError`` as itself, prefixed with ``where`` (e.g. "aggregator superdiff_or: ")."""
    try:
        yield
    except ConfigError as e:
        if not where:
            raise
        raise ConfigError(f"{where}{e}") from None
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from None


def check_fields(where: str, section, rules: dict) -> None:
    """Checks ``section``'s fields against ``rules``, {field: (predicate, "what is valid")}.

    Raises:
      ConfigError: the first field the predicate refuses, e.g. "train.batch_size must be >= 1,
        got 0".
    """
    for field, (ok, valid) in rules.items():
        if field in section and not ok(section[field]):
            raise ConfigError(f"{where}.{field} must be {valid}, got {section[field]!r}")
