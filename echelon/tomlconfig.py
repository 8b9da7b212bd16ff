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
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigFileError(ValueError):
    """A configuration table has an unknown key or a value of the wrong type."""


def load_toml(path: Path) -> dict[str, Any]:
    """Parses a TOML file; raises ConfigFileError naming the file on a syntax error."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read ({exc.strerror})") from exc


def build(cls: type[T], table: Mapping[str, Any] | None, where: str) -> T:
    """Instantiates dataclass `cls` from `table` (missing keys keep their defaults)."""
    table = dict(table or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigFileError(f"[{where}]: unknown keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        kwargs[name] = _coerce(value, hints[name], f"[{where}].{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigFileError(f"[{where}]: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
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
            raise ConfigFileError(f"{where}: got {value!r}, want a list")
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigFileError(
                f"{where}: got {value!r}, want one of {[m.value for m in hint]}"
            ) from None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigFileError(f"{where}: got {value!r}, want a table")
        return build(hint, value, where.lstrip("[").replace("]", "", 1))  # "[a].b" -> "a.b"
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigFileError(f"{where}: got {value!r}, want {hint.__name__}")
    if origin is typing.Literal and value not in args:
        raise ConfigFileError(f"{where}: got {value!r}, want one of {list(args)}")
    return value


def dumps(tables: Mapping[str, Any]) -> str:
    """Writes tables of scalars and lists as TOML (what launchers hand to `main()`)."""
    lines: list[str] = []
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            lines.append(f"{name} = {_value(table)}")
    for name, table in tables.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{name}]")
            lines.extend(f"{key} = {_value(value)}" for key, value in table.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, enum.Enum):
        return _value(value.value)
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
