"""How a config section is declared: a frozen dataclass beside the code it configures.

Each stage owns its section (``DownloadConfig`` lives in ``stages/download.py``); the field
default is the one place a default is stated (``pipeline/default.toml`` is checked against it by
a test). ``pipeline/config.py`` loads TOML into these classes with pydantic in strict mode: an
unknown key, a wrong type (``"ten"`` for an int, ``true`` for a number, ``3`` for a table) is an
error naming the dotted key, and every such error of a file is listed at once. What types cannot
say (ranges, choices, CIDR networks) each class states in ``problems()``, as readable sentences.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from pydantic import ConfigDict

from core.errors import ConfigError

STRICT = ConfigDict(extra="forbid", strict=True)

T = TypeVar("T")


def config_section(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass that pydantic validates strictly (unknown keys refused),
    with ``validate()``: raise one ConfigError listing every ``problems()`` message."""
    cls.__pydantic_config__ = STRICT  # type: ignore[attr-defined]
    if not hasattr(cls, "problems"):
        cls.problems = lambda self: []  # type: ignore[attr-defined]
    cls.validate = _validate  # type: ignore[attr-defined]
    return dataclass(frozen=True)(cls)


def _validate(self: Any) -> None:
    problems = self.problems()
    if problems:
        raise ConfigError("; ".join(problems))


def require(*checks: tuple[bool, str]) -> list[str]:
    """The messages of the checks that fail: ``require((x >= 1, "a.x must be >= 1"), ...)``."""
    return [message for ok, message in checks if not ok]


def network_problems(values: Iterable[str], key: str, parse: Callable[[str], Any]) -> list[str]:
    """Every entry must parse as a CIDR network; one message per bad entry, naming the key."""
    problems = []
    for value in values:
        try:
            parse(value)
        except ValueError as err:
            problems.append(f"{key}: {err}")
    return problems
