"""Names to members, one ``Registry`` per plug-in family (score_sde's and big_vision's pattern).

    SOLVERS = Registry("ode solver")

    @SOLVERS.register("euler")
    def euler(): ...

    SOLVERS.get("euler")  # the member; an unknown name lists the valid ones

A name is registered once: a second registration under the same name is refused, so two
modules cannot silently shadow each other's member; ``replace=True`` replaces it on purpose (a
notebook cell that defines a member and is run again). Fixed choices that are not plug-ins (a
sampler method, a prior) check their names with ``check_choice``, which raises the same error.

A member is a callable (a factory, a dataclass); its parameters are its settings, read from a
config section by name (``build``), written ``name:key=value,...`` on a command line (``parse``),
except the family's ``context``: the parameters that come from the run rather than the config
(an aggregator's count matrix, a partition's labels), each with what it is in words.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def unknown_name(family: str, name: object, valid: Iterable[str]) -> ValueError:
    """The error for a name outside a family: ``unknown <family> 'x'; valid: [...]``."""
    return ValueError(f"unknown {family} {name!r}; valid: {list(valid)}")


def check_choice(family: str, name: object, valid: Iterable[str]) -> None:
    """Raises ``unknown_name`` unless ``name`` is one of ``valid``."""
    valid = tuple(valid)
    if name not in valid:
        raise unknown_name(family, name, valid)


class Registry(Generic[T]):
    """The members of one plug-in family by name, in registration order.

    Args:
      family: what a member is, as error messages name it ("aggregator", "ode solver").
      context: the parameters that come from the run, not from a config section, each with what
        it is in words (for the error when it is needed and not given).
    """

    def __init__(self, family: str, context: Mapping[str, str] | None = None):
        self.family = family
        self.context = dict(context or {})
        self._members: dict[str, T] = {}

    def register(self, name: str, member: T | None = None, *, replace: bool = False):
        """Registers ``member`` under ``name``; without ``member``, a decorator that does.
        ``replace``: replace the member already registered under ``name`` (at its place in the
        order), else refuse it.

        Raises:
          ValueError: ``name`` is already registered in this family and ``replace`` is False.
        """

        def add(member: T) -> T:
            if not replace:
                self._check_free(name)
            self._members[name] = member
            return member

        return add if member is None else add(member)

    def register_all(self, members: Mapping[str, T]) -> Registry[T]:
        """Registers each of ``members`` under its name, in order, as ``register`` does; returns
        the registry, so a family can be defined as a table.

        Raises:
          ValueError: a name is already registered in this family (nothing is registered then).
        """
        for name in members:
            self._check_free(name)
        self._members.update(members)
        return self

    def _check_free(self, name: str) -> None:
        if name in self._members:
            raise ValueError(
                f"{self.family} {name!r} is already registered; register it with replace=True "
                "to replace it on purpose"
            )

    def get(self, name: str) -> T:
        """The member called ``name``.

        Raises:
          ValueError: an unknown name (the message lists the valid ones).
        """
        if name not in self._members:
            raise unknown_name(self.family, name, self._members)
        return self._members[name]

    def check(self, name: str) -> str:
        """``name``, after checking that it is registered (``get``'s error otherwise)."""
        self.get(name)
        return name

    def settings(self, name: str) -> dict[str, Any]:
        """Member ``name``'s settings (its parameters but the context) with their defaults
        (``inspect.Parameter.empty`` for one without)."""
        params = inspect.signature(self.get(name)).parameters.values()
        return {p.name: p.default for p in params if p.name not in self.context}

    def build(self, name: str, section: Mapping[str, Any] | None = None, **context) -> Any:
        """Calls member ``name`` with the fields of ``section`` that are its settings (the others
        keep their defaults) and the ``context`` values that are its parameters (None: not
        given).

        Raises:
          ValueError: an unknown name, or a context parameter without a default not given.
        """
        params = inspect.signature(self.get(name)).parameters
        kwargs = {k: section[k] for k in (section or {}) if k in params and k not in self.context}
        for key, what in self.context.items():
            if key not in params:
                continue
            if context.get(key) is not None:
                kwargs[key] = context[key]
            elif params[key].default is inspect.Parameter.empty:
                raise ValueError(f"{self.family} {name!r} needs {what}")
        return self.get(name)(**kwargs)

    def parse(self, spec: str, extra: Iterable[str] = ()) -> tuple[str, dict]:
        """``name`` or ``name:key=value,...`` -> (name, {key: value}) for a registered name, the
        keys among its settings and ``extra`` (``parse_spec``)."""
        name = self.check(spec.partition(":")[0])
        return parse_spec(self.family, spec, [*self.settings(name), *extra])

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._members)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._members.items())

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {list(self._members)})"


def parse_spec(family: str, spec: str, valid) -> tuple[str, dict]:
    """``name`` or ``name:key=value,...`` -> (name, {key: value}); keys must be in ``valid``."""
    name, _, rest = spec.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"{family} {spec!r}: settings are name=value, got {item!r}")
        check_choice(f"setting of {name}", key, valid)
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return name, settings
