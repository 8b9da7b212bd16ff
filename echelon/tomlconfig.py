"""Builds frozen config dataclasses from TOML tables, refusing unknown keys.

Only a service's `main()` reads files; it hands the parsed tables to `build`,
which names the table and the key in every error so a user knows what to fix.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class ConfigFileError(ValueError):
    """A configuration table has an unknown key or a value of the wrong type.

    `key` names the offending setting as "table.key" when one setting is to blame, so a
    caller that layered several sources can say which one set it.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def load_toml(path: Path) -> dict[str, Any]:
    """Parses a TOML file; raises ConfigFileError naming the file on a syntax error."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read ({exc.strerror})") from exc


class Builder(Protocol):
    """`build`'s signature, for code that takes a builder (one that also names where a
    bad value came from: `services.common.settings.Resolved.build`)."""

    def __call__(self, cls: type[T], table: Mapping[str, Any] | None, where: str) -> T: ...


def build(cls: type[T], table: Mapping[str, Any] | None, where: str) -> T:
    """Instantiates dataclass `cls` from `table` (missing keys keep their defaults)."""
    table = dict(table or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        name = unknown[0]
        known = ", ".join(sorted(fields))
        raise ConfigFileError(
            f"[{where}].{name} = {table[name]!r}: unknown key; want one of {known}",
            key=f"{where}.{name}",
        )
    missing = [
        name
        for name, f in fields.items()
        if f.init
        and name not in table
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigFileError(
            f"[{where}].{missing[0]}: missing, a required key", key=f"{where}.{missing[0]}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        kwargs[name] = _coerce(value, hints[name], f"[{where}].{name}")
    try:
        return cls(**kwargs)
    except ConfigFileError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigFileError(f"[{where}]: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    key = where.replace("[", "").replace("]", "")  # "[a].b" -> "a.b"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None) and value is None:
                return None
        arms = [a for a in args if a is not type(None)]
        return _coerce(value, arms[0], where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigFileError(f"{where}: got {value!r}, want a list", key=key)
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigFileError(
                f"{where}: got {value!r}, want one of {[m.value for m in hint]}", key=key
            ) from None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):  # built already, from its own table
            return value
        if not isinstance(value, dict):
            raise ConfigFileError(f"{where}: got {value!r}, want a table", key=key)
        return build(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ConfigFileError(f"{where}: got {value!r}, want a path (a string)", key=key)
        return Path(value)
    # bool is an int to Python, not to a reader of the file: `port = true` is refused.
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
    ):
        raise ConfigFileError(f"{where}: got {value!r}, want {_WANT[hint]}", key=key)
    if origin is typing.Literal and value not in args:
        raise ConfigFileError(f"{where}: got {value!r}, want one of {list(args)}", key=key)
    return value


_WANT = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def dumps(tables: Mapping[str, Any]) -> str:
    """Writes tables of scalars and lists as TOML (what launchers hand to `main()`)."""
    lines: list[str] = []
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            lines.append(f"{name} = {toml_value(table)}")
    for name, table in tables.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{name}]")
            lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def toml_value(value: Any) -> str:
    """One TOML value: a bool, number, string, path, list or enum."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, enum.Enum):
        return toml_value(value.value)
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
